"""A client's training examples: (history text, positive item, sampled negatives).

From a user's chronological training items s_0..s_{n-1}, example p (p >= 1) asks
the model to rank s_p above ``num_negatives`` items the user never interacted
with, given the history s_{p-1}, s_{p-2}, ... (most recent first). Each example's
inputs and loss depend on that example alone, as DP-SGD requires; negatives are
drawn per example from the client's own seeded generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from fedrec.model.sequence_tower import history_vectors
from fedrec.tokens import TokenTable, history_tokens


@dataclass(frozen=True)
class Example:
    """One training example: the user's items so far (most recent first) and the next."""

    history: np.ndarray
    positive: int
    user_items: frozenset[int]
    user: int = 0
    """Which of the given sequences it came from (in-batch negatives mask each user's
    other positives)."""


def build_examples(user_sequences: Sequence[np.ndarray], history_items: int) -> list[Example]:
    """All next-item examples of the given users' chronological item sequences."""
    examples = []
    for user, sequence in enumerate(user_sequences):
        known = frozenset(int(i) for i in sequence)
        for p in range(1, len(sequence)):
            history = sequence[max(0, p - history_items) : p][::-1].copy()
            examples.append(Example(history=history, positive=int(sequence[p]), user_items=known, user=user))
    return examples


class NextItemDataset(Dataset):
    """Token tensors of each example with freshly sampled negatives."""

    def __init__(
        self,
        examples: list[Example],
        table: TokenTable,
        num_negatives: int,
        max_user_tokens: int,
        seed: int,
        neighbours: np.ndarray | None = None,
        hard_negatives: int = 0,
        item_vectors: torch.Tensor | None = None,
        unlisted: frozenset[int] = frozenset(),
    ) -> None:
        """``neighbours`` [I, pool]: each item's nearest items, from which
        ``hard_negatives`` of each example's negatives are drawn (the rest uniformly).
        ``item_vectors`` [I, D]: item embeddings, of which each example then carries
        its history's (``history_vectors``, for a sequence tower). ``unlisted``: items
        never drawn as negatives (not in the catalogue while training)."""
        if hard_negatives and neighbours is None:
            raise ValueError("hard_negatives needs the items' neighbours")
        self.neighbours = neighbours
        self.hard_negatives = hard_negatives
        self.examples = examples
        self.table = table
        self.num_negatives = num_negatives
        self.max_user_tokens = max_user_tokens
        self.num_items = table.item_ids.shape[0]
        self.history_width = max((len(e.history) for e in examples), default=1)
        self.item_vectors = None if item_vectors is None else item_vectors.detach().float().cpu()
        self.unlisted = unlisted
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.examples)

    def _negatives(self, seen: frozenset[int], positive: int) -> np.ndarray:
        exclude = seen | self.unlisted if self.unlisted else seen
        if self.num_items - len(exclude) < self.num_negatives:
            raise ValueError(
                f"catalogue of {self.num_items} items ({len(self.unlisted)} unlisted while training) "
                f"leaves fewer than train.num-negatives={self.num_negatives} unseen items"
            )
        chosen = self._hard_negatives(exclude, positive)
        while len(chosen) < self.num_negatives:
            for item in self.rng.integers(0, self.num_items, size=2 * self.num_negatives):
                if int(item) not in exclude and int(item) not in chosen:
                    chosen.append(int(item))
                    if len(chosen) == self.num_negatives:
                        break
        return np.asarray(chosen, dtype=np.int64)

    def _hard_negatives(self, exclude: frozenset[int], positive: int) -> list[int]:
        """Up to ``hard_negatives`` distinct unseen items among the positive's neighbours."""
        if not self.hard_negatives:
            return []
        pool = [int(i) for i in self.neighbours[positive] if int(i) not in exclude]
        take = min(self.hard_negatives, len(pool))
        return [pool[j] for j in self.rng.choice(len(pool), size=take, replace=False)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        example = self.examples[index]
        user_ids, user_mask = history_tokens(self.table, example.history, self.max_user_tokens)
        candidates = np.concatenate([[example.positive], self._negatives(example.user_items, example.positive)])
        history, history_mask = padded_history(example.history, self.history_width)
        vectors = {}
        if self.item_vectors is not None:
            rows = history_vectors(self.item_vectors, torch.from_numpy(history), torch.from_numpy(history_mask))
            vectors["history_vectors"] = rows
        return {
            "user_ids": torch.from_numpy(user_ids.astype(np.int64)),
            "user_mask": torch.from_numpy(user_mask.astype(np.int64)),
            "item_ids": torch.from_numpy(self.table.item_ids[candidates].astype(np.int64)),
            "item_mask": torch.from_numpy(self.table.item_mask[candidates].astype(np.int64)),
            "items": torch.from_numpy(candidates.astype(np.int64)),
            "history": torch.from_numpy(history),
            "history_mask": torch.from_numpy(history_mask),
            "user": torch.tensor(example.user, dtype=torch.int64),
            **vectors,
        }


def padded_history(recent_first_items: Sequence[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """History item indices padded (with 0, mask 0) or cut to ``width``, and their mask."""
    items = np.asarray(recent_first_items, dtype=np.int64)[:width]
    history = np.zeros(width, dtype=np.int64)
    mask = np.zeros(width, dtype=np.int64)
    history[: len(items)] = items
    mask[: len(items)] = 1
    return history, mask
