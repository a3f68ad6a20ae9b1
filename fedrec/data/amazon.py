"""Load Amazon product reviews (JSON lines, optionally gzipped) with item metadata.

Two schemas are recognised from the first record of each file:

* 2014/2018 (McAuley et al.): reviews ``reviewerID, asin, overall,
  unixReviewTime`` (seconds); metadata ``asin, title, categories`` (2014: a list
  of category paths) or ``category`` (2018: a flat list), ``description`` (a
  string or a list of strings). The 2014 metadata is Python-literal rather than
  strict JSON; both are accepted.
* 2023 (Hou et al.): reviews ``user_id, parent_asin`` (or ``asin``), ``rating``,
  ``timestamp`` (milliseconds); metadata ``parent_asin, title, categories,
  description`` (a list of strings), with ``main_category`` used when
  ``categories`` is empty.

Item text is "<title>. Categories: <a>, <b>. <first 200 characters of the
description>", leaving out missing parts. Reviewed items with no metadata (or an
all-empty one) have nothing to embed: their interactions are dropped and counted
in a warning.
"""

from __future__ import annotations

import ast
import gzip
import html
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, NamedTuple

import pandas as pd

from fedrec.data.interactions import DataError, InteractionData
from fedrec.data.validation import parse_interactions, table_from_records

logger = logging.getLogger(__name__)

DESCRIPTION_CHARS = 200
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")


def load_amazon_reviews(reviews_path: Path, meta_path: Path | None) -> InteractionData:
    """Load Amazon reviews and build item text from the metadata file ``meta_path``."""
    reviews_path = Path(reviews_path)
    if meta_path is None:
        raise DataError(
            f"{reviews_path}: Amazon reviews carry no item text; set data.items_path to "
            "the matching metadata file (meta_<category>.json[l][.gz])"
        )
    interactions = _read_reviews(reviews_path)
    items = _read_meta(Path(meta_path), set(interactions["item_id"]))
    known = interactions["item_id"].isin(items["item_id"])
    if not known.all():
        dropped = int((~known).sum())
        logger.warning(
            "%s: dropping %d of %d interactions (%.1f%%) whose items have no usable "
            "metadata in %s",
            reviews_path, dropped, len(interactions), 100 * dropped / len(interactions),
            meta_path,
        )  # fmt: skip
        interactions = interactions[known].reset_index(drop=True)
        if interactions.empty:
            raise DataError(
                f"{meta_path}: describes none of the items reviewed in {reviews_path}; "
                "check that both files are for the same category and release"
            )
    logger.info("%s: %d interactions, %d items", reviews_path, len(interactions), len(items))
    name = reviews_path.name.split(".")[0]
    return InteractionData(f"amazon-{name}", interactions, items)


def _open_text(path: Path) -> IO[str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found; check data.path / data.items_path")
    if path.suffix.lower() == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _records(path: Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for each non-blank line."""
    with _open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                line = line.strip()
                if not line:
                    continue
                yield number, _decode(path, number, line)
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read ({exc}); re-download the file") from exc


def _decode(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        try:  # the 2014 metadata is written as Python dict literals
            record = ast.literal_eval(line)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise DataError(
                f"{path}, line {number}: not a JSON object: {line[:80]!r}; fix or delete that line"
            ) from None
    if not isinstance(record, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, got {line[:80]!r}")
    return record


class _ReviewSchema(NamedTuple):
    """Field names of one review schema; ``unit`` is the timestamp unit."""

    user: str
    item: str
    rating: str
    timestamp: str
    unit: str
    label: str


_LEGACY = _ReviewSchema("reviewerID", "asin", "overall", "unixReviewTime", "s", "2014/2018")
_MODERN = _ReviewSchema("user_id", "parent_asin", "rating", "timestamp", "ms", "2023")


def _read_reviews(path: Path) -> pd.DataFrame:
    lines: list[int] = []
    columns: dict[str, list[object]] = {}
    schema: _ReviewSchema | None = None
    for number, record in _records(path):
        if schema is None:
            schema = _review_schema(path, number, record)
            columns = {f: [] for f in (schema.user, schema.item, schema.rating, schema.timestamp)}
            logger.info("%s: %s review schema", path, schema.label)
        lines.append(number)
        columns[schema.user].append(record.get(schema.user))
        item = record.get(schema.item) or (record.get("asin") if schema is _MODERN else None)
        columns[schema.item].append(item)
        columns[schema.rating].append(record.get(schema.rating))
        columns[schema.timestamp].append(record.get(schema.timestamp))
    if schema is None:
        raise DataError(f"{path}: no data rows (the file is empty); re-download it")
    return parse_interactions(
        table_from_records(path, columns, lines),
        user=schema.user,
        item=schema.item,
        rating=schema.rating,
        timestamp=schema.timestamp,
        timestamp_unit=schema.unit,
    )


def _review_schema(path: Path, number: int, record: dict) -> _ReviewSchema:
    """Recognise the schema from the first record."""
    if "reviewerID" in record:
        return _LEGACY
    if "user_id" in record:
        return _MODERN
    raise DataError(
        f"{path}, line {number}: unrecognised review record with fields {sorted(record)}; "
        "expected reviewerID/asin/overall/unixReviewTime (2014/2018) or "
        "user_id/parent_asin/rating/timestamp (2023)"
    )


def _read_meta(path: Path, wanted: set[str]) -> pd.DataFrame:
    """Item table for the ``wanted`` ids; the first record of a repeated id wins."""
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    seen: set[str] = set()
    for _, record in _records(path):
        item = record.get("parent_asin") or record.get("asin")
        item = str(item).strip() if item is not None else ""
        if item not in wanted or item in seen:
            continue
        seen.add(item)
        title = _clean(record.get("title"))
        text = item_text(title, _categories(record), _clean(record.get("description")))
        if text:
            ids.append(item)
            titles.append(title or item)
            texts.append(text)
    if not ids:
        raise DataError(
            f"{path}: describes none of the reviewed items; check that the metadata "
            "matches the reviews file (same category and release)"
        )
    return pd.DataFrame({"item_id": ids, "title": titles, "text": texts}, dtype=str)


def _clean(value: object) -> str:
    """Flatten a string or list of strings to one line of plain text."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        value = " ".join(str(v) for v in value if v is not None)
    text = html.unescape(_TAG.sub(" ", str(value)))
    return _SPACE.sub(" ", text).strip()


def _categories(record: dict) -> list[str]:
    raw = record.get("categories") or record.get("category") or []
    if isinstance(raw, str):
        raw = [raw]
    flat: list[str] = []
    for entry in raw:  # 2014 nests category paths: [["Books", "Fiction"], ...]
        flat.extend(entry if isinstance(entry, (list, tuple)) else [entry])
    if not flat and record.get("main_category"):
        flat = [record["main_category"]]
    names = (_clean(name) for name in flat)
    return list(dict.fromkeys(name for name in names if name))


def item_text(title: str, categories: list[str], description: str) -> str:
    """Join title, categories and the first 200 characters of the description."""
    parts = [title]
    if categories:
        parts.append("Categories: " + ", ".join(categories))
    parts.append(description[:DESCRIPTION_CHARS].rstrip())
    text = ""
    for part in filter(None, parts):
        if text:
            text += " " if text.endswith((".", "!", "?")) else ". "
        text += part
    return text
