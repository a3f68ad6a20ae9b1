"""Token tables: every item's text and title tokenized once, and user history texts.

Tokenization happens once per dataset and model vocabulary and is cached on
disk with the prepared data; user history texts are assembled from the cached
title tokens without calling the tokenizer again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

HISTORY_SEPARATOR = ";"


@dataclass(frozen=True)
class TokenTable:
    """Item text token ids [I, T] (padded) with masks, and title tokens for histories."""

    item_ids: np.ndarray
    item_mask: np.ndarray
    title_tokens: list[np.ndarray]
    cls_id: int
    sep_id: int
    pad_id: int
    separator_ids: np.ndarray

    def item_digest(self) -> str:
        """A digest of the items' tokens: keys per-catalogue caches apart."""
        return hashlib.sha256(self.item_ids.tobytes() + self.item_mask.tobytes()).hexdigest()

    def save(self, path: Path) -> None:
        """Write the table to one ``.npz`` file."""
        lengths = np.array([len(t) for t in self.title_tokens], dtype=np.int64)
        flat = np.concatenate(self.title_tokens) if self.title_tokens else np.zeros(0, np.int32)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(
            tmp,
            item_ids=self.item_ids,
            item_mask=self.item_mask,
            title_lengths=lengths,
            title_flat=flat,
            special=np.array([self.cls_id, self.sep_id, self.pad_id]),
            separator_ids=self.separator_ids,
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> TokenTable:
        """Read a table written by :meth:`save`."""
        with np.load(path) as data:
            lengths = data["title_lengths"]
            titles = np.split(data["title_flat"], np.cumsum(lengths)[:-1])
            cls_id, sep_id, pad_id = (int(x) for x in data["special"])
            return cls(
                item_ids=data["item_ids"],
                item_mask=data["item_mask"],
                title_tokens=titles,
                cls_id=cls_id,
                sep_id=sep_id,
                pad_id=pad_id,
                separator_ids=data["separator_ids"],
            )


def build_token_table(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    titles: Sequence[str],
    max_item_tokens: int,
) -> TokenTable:
    """Tokenize every item's text (padded to ``max_item_tokens``) and title."""
    encoded = tokenizer(
        list(texts),
        max_length=max_item_tokens,
        truncation=True,
        padding="max_length",
        return_tensors="np",
    )
    title_ids = tokenizer(list(titles), add_special_tokens=False)["input_ids"]
    return TokenTable(
        item_ids=encoded["input_ids"].astype(np.int32),
        item_mask=encoded["attention_mask"].astype(np.int8),
        title_tokens=[np.asarray(t, dtype=np.int32) for t in title_ids],
        cls_id=int(tokenizer.cls_token_id),
        sep_id=int(tokenizer.sep_token_id),
        pad_id=int(tokenizer.pad_token_id),
        separator_ids=np.asarray(
            tokenizer(HISTORY_SEPARATOR, add_special_tokens=False)["input_ids"], dtype=np.int32
        ),
    )


def history_tokens(
    table: TokenTable, recent_first_items: Sequence[int], max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask of a history text "[CLS] t1 ; t2 ; ... [SEP]", padded.

    Items are given most recent first; the text is cut at ``max_tokens``.
    """
    return join_titles(table, (table.title_tokens[item] for item in recent_first_items), max_tokens)


def join_titles(
    table: TokenTable, recent_first_titles: Iterable[np.ndarray], max_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`history_tokens` for title token ids of any items, catalogued or not."""
    pieces: list[np.ndarray] = [np.array([table.cls_id], dtype=np.int32)]
    budget = max_tokens - 2
    for n, piece in enumerate(recent_first_titles):
        if budget <= 0:
            break
        if n:
            piece = np.concatenate([table.separator_ids, piece])
        piece = piece[:budget]
        pieces.append(piece)
        budget -= len(piece)
    pieces.append(np.array([table.sep_id], dtype=np.int32))
    ids = np.concatenate(pieces)
    out = np.full(max_tokens, table.pad_id, dtype=np.int32)
    mask = np.zeros(max_tokens, dtype=np.int8)
    out[: len(ids)] = ids
    mask[: len(ids)] = 1
    return out, mask
