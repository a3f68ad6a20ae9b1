"""Pick the loader for a dataset name from the ``data`` settings."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fedrec.data.amazon import load_amazon_reviews
from fedrec.data.interactions import DataError, InteractionData
from fedrec.data.movielens import (
    ensure_ml100k,
    load_ml100k,
    load_ml100k_grouplens,
    load_movielens_csv,
    load_movielens_dat,
)
from fedrec.data.synthetic import NAME as SYNTHETIC
from fedrec.data.synthetic import SyntheticSpec, load_synthetic
from fedrec.data.tabular import load_table

logger = logging.getLogger(__name__)

_FOLDER_LOADERS: dict[str, Callable[[Path], InteractionData]] = {
    "ml-1m": load_movielens_dat,
    "ml-20m": load_movielens_csv,
    "ml-25m": load_movielens_csv,
}
_TABLE_NAMES = ("csv", "parquet", "table")
KNOWN_DATASETS = ("ml-100k", *_FOLDER_LOADERS, "amazon", *_TABLE_NAMES, SYNTHETIC)
_USES_ITEMS_PATH = ("amazon", *_TABLE_NAMES)
_PATH_HELP = {
    "ml-1m": "the unpacked ml-1m folder (ratings.dat, movies.dat)",
    "ml-20m": "the unpacked ml-20m folder (ratings.csv, movies.csv)",
    "ml-25m": "the unpacked ml-25m folder (ratings.csv, movies.csv)",
    "amazon": "the reviews JSON-lines file (and data.items_path to the metadata file)",
    **{
        name: "the interactions file (.csv or .parquet; data.items_path optional)"
        for name in _TABLE_NAMES
    },
}


def load_dataset(
    name: str,
    path: str | None,
    cache_dir: Path,
    items_path: str | None = None,
    synthetic: SyntheticSpec | None = None,
) -> InteractionData:
    """Load dataset ``name`` (``data.name``) from ``path`` (``data.path``).

    ``ml-100k`` without a path is fetched into ``cache_dir``; with one, the folder
    may hold RecBole atomic files or the GroupLens ``u.data``/``u.item``. ``ml-1m``
    and ``ml-20m``/``ml-25m`` need the unpacked GroupLens folder. ``amazon`` takes the
    reviews file as ``path`` and the metadata file as ``items_path``; ``csv``,
    ``parquet`` and ``table`` take the interactions file and an optional item table.
    ``synthetic`` reads no file: it is generated from ``synthetic`` (its defaults
    when None).
    """
    key = name.strip().lower()
    if key not in KNOWN_DATASETS:
        raise DataError(
            f"unknown dataset data.name={name!r}; known names: {', '.join(KNOWN_DATASETS)}"
        )
    if items_path is not None and key not in _USES_ITEMS_PATH:
        raise DataError(
            f"data.items_path is only used by {', '.join(_USES_ITEMS_PATH)}, not {key!r}; remove it"
        )
    if key == SYNTHETIC:
        if path is not None:
            raise DataError(
                f"data.name=synthetic generates its data and reads no file; remove data.path={path!r}"
            )
        return load_synthetic(synthetic or SyntheticSpec())
    if key == "ml-100k" and path is None:
        return load_ml100k(ensure_ml100k(Path(cache_dir)))
    if path is None:
        raise DataError(f"dataset {key!r} needs data.path set to {_PATH_HELP[key]}")
    source = Path(path).expanduser()
    logger.info("loading %s from %s", key, source)
    if key == "ml-100k":
        return _load_ml100k_folder(source)
    if key in _FOLDER_LOADERS:
        return _FOLDER_LOADERS[key](_existing_folder(source, key))
    items = Path(items_path).expanduser() if items_path is not None else None
    if key == "amazon":
        return load_amazon_reviews(source, items)
    return load_table(source, items)


def _existing_folder(path: Path, key: str) -> Path:
    if not path.is_dir():
        raise DataError(f"data.path={str(path)!r} is not a folder; set it to {_PATH_HELP[key]}")
    return path


def _load_ml100k_folder(folder: Path) -> InteractionData:
    """Detect RecBole (``ml-100k.inter``) or GroupLens (``u.data``) layout."""
    if (folder / "ml-100k.inter").is_file():
        return load_ml100k(folder)
    if (folder / "u.data").is_file():
        return load_ml100k_grouplens(folder)
    raise DataError(
        f"data.path={str(folder)!r} holds neither RecBole files (ml-100k.inter, "
        "ml-100k.item) nor GroupLens files (u.data, u.item); point it at such a folder "
        "or leave it unset to download ML-100K into the cache"
    )
