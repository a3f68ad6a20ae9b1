"""Two towers on one shared BERT: users and items embedded in one space.

* Item tower: the item's text (title, year, genres or description) -> mean-pooled
  BERT encoding -> L2-normalised embedding.
* User tower: the same encoder on the user's history text (recent titles, most
  recent first) -> embedding. Encoding the history as one text, rather than
  pooling per-item embeddings, costs one encoder pass per user, lets attention
  weigh the history items against each other, and keeps each training example a
  self-contained input: a requirement of per-sample gradients in DP-SGD.
* Score: cosine similarity. Training divides it by a temperature.

The encoder is called once per tower per candidate column, each call with the
example dimension as batch dimension, so per-sample gradients (Opacus hooks) see
one sample per example, never one per tower.
"""

from __future__ import annotations

import torch
from torch import nn

from fedrec.model.frozen_cache import FrozenItemStates, embed_cached_items
from fedrec.model.pooling import unit_mean_pool


class TwoTowerRecommender(nn.Module):
    """Scores candidate items for users by cosine similarity of BERT embeddings."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.05) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.item_states: FrozenItemStates | None = None
        """Frozen lower-layer states of the catalogue (``model.cache-frozen-items``);
        used when ``forward`` is given the candidates' catalogue indices."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of a batch of token sequences, shape [B, D].

        Columns that are padding in every row are cut first (item texts are much
        shorter than their padded width), which changes no embedding.
        """
        length = int(attention_mask.sum(1).max().clamp(min=1))
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return unit_mean_pool(hidden, attention_mask)

    def forward(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        item_ids: torch.Tensor,
        item_mask: torch.Tensor,
        items: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C] of C candidate items per user (column 0: the positive).

        ``user_ids``/``user_mask``: [B, Tu]; ``item_ids``/``item_mask``: [B, C, Ti];
        ``items``: the candidates' catalogue indices [B, C], which let the item
        tower start from :attr:`item_states` when it is set.
        """
        users = self.embed(user_ids, user_mask)
        return torch.einsum("bd,bcd->bc", users, self.embed_candidates(item_ids, item_mask, items)) / self.temperature

    def embed_candidates(
        self, item_ids: torch.Tensor, item_mask: torch.Tensor, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings [B, C, D] of each example's candidates, one encoder call per column.

        With :attr:`item_states` set and the catalogue indices ``items`` given, the
        item tower starts at the first adapted layer (the frozen-layer cache).
        """
        if items is not None and self.item_states is not None:
            columns = [embed_cached_items(self.encoder, self.item_states, items[:, c]) for c in range(items.shape[1])]
        else:
            columns = [self.embed(item_ids[:, c], item_mask[:, c]) for c in range(item_ids.shape[1])]
        return torch.stack(columns, dim=1)
