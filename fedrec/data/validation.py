"""Parse raw tables into typed columns, failing on the first bad row with its location.

Every loader reads its file into a :class:`Table`: a DataFrame of raw values whose
index is the 1-based line number each record came from (the header, when there is
one, is line 1; blank lines are counted but dropped). The ``parse_*`` functions
turn raw columns into typed ones with vectorised pandas operations
(``pd.to_numeric(errors="coerce")``, ``pd.to_datetime``) and, if any value is
missing or unparsable, raise :class:`DataError` naming the file, the line, the
column and the offending value. No Python loop touches individual rows.

Line numbers are exact for files without quoted fields that span several lines;
Parquet files have no lines, so their locations are reported as 1-based rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pandas.api import types as ptypes

from fedrec.data.interactions import DataError

logger = logging.getLogger(__name__)

_SAFE_SEPARATOR = "\x1f"  # ASCII unit separator: stands in for multi-character separators
_EPOCH = pd.Timestamp(0, tz="UTC")


@dataclass(frozen=True)
class Table:
    """Raw records of one file.

    ``frame`` holds the values as read (strings for text files, native types for
    Parquet and JSON); its index is the location of each record: a 1-based line
    number (``unit == "line"``) or a 1-based row number (``unit == "row"``).
    """

    path: Path
    frame: pd.DataFrame
    unit: str = "line"

    def where(self, location: int) -> str:
        """Describe a record's location, e.g. ``"data/ratings.csv, line 7"``."""
        return f"{self.path}, {self.unit} {location}"


def read_delimited(
    path: Path,
    *,
    sep: str = ",",
    names: Sequence[str] | None = None,
    encoding: str = "utf-8",
    quoting: int = csv.QUOTE_MINIMAL,
) -> Table:
    """Read a delimited text file with every value as a string.

    ``names`` gives the column names of a headerless file; otherwise the first line
    is the header. A multi-character ``sep`` (MovieLens ``::``) is supported.
    Raises :class:`DataError` if the file is missing, undecodable, malformed or has
    no data rows.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path in your data settings")
    source: Path | io.StringIO = path
    delimiter = sep
    try:
        if len(sep) > 1:
            # The C parser takes single-character separators only; swap in one that
            # never occurs in real text rather than fall back to the slow Python parser.
            text = path.read_text(encoding=encoding)
            source, delimiter = io.StringIO(text.replace(sep, _SAFE_SEPARATOR)), _SAFE_SEPARATOR
        frame = pd.read_csv(
            source,
            sep=delimiter,
            header=None if names is not None else 0,
            names=list(names) if names is not None else None,
            dtype=str,
            na_filter=False,
            skip_blank_lines=False,
            quoting=quoting,
            encoding=encoding,
        )
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: cannot decode as {encoding} ({exc.reason} at byte {exc.start}); "
            "re-save the file in that encoding"
        ) from exc
    except pd.errors.EmptyDataError as exc:
        raise DataError(f"{path}: file is empty; re-download or regenerate it") from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"{path}: malformed table: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    first_line = 1 if names is not None else 2
    frame.index = pd.RangeIndex(first_line, first_line + len(frame))
    blank = (frame == "").all(axis=1)
    return _non_empty(Table(path, frame.loc[~blank]))


def read_parquet(path: Path) -> Table:
    """Read a Parquet file; locations in errors are 1-based row numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path in your data settings")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for bad files
        raise DataError(f"{path}: cannot read as Parquet ({exc}); check the file") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    frame.index = pd.RangeIndex(1, len(frame) + 1)
    return _non_empty(Table(path, frame, unit="row"))


def read_json_lines(path: Path) -> Table:
    """Read a JSON-lines file (one object per line); locations are line numbers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path in your data settings")
    records: list[dict] = []
    lines: list[int] = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}")
            records.append(record)
            lines.append(number)
    frame = pd.DataFrame.from_records(records, index=pd.Index(lines, dtype="int64"))
    frame.columns = [str(c).strip() for c in frame.columns]
    return _non_empty(Table(path, frame))


def table_from_records(path: Path, columns: dict[str, list], lines: Sequence[int]) -> Table:
    """Wrap already-extracted records (e.g. from JSON lines) with their line numbers."""
    frame = pd.DataFrame(columns, index=pd.Index(list(lines), dtype="int64"))
    return _non_empty(Table(Path(path), frame))


def _non_empty(table: Table) -> Table:
    if table.frame.empty:
        raise DataError(
            f"{table.path}: no data rows (the file is empty or holds only a header); "
            "re-download or regenerate it"
        )
    return table


def require_columns(table: Table, columns: Sequence[str]) -> None:
    """Raise :class:`DataError` naming the file if any of ``columns`` is absent."""
    missing = [c for c in columns if c not in table.frame.columns]
    if missing:
        raise DataError(
            f"{table.path}: missing required column(s) {missing}; found "
            f"{list(table.frame.columns)}. Rename the header or pick the matching loader"
        )


def _missing(raw: pd.Series) -> pd.Series:
    """True where a raw value is absent: NaN/None, or a blank string."""
    missing = raw.isna()
    if ptypes.is_string_dtype(raw.dtype) or raw.dtype == object:
        as_text = raw.astype(object).where(~missing, "").astype(str)
        missing |= as_text.str.strip().eq("")
    return missing


def _fail_first(table: Table, bad: pd.Series, column: str, problem: str) -> None:
    """Raise for the first row where ``bad`` is true, if any."""
    if not bad.any():
        return
    location = bad.index[np.flatnonzero(bad.to_numpy())[0]]
    value = table.frame.at[location, column]
    shown = "an empty value" if _is_blank(value) else repr(value)
    count = int(bad.sum())
    more = f" ({count - 1} more rows have the same problem)" if count > 1 else ""
    raise DataError(
        f"{table.where(location)}, column '{column}': {problem}, got {shown}{more}; "
        "fix or delete that row"
    )


def _is_blank(value: object) -> bool:
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists and other containers
        return False


def parse_ids(table: Table, column: str) -> pd.Series:
    """Return ``column`` as stripped strings; empty ids are an error."""
    require_columns(table, [column])
    raw = table.frame[column]
    if ptypes.is_float_dtype(raw.dtype):
        whole = raw.dropna()
        if (whole == np.floor(whole)).all():
            raw = raw.astype("Int64")  # 12.0 -> "12", not "12.0"
    missing = raw.isna()
    ids = raw.astype(object).where(~missing, "").astype(str).str.strip()
    _fail_first(table, missing | (ids == ""), column, "expected a non-empty id")
    return ids.astype(str)


def _to_float(raw: pd.Series) -> pd.Series:
    """Values as float64, NaN where a value is missing or not a number."""
    if ptypes.is_bool_dtype(raw.dtype):
        raw = raw.astype("int64")
    if ptypes.is_numeric_dtype(raw.dtype):
        return pd.Series(raw.to_numpy(dtype="float64", na_value=np.nan), index=raw.index)
    try:  # fast path: a whole column of clean numbers casts directly (arrow strings: C++)
        return raw.astype("float64")
    except (TypeError, ValueError):  # some value is not a number: coerce it to NaN
        return pd.to_numeric(raw, errors="coerce").astype("float64")


def parse_numbers(table: Table, column: str, dtype: str = "float32") -> pd.Series:
    """Return ``column`` as finite numbers of ``dtype``."""
    require_columns(table, [column])
    raw = table.frame[column]
    values = _to_float(raw)
    _fail_first(table, ~np.isfinite(values), column, "expected a number")
    return values.astype(dtype)


def parse_timestamps(table: Table, column: str, unit: str = "s") -> pd.Series:
    """Return ``column`` as int64 Unix seconds.

    Numbers are taken in ``unit`` (``"s"`` or ``"ms"``) and floored to whole
    seconds; strings that are not numbers are parsed as ISO 8601 dates (naive ones
    are taken as UTC).
    """
    if unit not in ("s", "ms"):
        raise ValueError(f"timestamp unit must be 's' or 'ms', got {unit!r}")
    require_columns(table, [column])
    raw = table.frame[column]
    if ptypes.is_datetime64_any_dtype(raw.dtype):
        stamps = pd.to_datetime(raw, utc=True)
        seconds = (stamps - _EPOCH) / pd.Timedelta(seconds=1)
        _fail_first(table, seconds.isna(), column, "expected a date")
        return np.floor(seconds).astype("int64")
    numbers = _to_float(raw)
    seconds = numbers / 1000.0 if unit == "ms" else numbers
    not_numeric = numbers.isna() & ~_missing(raw)
    if not_numeric.any():
        text = raw[not_numeric].astype(str).str.strip()
        dates = pd.to_datetime(text, errors="coerce", utc=True, format="ISO8601")
        seconds.loc[not_numeric] = (dates - _EPOCH) / pd.Timedelta(seconds=1)
    _fail_first(
        table,
        ~np.isfinite(seconds),
        column,
        f"expected Unix time in {'milliseconds' if unit == 'ms' else 'seconds'} "
        "or an ISO 8601 date",
    )
    return np.floor(seconds).astype("int64")


def parse_text(table: Table, column: str) -> pd.Series:
    """Return ``column`` as stripped strings, with missing values as ``""``."""
    require_columns(table, [column])
    raw = table.frame[column]
    missing = raw.isna()
    return raw.astype(object).where(~missing, "").astype(str).str.strip().astype(str)


def check_unique(table: Table, ids: pd.Series, column: str) -> None:
    """Raise on the first id that repeats an earlier one."""
    _fail_first(table, ids.duplicated(), column, "expected each id once, this one repeats")


def parse_interactions(
    table: Table,
    *,
    user: str = "user_id",
    item: str = "item_id",
    rating: str | None = "rating",
    timestamp: str = "timestamp",
    timestamp_unit: str = "s",
) -> pd.DataFrame:
    """Turn raw interaction records into the standard typed table.

    Returns columns ``user_id`` (str), ``item_id`` (str), ``rating`` (float32) and
    ``timestamp`` (int64 seconds) in file order. With ``rating=None`` every rating
    is 1.0 (implicit feedback).
    """
    required = [user, item, timestamp] + ([rating] if rating else [])
    require_columns(table, required)
    frame = pd.DataFrame(
        {
            "user_id": parse_ids(table, user),
            "item_id": parse_ids(table, item),
            "rating": (
                parse_numbers(table, rating, "float32")
                if rating
                else pd.Series(np.float32(1.0), index=table.frame.index, dtype="float32")
            ),
            "timestamp": parse_timestamps(table, timestamp, timestamp_unit),
        }
    )
    logger.debug("%s: parsed %d interactions", table.path, len(frame))
    return frame.reset_index(drop=True)
