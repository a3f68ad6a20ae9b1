"""Interactions table -> implicit feedback -> leave-one-out split -> cached on disk.

Preparation runs once per dataset and settings (in the ServerApp, or ahead of a
simulation); every client afterwards reads only its own users' rows from the
cache. The cache folder is written under a temporary name and renamed when
complete, so an interrupted preparation never leaves a half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
from datasets import Dataset, load_from_disk

from fedrec.config import DataConfig, EvalConfig
from fedrec.data.interactions import DataError, InteractionData
from fedrec.data.registry import load_dataset
from fedrec.data.synthetic import NAME as SYNTHETIC
from fedrec.data.synthetic import SyntheticSpec
from fedrec.split import filter_min_interactions, implicit_feedback, leave_one_out

log = logging.getLogger(__name__)

PREPARED_VERSION = 1


def _sort_key(ids: pd.Series) -> pd.Series:
    """Numeric order when every id is a number, else lexicographic."""
    numeric = pd.to_numeric(ids, errors="coerce")
    return numeric if numeric.notna().all() else ids


def order_catalogue(items: pd.DataFrame) -> pd.DataFrame:
    """The catalogue in index order (by id, numerically when every id is a number), with
    ``item_idx``. Server and devices index items this way, so indices agree everywhere."""
    items = items.drop_duplicates("item_id").reset_index(drop=True)
    items = items.iloc[np.argsort(_sort_key(items["item_id"]).to_numpy(), kind="stable")]
    return items.reset_index(drop=True).assign(item_idx=lambda f: np.arange(len(f)))


def catalogue_digest(items: pd.DataFrame) -> str:
    """A short fingerprint of an ordered catalogue's ids and texts.

    The server sends it with every instruction; a device whose catalogue differs
    (other items, order or text, hence other item indices and embeddings) refuses
    to train instead of sending a meaningless update.
    """
    digest = hashlib.sha256()
    for item_id, text in zip(items["item_id"].astype(str), items["text"].astype(str)):
        digest.update(f"{item_id}\t{text}\n".encode())
    return digest.hexdigest()[:16]


def sample_negatives(
    seen: list[np.ndarray], num_items: int, num_negatives: int, seed: int
) -> np.ndarray:
    """For each user, ``num_negatives`` distinct items outside ``seen[u]``, uniformly.

    Uses ``numpy.random.default_rng(seed)``, drawing users in index order, so the
    candidates are reproducible from the seed alone.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((len(seen), num_negatives), dtype=np.int64)
    for user, items in enumerate(seen):
        available = num_items - len(np.unique(items))
        if available < num_negatives:
            raise DataError(
                f"user index {user} has seen {num_items - available} of {num_items} items; "
                f"cannot sample {num_negatives} negatives (lower eval.num-negatives)"
            )
        mask = np.ones(num_items, dtype=bool)
        mask[items] = False
        out[user] = rng.choice(np.flatnonzero(mask), size=num_negatives, replace=False)
    return out


@dataclass(frozen=True)
class PreparedData:
    """A prepared dataset on disk, read lazily."""

    root: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / "meta.json").read_text())

    @property
    def num_users(self) -> int:
        return int(self.meta["num_users"])

    @property
    def num_items(self) -> int:
        return int(self.meta["num_items"])

    @cached_property
    def items(self) -> pd.DataFrame:
        """item_idx, item_id, title, text."""
        return pd.read_parquet(self.root / "items.parquet")

    @cached_property
    def catalogue_digest(self) -> str:
        """Fingerprint of the item catalogue (:func:`catalogue_digest`)."""
        return catalogue_digest(self.items)

    @cached_property
    def users(self) -> pd.DataFrame:
        """user_idx, user_id, num_train."""
        return pd.read_parquet(self.root / "users.parquet")

    @cached_property
    def train(self) -> Dataset:
        """Training interactions (user_idx, item_idx, position), memory-mapped, by user."""
        return load_from_disk(str(self.root / "train"))

    @cached_property
    def user_offsets(self) -> np.ndarray:
        """Rows of user u in ``train`` are ``offsets[u]:offsets[u+1]``."""
        return np.load(self.root / "user_offsets.npy")

    def holdout(self, split: str) -> pd.DataFrame:
        """The ``valid`` or ``test`` interactions: user_idx, item_idx (one per user)."""
        return pd.read_parquet(self.root / f"{split}.parquet")

    def candidates(self, split: str) -> np.ndarray:
        """[U, 1 + negatives] item indices; column 0 is the held-out item.

        Split ``cold`` (``eval.cold-items``): rows of users without a cold item are -1.
        """
        return np.load(self.root / f"candidates_{split}.npy")

    @property
    def has_cold_test(self) -> bool:
        """Whether a cold-start test was prepared (``eval.cold-items`` > 0)."""
        return (self.root / "candidates_cold.npy").exists()

    @cached_property
    def cold_items(self) -> np.ndarray:
        """Sorted indices of every item held out of training (``eval.cold-items``); empty without."""
        if not self.has_cold_test:
            return np.zeros(0, dtype=np.int64)
        path = self.root / "cold_items.npy"
        if not path.exists():
            raise DataError(f"{self.root}: prepared before cold_items.npy was written; delete it to prepare again")
        return np.load(path)

    def unlisted_in_training(self, evaluation: EvalConfig) -> frozenset[int]:
        """Items the catalogue does not list while training: the cold items when they
        join after training (``eval.cold-items-join``), else none."""
        if evaluation.cold_items_join == "after-training":
            return frozenset(int(i) for i in self.cold_items)
        return frozenset()

    def train_items_of(self, users: np.ndarray) -> list[np.ndarray]:
        """Chronological training items of each given user."""
        offsets = self.user_offsets
        rows = np.concatenate([np.arange(offsets[u], offsets[u + 1]) for u in users]) if len(users) else []
        items = np.asarray(self.train.select(rows)["item_idx"], dtype=np.int64) if len(rows) else np.zeros(0, np.int64)
        lengths = offsets[np.asarray(users) + 1] - offsets[np.asarray(users)]
        return np.split(items, np.cumsum(lengths)[:-1]) if len(users) else []

    @cached_property
    def all_train_items(self) -> list[np.ndarray]:
        """Chronological training items of every user (server-side use only)."""
        items = np.asarray(self.train["item_idx"], dtype=np.int64)
        return np.split(items, self.user_offsets[1:-1])


SYNTHETIC_SETTINGS = ("synthetic_users", "synthetic_items", "synthetic_seed")


def synthetic_spec(data: DataConfig) -> SyntheticSpec:
    """The generator settings of ``data.name = "synthetic"``.

    Its users have at least ``data.min-user-interactions`` interactions (and at least
    5), so the minimum-interactions filter keeps every generated user.
    """
    return SyntheticSpec(
        num_users=data.synthetic_users,
        num_items=data.synthetic_items,
        seed=data.synthetic_seed,
        min_interactions=max(5, data.min_user_interactions),
    )


def prepared_key(data: DataConfig, evaluation: EvalConfig) -> str:
    """A short hash of every setting that changes the prepared data."""
    settings = asdict(data)
    settings.pop("cache_dir")
    if data.name.strip().lower() != SYNTHETIC:  # other datasets' keys (and caches) stay as they were
        for key in SYNTHETIC_SETTINGS:
            settings.pop(key)
    settings["eval_negatives"] = evaluation.num_negatives
    settings["eval_seed"] = evaluation.seed
    if evaluation.cold_items:  # caches prepared without cold items keep their keys
        settings["eval_cold_items"] = evaluation.cold_items
    settings["version"] = PREPARED_VERSION
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return f"{data.name}-{digest}"


def build_tables(raw: InteractionData, data: DataConfig) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Filter, index and split: (users, items, interactions with split labels)."""
    interactions = implicit_feedback(raw.interactions, data.min_rating or None)
    interactions = filter_min_interactions(interactions, data.min_user_interactions)
    if interactions.empty:
        raise DataError(
            f"{raw.name}: no user has {data.min_user_interactions}+ interactions with "
            f"rating >= {data.min_rating}; lower data.min-user-interactions or data.min-rating"
        )
    user_ids = pd.Series(interactions["user_id"].unique())
    user_ids = user_ids.iloc[np.argsort(_sort_key(user_ids).to_numpy(), kind="stable")]
    if data.max_users:
        user_ids = user_ids.iloc[: data.max_users]
        interactions = interactions[interactions["user_id"].isin(set(user_ids))]
    items = order_catalogue(raw.items)
    users = pd.DataFrame({"user_id": user_ids.to_numpy(), "user_idx": np.arange(len(user_ids))})
    interactions = interactions.assign(
        user_idx=interactions["user_id"].map(dict(zip(users["user_id"], users["user_idx"]))),
        item_idx=interactions["item_id"].map(dict(zip(items["item_id"], items["item_idx"]))),
    )
    return users, items, interactions


def hold_out_cold_items(
    interactions: pd.DataFrame, evaluation: EvalConfig, tie_break: str
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Remove ``eval.cold-items`` of the interacted items from the interactions.

    Returns the warm interactions and, per user who had a cold item, their latest
    cold interaction (user_idx, item_idx), or None when the setting is 0. The
    items are drawn with ``default_rng(eval.seed + 2)``.
    """
    if not evaluation.cold_items:
        return interactions, None
    interacted = np.unique(interactions["item_idx"].to_numpy())
    rng = np.random.default_rng(evaluation.seed + 2)
    count = max(1, round(evaluation.cold_items * len(interacted)))
    cold_items = rng.choice(interacted, size=count, replace=False)
    is_cold = interactions["item_idx"].isin(set(cold_items.tolist())).to_numpy()
    warm = interactions[~is_cold]
    short = warm.groupby("user_idx").size()
    lost = sorted(set(interactions["user_idx"]) - set(short.index)) or list(short.index[short < 3])
    if lost:
        raise DataError(
            f"setting 'eval.cold-items'={evaluation.cold_items}: user index {lost[0]} keeps fewer than 3 "
            f"interactions with other items ({len(lost)} such users); lower eval.cold-items or raise "
            "data.min-user-interactions"
        )
    order = np.argsort(interactions["timestamp"].to_numpy()[is_cold], kind="stable")
    cold = interactions[is_cold].iloc[order]
    if tie_break == "item":  # the same rule as the leave-one-out split for equal timestamps
        cold = cold.sort_values(["timestamp", "item_idx"], kind="stable")
    latest = cold.groupby("user_idx", sort=True).tail(1).sort_values("user_idx")
    frame = latest[["user_idx", "item_idx"]].reset_index(drop=True)
    frame.attrs["num_cold_items"] = count
    frame.attrs["cold_items"] = sorted(int(i) for i in cold_items)
    log.info("Cold-start test: %d items held out of training, %d users tested on one", count, len(frame))
    return warm, frame


def cold_candidates(
    cold: pd.DataFrame, seen: list[np.ndarray], num_users: int, num_items: int, evaluation: EvalConfig
) -> np.ndarray:
    """[U, 1 + negatives] candidates of the cold test; rows of users without one are -1."""
    out = np.full((num_users, 1 + evaluation.num_negatives), -1, dtype=np.int64)
    users = cold["user_idx"].to_numpy()
    negatives = sample_negatives([seen[u] for u in users], num_items, evaluation.num_negatives, evaluation.seed + 3)
    out[users] = np.column_stack([cold["item_idx"].to_numpy(), negatives])
    return out


def prepare(data: DataConfig, evaluation: EvalConfig) -> PreparedData:
    """Prepare (or reuse the cached) dataset for these settings."""
    root = data.cache_path / "prepared" / prepared_key(data, evaluation)
    if (root / "meta.json").exists():
        return PreparedData(root)
    log.info("Preparing %s into %s", data.name, root)
    raw = load_dataset(
        data.name,
        data.path or None,
        data.cache_path,
        items_path=data.items_path or None,
        synthetic=synthetic_spec(data),
    )
    users, items, interactions = build_tables(raw, data)
    interactions, cold = hold_out_cold_items(interactions, evaluation, data.tie_break)
    split = leave_one_out(
        interactions[["user_id", "item_id", "rating", "timestamp", "user_idx", "item_idx"]],
        tie_break=data.tie_break,
    )
    train = split.train.sort_values(["user_idx", "position"], kind="stable")
    counts = np.bincount(train["user_idx"].to_numpy(), minlength=len(users))
    users = users.assign(num_train=counts)
    valid = split.valid.sort_values("user_idx")[["user_idx", "item_idx"]].reset_index(drop=True)
    test = split.test.sort_values("user_idx")[["user_idx", "item_idx"]].reset_index(drop=True)

    everything = interactions if cold is None else pd.concat([interactions, cold])
    seen = [
        np.asarray(g, dtype=np.int64)
        for _, g in everything.groupby("user_idx", sort=True)["item_idx"]
    ]
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".tmp-"))
    try:
        items[["item_idx", "item_id", "title", "text"]].to_parquet(tmp / "items.parquet")
        users.to_parquet(tmp / "users.parquet")
        Dataset.from_pandas(
            train[["user_idx", "item_idx", "position"]].reset_index(drop=True)
        ).save_to_disk(str(tmp / "train"))
        np.save(tmp / "user_offsets.npy", np.concatenate([[0], np.cumsum(counts)]))
        valid.to_parquet(tmp / "valid.parquet")
        test.to_parquet(tmp / "test.parquet")
        for name, frame, seed in (("test", test, evaluation.seed), ("valid", valid, evaluation.seed + 1)):
            negatives = sample_negatives(seen, len(items), evaluation.num_negatives, seed)
            np.save(tmp / f"candidates_{name}.npy", np.column_stack([frame["item_idx"], negatives]))
        if cold is not None:
            np.save(tmp / "cold_items.npy", np.asarray(cold.attrs["cold_items"], dtype=np.int64))
            cold.to_parquet(tmp / "cold.parquet")
            np.save(tmp / "candidates_cold.npy", cold_candidates(cold, seen, len(users), len(items), evaluation))
        meta = {
            "dataset": raw.name,
            "num_users": len(users),
            "num_items": len(items),
            "num_train": len(train),
            "settings": {k: v for k, v in asdict(data).items() if k != "cache_dir"},
            "eval_negatives": evaluation.num_negatives,
            "eval_seed": evaluation.seed,
            "negative_sampler": "numpy default_rng(eval.seed), uniform over items the user never interacted with",
        }
        if cold is not None:
            meta["cold_items"] = int(cold.attrs["num_cold_items"])
            meta["cold_users"] = len(cold)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            tmp.rename(root)
        except OSError:  # prepared concurrently by another process: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Prepared %d users, %d items, %d training interactions", len(users), len(items), len(train))
    return PreparedData(root)
