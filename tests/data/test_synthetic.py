"""The synthetic generator: deterministic, shaped like real data, usable by the whole pipeline."""

import time

import numpy as np
import pandas as pd
import pytest

from fedrec.config import ConfigError, load_config
from fedrec.data.interactions import DataError
from fedrec.data.registry import KNOWN_DATASETS, load_dataset
from fedrec.data.synthetic import SyntheticSpec, generate_synthetic
from fedrec.partition import assign_users
from fedrec.prepare import prepare, prepared_key

SMALL = SyntheticSpec(num_users=300, num_items=400, seed=7)


@pytest.fixture(scope="module")
def small():
    return generate_synthetic(SMALL)


def test_same_seed_same_data_other_seed_other_data(small):
    data, _ = small
    again, _ = generate_synthetic(SMALL)
    pd.testing.assert_frame_equal(data.interactions, again.interactions)
    pd.testing.assert_frame_equal(data.items, again.items)
    other, _ = generate_synthetic(SyntheticSpec(num_users=300, num_items=400, seed=8))
    assert not other.interactions.equals(data.interactions)


def test_sizes_ids_ratings_and_schema(small):
    data, _ = small
    inter = data.interactions
    assert inter["user_id"].nunique() == 300
    assert set(data.items["item_id"]) == {str(i) for i in range(1, 401)}
    assert inter["rating"].dtype == np.float32 and inter["timestamp"].dtype == np.int64
    assert set(inter["rating"].unique()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert not inter.duplicated(["user_id", "item_id"]).any()


def test_every_user_has_the_minimum_and_activity_is_heavy_tailed():
    data, _ = generate_synthetic(SyntheticSpec(num_users=3000, num_items=2000, seed=1, min_interactions=6))
    counts = data.interactions.groupby("user_id").size()
    assert counts.min() >= 6
    assert counts.max() <= 2000 // 3
    # heavy tail: the busiest 1 % of users are far above the median user
    assert counts.quantile(0.99) > 5 * counts.median()


def test_timestamps_strictly_increase_within_each_user(small):
    inter = small[0].interactions
    steps = inter.groupby("user_id")["timestamp"].diff().dropna()
    assert (steps > 0).all()


def test_popularity_is_power_law_like():
    data, _ = generate_synthetic(SyntheticSpec(num_users=2000, num_items=1000, seed=3))
    counts = np.sort(data.interactions["item_id"].value_counts().to_numpy())[::-1]
    top_tenth = counts[: len(counts) // 10].sum() / counts.sum()
    assert top_tenth > 0.35  # uniform popularity would give about 0.10


def test_users_pick_mostly_from_their_own_clusters(small):
    data, truth = small
    users = data.interactions["user_id"].astype(int).to_numpy() - 1
    clusters = truth.item_cluster[data.interactions["item_id"].astype(int).to_numpy() - 1]
    own = (clusters == truth.user_clusters[users, 0]) | (clusters == truth.user_clusters[users, 1])
    per_user = pd.Series(own).groupby(users).mean()
    chance = 2 / SMALL.clusters
    assert per_user.median() > 0.7 > 2 * chance
    assert own.mean() > 0.6


def test_item_text_carries_the_cluster(small):
    data, truth = small
    first_genre = data.items["text"].str.extract(r"Genres: ([^,]+)")[0]
    # one genre per cluster, and it is the first genre of every item of that cluster
    by_cluster = pd.Series(first_genre.to_numpy()).groupby(truth.item_cluster).nunique()
    assert (by_cluster == 1).all() and first_genre.nunique() == SMALL.clusters
    assert data.items["text"].str.contains(r"^\S.* \(\d{4}\)\. Genres: ").all()


def test_ten_thousand_users_in_seconds():
    start = time.perf_counter()
    data, _ = generate_synthetic(SyntheticSpec(num_users=10_000, num_items=5_000, seed=0))
    assert time.perf_counter() - start < 20  # about 1 s alone; slack for a loaded machine
    assert data.interactions["user_id"].nunique() == 10_000


def test_registry_loads_it_and_refuses_a_path(tmp_path):
    assert "synthetic" in KNOWN_DATASETS
    data = load_dataset("synthetic", None, tmp_path, synthetic=SMALL)
    assert data.name == "synthetic" and data.interactions["user_id"].nunique() == 300
    with pytest.raises(DataError, match="reads no file; remove data.path"):
        load_dataset("synthetic", "ratings.csv", tmp_path)


def test_settings_are_validated_and_only_synthetic_caches_depend_on_them():
    with pytest.raises(ConfigError, match="data.synthetic-users"):
        load_config({"data.synthetic-users": 0})
    with pytest.raises(ConfigError, match="data.synthetic-items"):
        load_config({"data.name": "synthetic", "data.synthetic-items": 10})
    base = load_config({"data.name": "synthetic"})
    other_seed = load_config({"data.name": "synthetic", "data.synthetic-seed": 1})
    assert prepared_key(base.data, base.eval) != prepared_key(other_seed.data, other_seed.eval)
    ml = load_config({})
    ml_other = load_config({"data.synthetic-seed": 1})
    assert prepared_key(ml.data, ml.eval) == prepared_key(ml_other.data, ml_other.eval)


def test_prepare_and_partitioners_work_on_it(tmp_path):
    config = load_config(
        {
            "data.name": "synthetic",
            "data.synthetic-users": 120,
            "data.synthetic-items": 300,
            "data.cache-dir": str(tmp_path),
            "eval.num-negatives": 20,
        }
    )
    prepared = prepare(config.data, config.eval)
    assert prepared.num_users == 120 and prepared.num_items == 300
    assert len(prepared.holdout("test")) == 120
    assert prepared.candidates("test").shape == (120, 21)
    counts = prepared.users["num_train"].to_numpy()
    assert counts.min() >= 5 - 2  # at least 5 interactions, two held out
    for scheme, parts in (("user", 120), ("iid", 10), ("dirichlet", 8)):
        settings = load_config({"partition.scheme": scheme}).partition
        assignment = assign_users(settings, counts, parts, seed=0)
        assert set(np.unique(assignment)) == set(range(parts))
