"""MovieLens loaders: fetch ML-100K, read RecBole atomic files and GroupLens originals.

Every loader gives items the same text, which is what the encoder embeds::

    title = "Toy Story (1995)"
    text  = "Toy Story (1995). Genres: Animation, Children's, Comedy"

A missing year or genre list is left out (never rendered as "nan"); the
placeholder genres ``unknown`` and ``(no genres listed)`` count as missing.

MovieLens is licensed by GroupLens for research use: :func:`ensure_ml100k` only
ever writes into the cache folder it is given and refuses one inside the source
checkout, so the data never lands in the repository.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.data.interactions import DataError, InteractionData
from fedrec.data.validation import (
    Table,
    check_unique,
    parse_ids,
    parse_interactions,
    parse_numbers,
    parse_text,
    read_delimited,
    require_columns,
)

logger = logging.getLogger(__name__)

RECBOLE_REQUIREMENT = "recbole==1.2.1"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
WHEEL_MEMBER_DIR = "recbole/dataset_example/ml-100k/"
DOWNLOAD_TIMEOUT_S = 600

#: The 19 genre flag columns of GroupLens ``u.item``, in file order.
GROUPLENS_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
_NO_GENRE = ("", "unknown", "(no genres listed)")
_MANUAL_HELP = (
    "To set it up by hand, copy ml-100k.inter, ml-100k.item and ml-100k.user (found "
    f"under {WHEEL_MEMBER_DIR} inside the {RECBOLE_REQUIREMENT} wheel from PyPI) into "
    "{target}, or set data.path to a folder holding them (or GroupLens u.data and u.item)"
)


def ensure_ml100k(cache_dir: Path) -> Path:
    """Return ``cache_dir/ml-100k`` holding the RecBole ML-100K files, fetching them if absent.

    The files come from the ``recbole==1.2.1`` wheel on PyPI, downloaded with
    ``pip download`` into a temporary folder (recbole is never installed); only the
    three ``ml-100k.{inter,item,user}`` members are extracted, each written under a
    temporary name and renamed, so an interrupted run never leaves a partial file.
    """
    cache_dir = Path(cache_dir).expanduser()
    target = cache_dir / "ml-100k"
    if all((target / name).is_file() for name in ML100K_FILES):
        logger.info("ML-100K found in %s", target)
        return target
    _refuse_repository(cache_dir)
    target.mkdir(parents=True, exist_ok=True)
    logger.info("ML-100K not in %s; fetching it from the %s wheel", target, RECBOLE_REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix="fedrec-recbole-") as tmpdir:
        wheel = _download_wheel(Path(tmpdir), target)
        _extract_members(wheel, target)
    logger.info("ML-100K written to %s", target)
    return target


def _refuse_repository(cache_dir: Path) -> None:
    """Raise if ``cache_dir`` lies inside the source checkout (the data is licensed)."""
    checkout = Path(__file__).resolve().parents[2]
    if not ((checkout / ".git").exists() or (checkout / "pyproject.toml").exists()):
        return
    if cache_dir.resolve().is_relative_to(checkout):
        raise DataError(
            f"cache folder {cache_dir} is inside the source checkout {checkout}; MovieLens "
            "is licensed and must not be stored in the repository. Choose a cache folder "
            "outside it (e.g. ~/.cache/fedrec)"
        )


def _download_wheel(tmpdir: Path, target: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        RECBOLE_REQUIREMENT, "-d", str(tmpdir),
    ]  # fmt: skip
    logger.info("running: %s", " ".join(command))
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, check=False, timeout=DOWNLOAD_TIMEOUT_S
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(
            f"could not download {RECBOLE_REQUIREMENT} ({exc}). "
            + _MANUAL_HELP.format(target=target)
        ) from exc
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise DataError(
            f"pip download of {RECBOLE_REQUIREMENT} failed (exit {result.returncode}: "
            f"{' / '.join(detail)}). " + _MANUAL_HELP.format(target=target)
        )
    wheels = sorted(tmpdir.glob("recbole-*.whl"))
    if not wheels:
        raise DataError(
            f"pip download of {RECBOLE_REQUIREMENT} produced no wheel in {tmpdir}. "
            + _MANUAL_HELP.format(target=target)
        )
    logger.info("downloaded %s", wheels[0].name)
    return wheels[0]


def _extract_members(wheel: Path, target: Path) -> None:
    try:
        with zipfile.ZipFile(wheel) as archive:
            for name in ML100K_FILES:
                member = WHEEL_MEMBER_DIR + name
                try:
                    info = archive.getinfo(member)
                except KeyError:
                    raise DataError(
                        f"{wheel.name} has no {member}. " + _MANUAL_HELP.format(target=target)
                    ) from None
                final = target / name
                partial = target / f".{name}.partial-{os.getpid()}"
                try:
                    with archive.open(info) as source, open(partial, "wb") as sink:
                        shutil.copyfileobj(source, sink)
                    os.replace(partial, final)
                finally:
                    partial.unlink(missing_ok=True)
                logger.info("extracted %s (%d bytes)", final, info.file_size)
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{wheel.name} is not a valid wheel ({exc}). " + _MANUAL_HELP.format(target=target)
        ) from exc


def load_ml100k(folder: Path) -> InteractionData:
    """Load ML-100K from RecBole atomic files ``ml-100k.inter`` and ``ml-100k.item``."""
    folder = Path(folder)
    inter = _read_atomic(folder / "ml-100k.inter")
    interactions = parse_interactions(inter)
    item_table = _read_atomic(folder / "ml-100k.item")
    require_columns(item_table, ["item_id", "movie_title"])
    frame = item_table.frame
    items = _movie_items(
        item_table,
        "item_id",
        titles=parse_text(item_table, "movie_title"),
        years=parse_text(item_table, "release_year") if "release_year" in frame else None,
        genres=parse_text(item_table, "class") if "class" in frame else None,
        genre_sep=None,
    )
    logger.info("%s: %d interactions, %d items", folder, len(interactions), len(items))
    return InteractionData("ml-100k", interactions, items)


def _read_atomic(path: Path) -> Table:
    """Read a RecBole atomic file, dropping the ``:type`` suffix of header names."""
    table = read_delimited(path, sep="\t", quoting=csv.QUOTE_NONE)
    table.frame.columns = [c.split(":", 1)[0] for c in table.frame.columns]
    return table


def load_ml100k_grouplens(folder: Path) -> InteractionData:
    """Load ML-100K in the original GroupLens layout (``u.data``, ``u.item``)."""
    folder = Path(folder)
    ratings = read_delimited(
        folder / "u.data",
        sep="\t",
        names=["user_id", "item_id", "rating", "timestamp"],
        quoting=csv.QUOTE_NONE,
    )
    interactions = parse_interactions(ratings)
    flag_names = [f"genre_{i}" for i in range(len(GROUPLENS_GENRES))]
    item_table = read_delimited(
        folder / "u.item",
        sep="|",
        names=["item_id", "title", "release_date", "video_release_date", "url", *flag_names],
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
    )
    genres = pd.Series("", index=item_table.frame.index)
    for flag, genre in zip(flag_names, GROUPLENS_GENRES, strict=True):
        on = parse_numbers(item_table, flag, "float64") > 0
        genres = genres + np.where(on, genre + "|", "")
    items = _movie_items(
        item_table,
        "item_id",
        titles=parse_text(item_table, "title"),
        years=None,
        genres=genres,
        genre_sep="|",
    )
    logger.info("%s: %d interactions, %d items", folder, len(interactions), len(items))
    return InteractionData("ml-100k", interactions, items)


def load_movielens_dat(folder: Path) -> InteractionData:
    """Load the GroupLens ``::``-separated layout of ML-1M (``ratings.dat``, ``movies.dat``)."""
    folder = Path(folder)
    ratings = read_delimited(
        folder / "ratings.dat",
        sep="::",
        names=["user_id", "item_id", "rating", "timestamp"],
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
    )
    interactions = parse_interactions(ratings)
    movies = read_delimited(
        folder / "movies.dat",
        sep="::",
        names=["item_id", "title", "genres"],
        encoding="latin-1",
        quoting=csv.QUOTE_NONE,
    )
    items = _movie_items(
        movies,
        "item_id",
        titles=parse_text(movies, "title"),
        years=None,
        genres=parse_text(movies, "genres"),
        genre_sep="|",
    )
    logger.info("%s: %d interactions, %d items", folder, len(interactions), len(items))
    return InteractionData(folder.resolve().name or "movielens", interactions, items)


def load_movielens_csv(folder: Path) -> InteractionData:
    """Load the CSV layout of ML-20M, ML-25M and ml-latest (``ratings.csv``, ``movies.csv``)."""
    folder = Path(folder)
    ratings = read_delimited(folder / "ratings.csv")
    interactions = parse_interactions(ratings, user="userId", item="movieId")
    movies = read_delimited(folder / "movies.csv")
    require_columns(movies, ["movieId", "title", "genres"])
    items = _movie_items(
        movies,
        "movieId",
        titles=parse_text(movies, "title"),
        years=None,
        genres=parse_text(movies, "genres"),
        genre_sep="|",
    )
    logger.info("%s: %d interactions, %d items", folder, len(interactions), len(items))
    return InteractionData(folder.resolve().name or "movielens", interactions, items)


def _movie_items(
    table: Table,
    id_column: str,
    *,
    titles: pd.Series,
    years: pd.Series | None,
    genres: pd.Series | None,
    genre_sep: str | None,
) -> pd.DataFrame:
    """Build the item table: ``title`` with its year, ``text`` with title and genres.

    ``years`` (RecBole's separate ``release_year``) is appended as " (1995)" when it
    is a four-digit year and the title does not already end with one. ``genres``
    are split on ``genre_sep`` (whitespace when None). An empty title becomes
    "Movie <id>".
    """
    ids = parse_ids(table, id_column)
    check_unique(table, ids, id_column)
    title = titles.astype(object)
    title = title.where(title != "", "Movie " + ids.astype(object))
    if years is not None:
        year = years.astype(object).str.strip()
        add = year.str.fullmatch(r"\d{4}") & ~title.str.contains(r"\(\d{4}\)$", regex=True)
        title = title.where(~add, title + " (" + year + ")")
    genre_text = (
        _join_genres(genres, genre_sep)
        if genres is not None
        else pd.Series("", index=ids.index, dtype=object)
    )
    text = title + np.where(genre_text != "", ". Genres: " + genre_text, "")
    return pd.DataFrame(
        {"item_id": ids, "title": title.astype(str), "text": text.astype(str)}
    ).reset_index(drop=True)


def _join_genres(genres: pd.Series, sep: str | None) -> pd.Series:
    """ "Animation|Children's" -> "Animation, Children's", dropping placeholder genres."""
    parts = genres.astype(object).str.split(sep).explode().astype(object).fillna("").str.strip()
    parts = parts[~parts.isin(_NO_GENRE)]
    joined = parts.groupby(level=0, sort=False).agg(", ".join)
    return joined.reindex(genres.index, fill_value="").astype(object)
