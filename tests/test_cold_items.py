"""Cold-start evaluation: items held out of training, tested from their text alone."""

import numpy as np
import pytest

from fedrec.config import ConfigError, load_config
from fedrec.evaluation import evaluate_scorer, popularity_scorer
from fedrec.global_model import GlobalModel
from fedrec.prepare import prepare
from tests.conftest import toy_run_config


@pytest.fixture()
def cold_prepared(tmp_path):
    config = load_config(toy_run_config(tmp_path, **{"eval.cold-items": 0.2}))
    return config, prepare(config.data, config.eval)


def test_cold_items_never_reach_training_and_each_user_who_had_one_is_tested(cold_prepared, tmp_path):
    _, prepared = cold_prepared
    candidates = prepared.candidates("cold")
    cold_users = np.flatnonzero(candidates[:, 0] >= 0)
    cold_items = set(candidates[cold_users, 0].tolist())
    assert prepared.meta["cold_items"] == 8 and 0 < len(cold_users) == prepared.meta["cold_users"]
    trained = set(np.asarray(prepared.train["item_idx"]).tolist())
    held_out = {int(i) for s in ("valid", "test") for i in prepared.holdout(s)["item_idx"]}
    assert not cold_items & (trained | held_out)
    for user in cold_users:  # negatives are items the user never had, warm or cold
        history = set(prepared.all_train_items[user].tolist())
        assert not set(candidates[user, 1:].tolist()) & (history | {candidates[user, 0]})
    warm = load_config(toy_run_config(tmp_path / "warm"))
    assert not prepare(warm.data, warm.eval).has_cold_test


def test_popularity_cannot_rank_cold_items_but_the_text_model_can_score_them(cold_prepared):
    config, prepared = cold_prepared
    popular = evaluate_scorer(popularity_scorer(prepared), prepared, "cold", k=5)
    assert popular["hr@5"] == 0.0  # zero training count: tied last, pessimistic ranks
    metrics = GlobalModel(config, prepared).evaluate()
    assert metrics["num_users_cold"] == prepared.meta["cold_users"]
    assert metrics["hr@10_cold"] == 1.0  # 10 candidates and k = 10
    assert 0.0 <= metrics["hr@10_full_cold"] <= 1.0 and "ndcg@10_full_cold" in metrics


def test_cold_items_setting_is_checked():
    with pytest.raises(ConfigError, match="eval.cold-items"):
        load_config({"eval.cold-items": 0.6})
