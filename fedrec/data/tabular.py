"""Load interactions from a generic CSV/TSV or Parquet table.

The interactions file has columns ``user_id``, ``item_id``, ``timestamp`` and
optionally ``rating`` (default 1.0). ``timestamp`` is Unix seconds or an ISO 8601
date. Item text comes either from an item table (``item_id``, ``text``, optional
``title``) or, without one, from a ``text`` (and optional ``title``) column inline
in the interactions file, the same for every row of an item. Without a title the
text doubles as the title.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from fedrec.data.interactions import DataError, InteractionData
from fedrec.data.validation import (
    Table,
    check_unique,
    parse_ids,
    parse_interactions,
    parse_text,
    read_delimited,
    read_json_lines,
    read_parquet,
    require_columns,
)

logger = logging.getLogger(__name__)

_DELIMITED = {".csv": ",", ".tsv": "\t"}
_PARQUET = (".parquet", ".pq")
_JSON_LINES = (".jsonl", ".json")


def read_any_table(path: Path) -> Table:
    """Read a CSV (``.csv``), TSV (``.tsv``), optionally gzipped, JSON-lines or Parquet file."""
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zip", ".xz", ".zst"):
        suffixes = suffixes[:-1]  # pandas decompresses these transparently
    suffix = suffixes[-1] if suffixes else ""
    if suffix in _DELIMITED:
        return read_delimited(path, sep=_DELIMITED[suffix])
    if suffix in _PARQUET:
        return read_parquet(path)
    if suffix in _JSON_LINES:
        return read_json_lines(path)
    raise DataError(
        f"{path}: unknown table format {suffix or '(no suffix)'!r}; use a .csv, .tsv "
        "(optionally .gz), .jsonl or .parquet file"
    )


def load_table(interactions_path: Path, items_path: Path | None) -> InteractionData:
    """Load a generic interactions table plus item text (inline or from ``items_path``)."""
    interactions_path = Path(interactions_path)
    table = read_any_table(interactions_path)
    rating = "rating" if "rating" in table.frame.columns else None
    if rating is None:
        logger.info("%s: no rating column; every rating is 1.0", interactions_path)
    interactions = parse_interactions(table, rating=rating)
    if items_path is not None:
        if "text" in table.frame.columns:
            logger.info("%s: ignoring inline text; using %s", interactions_path, items_path)
        items = items_from_table(read_any_table(Path(items_path)))
    elif "text" in table.frame.columns:
        items = _items_inline(table)
    else:
        raise DataError(
            f"{interactions_path}: no item text: the table has no 'text' column and no "
            "item table was given. Add a 'text' column, or set data.items_path to a "
            "file with columns item_id,text"
        )
    logger.info("%s: %d interactions, %d items", interactions_path, len(interactions), len(items))
    return InteractionData(interactions_path.name.split(".")[0], interactions, items)


def items_from_table(table: Table) -> pd.DataFrame:
    require_columns(table, ["item_id", "text"])
    ids = parse_ids(table, "item_id")
    check_unique(table, ids, "item_id")
    text = parse_text(table, "text")
    _fail_if_empty(table, text, "text")
    title = parse_text(table, "title") if "title" in table.frame.columns else text
    title = title.where(title != "", text)
    return pd.DataFrame({"item_id": ids, "title": title, "text": text}).reset_index(drop=True)


def _items_inline(table: Table) -> pd.DataFrame:
    ids = parse_ids(table, "item_id")
    text = parse_text(table, "text")
    has_title = "title" in table.frame.columns
    title = parse_text(table, "title") if has_title else text
    rows = pd.DataFrame({"item_id": ids, "title": title, "text": text})
    described = rows[rows["text"] != ""]
    undescribed = ~rows["item_id"].isin(described["item_id"])
    if undescribed.any():
        line = undescribed.index[undescribed.to_numpy().argmax()]
        raise DataError(
            f"{table.where(line)}: item {ids[line]!r} has no text on any row; "
            "fill its 'text' column or give an item table via data.items_path"
        )
    distinct = described.drop_duplicates(["item_id", "text"])
    conflict = distinct["item_id"].duplicated()
    if conflict.any():
        line = conflict.index[conflict.to_numpy().argmax()]
        item = distinct.at[line, "item_id"]
        first = distinct.index[(distinct["item_id"] == item).to_numpy().argmax()]
        raise DataError(
            f"{table.where(line)}: item {item!r} has a different text than on line "
            f"{first}; each item needs one text, so make them match"
        )
    items = described.drop_duplicates("item_id").copy()
    items["title"] = items["title"].where(items["title"] != "", items["text"])
    return items.reset_index(drop=True)


def _fail_if_empty(table: Table, values: pd.Series, column: str) -> None:
    empty = values == ""
    if empty.any():
        line = empty.index[empty.to_numpy().argmax()]
        raise DataError(
            f"{table.where(line)}, column '{column}': empty {column}; every item needs "
            "one, so fill it or delete that row"
        )
