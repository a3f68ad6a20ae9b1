"""Two towers on one shared BERT: users and items embedded in one space.

* Item tower: the item's text (title, year, genres or description) -> mean-pooled
  BERT encoding -> L2-normalised embedding.
* User tower: the same encoder on the user's history text (recent titles, most
  recent first) -> embedding. Encoding the history as one text, rather than
  pooling per-item embeddings, costs one encoder pass per user, lets attention
  weigh the history items against each other, and keeps each training example a
  self-contained input: a requirement of per-sample gradients in DP-SGD.
* Score: cosine similarity. Training divides it by a temperature.
* Optional item identity (``model.item-ids``, :mod:`fedrec.model.item_identity`):
  a learned vector per item added to the item's text embedding, and the mean of
  the history items' vectors to the user's.
* Optional sequential user tower (``model.sequence-layers``,
  :mod:`fedrec.model.sequence_tower`): self-attention over the embeddings of the
  user's last items, in order, adds a term to the user embedding.
* Optional recency term in training (:class:`RecencyTerm`, ``train.recent-items``):
  the term a device adds to its user embedding at evaluation and serving
  (``personal.recent-items``, :mod:`fedrec.model.personal_vector`), added during
  training too, so the towers learn with the user embedding they are ranked with.

The encoder is called once per tower per candidate column, each call with the
example dimension as batch dimension, so per-sample gradients (Opacus hooks) see
one sample per example, never one per tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedrec.model.frozen_cache import FrozenItemStates, embed_cached_items
from fedrec.model.item_identity import (
    find_item_identity,
    pooled_identity,
    with_identity,
)
from fedrec.model.pooling import mean_pool, unit_mean_pool
from fedrec.model.sequence_tower import find_sequence_tower


@dataclass(frozen=True)
class RecencyTerm:
    """``weight`` times the mean embedding of an example's last ``items`` history
    items, added to its user embedding (then normalised) in training."""

    items: int
    weight: float


class TwoTowerRecommender(nn.Module):
    """Scores candidate items for users by cosine similarity of BERT embeddings."""

    def __init__(self, encoder: nn.Module, temperature: float = 0.05) -> None:
        super().__init__()
        self.encoder = encoder
        self.temperature = temperature
        self.item_states: FrozenItemStates | None = None
        """Frozen lower-layer states of the catalogue (``model.cache-frozen-items``);
        used when ``forward`` is given the candidates' catalogue indices."""
        self.recency: RecencyTerm | None = None
        """The recency term of the training logits (``forward``, ``in_batch_logits``);
        never part of :meth:`embed_users`, which evaluation and serving call and
        whose callers add the device's own term."""

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings of a batch of token sequences, shape [B, D].

        Columns that are padding in every row are cut first (item texts are much
        shorter than their padded width), which changes no embedding.
        """
        length = int(attention_mask.sum(1).max().clamp(min=1))
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return unit_mean_pool(hidden, attention_mask)

    @property
    def item_identity(self) -> nn.Module | None:
        """The item-identity table (``model.item-ids``), or None for a text-only model."""
        return find_item_identity(self.encoder)

    def forward(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        item_ids: torch.Tensor,
        item_mask: torch.Tensor,
        items: torch.Tensor | None = None,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        history_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, C] of C candidate items per user (column 0: the positive).

        ``user_ids``/``user_mask``: [B, Tu]; ``item_ids``/``item_mask``: [B, C, Ti];
        ``items``: the candidates' catalogue indices [B, C], which let the item
        tower start from :attr:`item_states` when it is set; ``history`` and
        ``history_mask`` [B, H]: the history items' catalogue indices, which the
        item-identity table needs; ``history_vectors`` [B, H, D]: their embeddings,
        which the sequence tower reads.
        """
        users = self.query_users(user_ids, user_mask, history, history_mask, history_vectors)
        return torch.einsum("bd,bcd->bc", users, self.embed_candidates(item_ids, item_mask, items)) / self.temperature

    def in_batch_logits(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        item_ids: torch.Tensor,
        item_mask: torch.Tensor,
        items: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_vectors: torch.Tensor | None = None,
        users: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, B*C] of each user against every candidate of the batch, and the
        target column of each row (its own positive, column ``b * C``).

        A candidate that is the row's positive item, one of its history items or
        (``users``: the user of each row) the positive of another row of the same
        user is a false negative and masked out (logit -inf), except the target.
        A client holding one user's examples would otherwise learn to rank the
        user's later items low.
        """
        queries = self.query_users(user_ids, user_mask, history, history_mask, history_vectors)
        candidates = self.embed_candidates(item_ids, item_mask, items)
        size, columns = items.shape
        logits = queries @ candidates.reshape(size * columns, -1).T / self.temperature
        flat = items.reshape(-1)
        target = torch.arange(size, device=items.device) * columns
        is_positive_of = flat[None, :] == items[:, :1]  # [o, j]: candidate j is row o's positive
        known = is_positive_of | (
            (flat[None, None, :] == history[:, :, None]) & history_mask[:, :, None].bool()
        ).any(dim=1)
        if users is not None:  # [b, o, j]: row o is b's user's and candidate j is o's positive
            same_user = users[:, None] == users[None, :]
            known |= (same_user[:, :, None] & is_positive_of[None, :, :]).any(dim=1)
        known[torch.arange(size, device=items.device), target] = False
        return logits.masked_fill(known, float("-inf")), target

    def embed_users(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        history_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User embeddings [B, D] from history texts (and history items' identities;
        with a sequence tower, plus its term of the history items' embeddings
        ``history_vectors`` [B, H, D], most recent first)."""
        users = self.embed(user_ids, user_mask)
        identity = self.item_identity
        if identity is not None:
            if history is None or history_mask is None:
                raise ValueError("a model with item identities needs the history items' indices")
            users = with_identity(users, pooled_identity(identity, history, history_mask))
        tower = self.sequence_tower
        if tower is None:
            return users
        if history_vectors is None or history_mask is None:
            raise ValueError("a model with a sequence tower needs the history items' embeddings (history_vectors)")
        return nn.functional.normalize(users.float() + tower(history_vectors, history_mask).float(), dim=-1)

    @property
    def sequence_tower(self) -> nn.Module | None:
        """The sequential user tower (``model.sequence-layers``), or None without one."""
        return find_sequence_tower(self.encoder)

    def query_users(
        self,
        user_ids: torch.Tensor,
        user_mask: torch.Tensor,
        history: torch.Tensor | None = None,
        history_mask: torch.Tensor | None = None,
        history_vectors: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The user embeddings [B, D] that training ranks with: :meth:`embed_users`
        plus :attr:`recency` when set, normalised as the device's term is."""
        users = self.embed_users(user_ids, user_mask, history, history_mask, history_vectors)
        if self.recency is None:
            return users
        if history is None or history_mask is None:
            raise ValueError("the recency term needs the history items' indices")
        recent = self._recent_items_mean(history, history_mask, self.recency.items)
        return nn.functional.normalize(users.float() + self.recency.weight * recent, dim=-1)

    def _recent_items_mean(self, history: torch.Tensor, history_mask: torch.Tensor, count: int) -> torch.Tensor:
        """[B, D]: mean embedding of each row's first ``count`` history items (most
        recent first), one item-tower call per column, from the frozen-layer cache."""
        if self.item_states is None:
            raise ValueError("the training recency term needs the frozen-layer item cache (model.cache-frozen-items)")
        count = min(count, history.shape[1])
        vectors = torch.stack([self.embed_items(None, None, history[:, c]) for c in range(count)], dim=1)
        return mean_pool(vectors.float(), history_mask[:, :count])

    def embed_items(
        self, item_ids: torch.Tensor | None, item_mask: torch.Tensor | None, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings [B, D] of catalogue items given their tokens and indices [B].

        With :attr:`item_states` set and ``items`` given, the item tower starts at
        the first adapted layer (the frozen-layer cache) and needs no tokens; with
        an item-identity table, each item's identity vector is added.
        """
        if items is not None and self.item_states is not None:
            text = embed_cached_items(self.encoder, self.item_states, items)
        elif item_ids is None or item_mask is None:
            raise ValueError("embedding items without the frozen-layer cache needs their tokens")
        else:
            text = self.embed(item_ids, item_mask)
        identity = self.item_identity
        if identity is None:
            return text
        if items is None:
            raise ValueError("a model with item identities needs the items' catalogue indices")
        return with_identity(text, identity(items))

    def embed_candidates(
        self, item_ids: torch.Tensor, item_mask: torch.Tensor, items: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Embeddings [B, C, D] of each example's candidates, one tower call per column."""
        columns = [
            self.embed_items(item_ids[:, c], item_mask[:, c], None if items is None else items[:, c])
            for c in range(item_ids.shape[1])
        ]
        return torch.stack(columns, dim=1)
