"""Sentence embeddings from token states: masked mean, then unit norm."""

from __future__ import annotations

import torch
from torch import nn


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Average the token states where ``mask`` is 1."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def unit_mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L2-normalised :func:`mean_pool`: the embedding both towers produce.

    Pooled in float32 whatever the encoder's (autocast) output dtype.
    """
    return nn.functional.normalize(mean_pool(hidden.float(), mask), dim=-1)
