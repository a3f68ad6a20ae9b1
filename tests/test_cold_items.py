"""Cold-start evaluation: items held out of training, tested from their text alone."""

import numpy as np
import pytest
import torch

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, load_config
from fedrec.evaluation import evaluate_scorer, popularity_scorer
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.prepare import prepare
from tests.conftest import toy_run_config, toy_server

TABLE_KEY = "base_model.model.item_identity.table.weight"
JOIN_SETTINGS = {"eval.cold-items": 0.2, "model.item-ids": True, "train.id-lr": 0.05, "train.max-steps": 6}


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
    assert cold_items <= set(prepared.cold_items.tolist()) and len(prepared.cold_items) == 8
    assert not set(prepared.cold_items.tolist()) & (trained | held_out)
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
    with pytest.raises(ConfigError, match="eval.cold-items-join.*needs eval.cold-items > 0"):
        load_config({"eval.cold-items-join": "after-training"})
    with pytest.raises(ConfigError, match="eval.cold-items-join"):
        load_config({"eval.cold-items": 0.1, "eval.cold-items-join": "later"})


@pytest.mark.parametrize("join", ["before-training", "after-training"])
def test_cold_items_joining_after_training_are_never_negatives_and_keep_zero_identities(tmp_path, join):
    config, prepared, table, server = toy_server(tmp_path, **JOIN_SETTINGS, **{"eval.cold-items-join": join})
    cold = torch.from_numpy(prepared.cold_items)
    rows = {}
    for partition in range(3):  # three single-user clients' first rounds
        data = load_client_data(config, prepared, partition, 24)
        assert data.unlisted == (set(cold.tolist()) if join == "after-training" else set())
        out = run_local_round(config, data, table, server.adapters(), server_round=1)
        rows[partition] = out.adapters[TABLE_KEY][cold]
    moved = max(float(r.abs().max()) for r in rows.values())
    if join == "after-training":
        assert moved == 0.0  # never drawn as negatives, so no gradient reaches their rows
    else:
        assert moved > 0.0  # drawn as negatives, pushed away from the users


@pytest.mark.parametrize("join", ["before-training", "after-training"])
def test_evaluation_scores_items_that_join_after_training_from_their_text(tmp_path, join):
    _, prepared, _, server = toy_server(tmp_path, **JOIN_SETTINGS, **{"eval.cold-items-join": join})
    weight = server.model.item_identity.table.weight
    with torch.no_grad():  # as DP noise would leave them
        weight.copy_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)))
    before = weight.detach().clone()
    server.evaluate("test")
    cold = torch.from_numpy(prepared.cold_items)
    warm = torch.ones(len(weight), dtype=torch.bool)
    warm[cold] = False
    torch.testing.assert_close(weight.detach()[warm], before[warm], rtol=0, atol=0)
    if join == "after-training":
        assert weight.detach()[cold].abs().max() == 0
    else:
        torch.testing.assert_close(weight.detach()[cold], before[cold], rtol=0, atol=0)
