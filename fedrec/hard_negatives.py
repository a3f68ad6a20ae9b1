"""Hard negatives: unseen items whose text is close to the positive's.

Uniformly drawn negatives are mostly easy (a 1950s musical against a slasher
film). ``train.hard-negatives`` of an example's ``train.num-negatives`` are
drawn instead from the positive's ``train.hard-negative-pool`` nearest items by
the *pretrained* encoder's text embedding (cosine, adapters off), less the
user's own items. The neighbour table depends only on the public catalogue text
and the public pretrained weights, and every party computes the same one, so it
costs no privacy: each example's negatives still depend on that example alone,
as DP-SGD requires.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from fedrec.config import LoraSettings, ModelConfig
from fedrec.model.build import cached_recommender
from fedrec.model.frozen_cache import compute_item_states, layer_count
from fedrec.model.pooling import unit_mean_pool
from fedrec.tokens import TokenTable

CHUNK = 1024
"""Items whose similarities to the whole catalogue are ranked at once."""


@torch.no_grad()
def text_neighbours(encoder: nn.Module, table: TokenTable, pool: int) -> np.ndarray:
    """Each item's ``pool`` nearest other items [I, pool] by the pretrained encoder's
    unit mean-pooled text embedding, nearest first (LoRA adapters disabled)."""
    num_items = len(table.item_ids)
    if not 1 <= pool < num_items:
        raise ValueError(
            f"train.hard-negative-pool={pool} must be in [1, {num_items - 1}] "
            f"for a catalogue of {num_items} items"
        )
    base = encoder.disable_adapter() if hasattr(encoder, "disable_adapter") else contextlib.nullcontext()
    with base:
        states = compute_item_states(encoder, table, first_layer=layer_count(encoder))
    embeddings = unit_mean_pool(states.states, states.mask)
    neighbours = []
    for start in range(0, num_items, CHUNK):  # never the whole I x I similarity at once
        similarity = embeddings[start : start + CHUNK] @ embeddings.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -float("inf")  # an item is not its own negative
        neighbours.append(similarity.topk(pool, dim=1).indices)
    return torch.cat(neighbours).cpu().numpy().astype(np.int64)


_NEIGHBOURS: dict[tuple, np.ndarray] = {}


def cached_text_neighbours(
    model: ModelConfig, lora: LoraSettings, table: TokenTable, pool: int
) -> np.ndarray:
    """:func:`text_neighbours` of the process-wide recommender, computed once per
    process for each catalogue and model (a Ray actor runs many clients)."""
    key = (model.name, table.item_digest(), pool)
    if key not in _NEIGHBOURS:
        if len(_NEIGHBOURS) >= 2:
            _NEIGHBOURS.pop(next(iter(_NEIGHBOURS)))
        encoder = cached_recommender(model, lora, len(table.item_ids)).encoder
        _NEIGHBOURS[key] = text_neighbours(encoder, table, pool)
    return _NEIGHBOURS[key]
