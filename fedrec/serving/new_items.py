"""Items added to the catalogue after training (``--new-items FILE``).

A catalogue grows: a film is released after the federation's last round. The
item tower embeds any text, so a new item needs no retraining; it is appended
after the run's items (whose indices, identity vectors and cached index stay as
they are) and, in a run trained with ``model.item-ids``, gets a zero identity
vector, so it is scored from its text alone. docs/results.md ("Cold start")
measured that this is the best treatment of such items: 0.55 sampled HR@10
with zero vectors, against 0.08 when the same items had sat in the catalogue
during training and been trained as negatives only.

The file is an item table as for ``data.items-path`` (CSV/TSV, JSON lines or
Parquet): ``item_id``, ``text`` (what the item tower reads: write it as the
run's catalogue does, e.g. ``"Title (1998). Genres: Drama"`` for MovieLens) and
an optional ``title`` (shown, and read by the user tower when the item is in a
history; the text without one).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from fedrec.data.interactions import DataError
from fedrec.data.tabular import items_from_table, read_any_table
from fedrec.prepare import catalogue_digest


def read_new_items(path: Path, catalogue: pd.DataFrame) -> pd.DataFrame:
    """The items of ``path`` as rows to append to ``catalogue`` (``item_idx`` from its
    size on, in file order); an id already in the catalogue is refused by file and line."""
    table = read_any_table(Path(path))
    items = items_from_table(table)
    known = items["item_id"].isin(set(catalogue["item_id"].astype(str)))
    if known.any():
        row = int(known.to_numpy().argmax())  # items keep the table's row order
        raise DataError(
            f"{table.where(table.frame.index[row])}: item {items.at[row, 'item_id']!r} is already in the run's "
            "catalogue; items added after training need ids of their own"
        )
    return items.assign(item_idx=range(len(catalogue), len(catalogue) + len(items)))


def new_items_digest(items: pd.DataFrame) -> str:
    """A short fingerprint of the added items (ids, texts, titles): names their index file."""
    digest = hashlib.sha256(catalogue_digest(items).encode())
    for title in items["title"].astype(str):
        digest.update(f"{title}\n".encode())
    return digest.hexdigest()[:12]
