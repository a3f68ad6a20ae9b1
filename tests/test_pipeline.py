"""Prepare -> partition -> local round -> global evaluation, without Flower."""

import numpy as np
import pytest
import torch

from fedrec.client_data import PartitionError, load_client_data
from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.evaluation import evaluate_scorer, popularity_scorer
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.model.build import token_table
from fedrec.prepare import prepare
from tests.conftest import toy_run_config


def test_prepare_splits_and_caches(toy_prepared):
    config, prepared = toy_prepared
    assert prepared.num_users == 24 and prepared.num_items == 40
    test = prepared.holdout("test")
    candidates = prepared.candidates("test")
    assert candidates.shape == (24, 10)
    assert (candidates[:, 0] == test["item_idx"].to_numpy()).all()
    for user, items in enumerate(prepared.all_train_items):
        seen = set(items) | {int(prepared.holdout("valid")["item_idx"][user]), int(test["item_idx"][user])}
        assert not set(candidates[user, 1:]) & seen
        assert len(set(candidates[user, 1:])) == 9
    again = prepare(config.data, config.eval)
    assert again.root == prepared.root


def test_client_reads_only_its_users(toy_prepared):
    config, prepared = toy_prepared
    data = load_client_data(config, prepared, partition_id=3, num_partitions=24)
    assert data.users.tolist() == [3]
    assert data.sequences[0].tolist() == prepared.all_train_items[3].tolist()
    with pytest.raises(PartitionError, match="num-supernodes=24"):
        load_client_data(config, prepared, 0, num_partitions=10)


def test_clients_train_on_the_validation_item_only_when_asked(tmp_path):
    config = load_config(toy_run_config(tmp_path, **{"train.include-valid-item": True}))
    prepared = prepare(config.data, config.eval)
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    test = prepared.holdout("test")["item_idx"].to_numpy()
    data = load_client_data(config, prepared, partition_id=3, num_partitions=24)
    assert data.sequences[0].tolist() == [*prepared.all_train_items[3].tolist(), int(valid[3])]
    assert int(test[3]) not in data.sequences[0]
    model = GlobalModel(config, prepared)
    assert 0.0 <= model.evaluate("test")["hr@10"] <= 1.0
    with pytest.raises(ConfigError, match="train.include-valid-item"):
        model.evaluate("valid")


def test_local_round_changes_adapters_and_reports(toy_prepared):
    config, prepared = toy_prepared
    model = GlobalModel(config, prepared)
    start = model.adapters()
    data = load_client_data(config, prepared, 0, 24)
    output = run_local_round(config, data, token_table(prepared, config.model), start, server_round=1)
    batches = -(-output.num_examples // 8)  # one local epoch of batch 8, capped at max-steps=2
    assert output.result.steps == min(2, batches)
    assert output.result.examples == min(output.num_examples, 16)
    assert set(output.adapters) == set(start)
    assert any(not torch.equal(output.adapters[k], start[k]) for k in start)


def test_evaluation_of_model_and_popularity(toy_prepared):
    config, prepared = toy_prepared
    model = GlobalModel(config, prepared)
    metrics = model.evaluate("test")
    for key in ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full", "mrr", "f1@10"):
        assert 0.0 <= metrics[key] <= 1.0
    # 10 candidates and K=10: every sampled rank is a hit.
    assert metrics["hr@10"] == 1.0
    pop = evaluate_scorer(popularity_scorer(prepared), prepared, "test", k=1)
    assert 0.0 <= pop["hr@1"] <= 1.0


def _oracle(prepared):
    """A scorer that gives each user's held-out test item 1 and every other item 0."""
    target = prepared.candidates("test")[:, 0]

    def oracle(users):
        scores = np.zeros((len(users), prepared.num_items))
        scores[np.arange(len(users)), target[users]] = 1.0
        return scores

    return oracle


def test_an_oracle_scorer_is_perfect_and_its_reverse_is_last(toy_prepared):
    _, prepared = toy_prepared
    oracle = _oracle(prepared)
    perfect = evaluate_scorer(oracle, prepared, "test", k=1)
    assert perfect["hr@1"] == 1.0 and perfect["hr@1_full"] == 1.0 and perfect["mrr_full"] == 1.0
    worst = evaluate_scorer(lambda u: -oracle(u), prepared, "test", k=5)
    assert worst["hr@5"] == 0.0
    assert worst["mrr"] == pytest.approx(1 / 10)


def test_centralized_baseline_trains_across_epochs_and_reports(tmp_path):
    from fedrec.centralized import train_centralized

    config = load_config(toy_run_config(tmp_path, **{"train.batch-size": 64}))
    # 24 toy users have ~170 examples: 5 steps of 64 wrap around the epoch.
    results = train_centralized(config, steps=5, eval_every=3)
    assert [h["step"] for h in results["history"]] == [3, 5]
    assert (tmp_path / "out" / "centralized.json").exists()
    assert 0 <= results["final"]["hr@10_full"] <= 1

    # the transition prior (transitions.*) from the pooled items' counts changes the ranking
    with_prior = load_config(toy_run_config(tmp_path, **{"train.batch-size": 64, "transitions.weight": 1.0}))
    ranked = train_centralized(with_prior, steps=5, eval_every=3)["final"]
    assert ranked["ndcg@10"] != results["final"]["ndcg@10"]


def test_beyond_accuracy_of_an_oracle(toy_prepared):
    """An oracle's top-1 is the held-out item: coverage = distinct targets, no popularity bias."""
    _, prepared = toy_prepared
    target = prepared.candidates("test")[:, 0]
    values = evaluate_scorer(_oracle(prepared), prepared, "test", k=1, beyond=True)
    assert values["coverage@1"] == len(np.unique(target)) / prepared.num_items
    assert values["popularity@1"] == values["popularity_test"] and values["popularity_ratio@1"] == 1.0
    assert all(values[f"hr@1_q{q}"] == 1.0 and values[f"hr@1_full_q{q}"] == 1.0 for q in range(1, 5))
    popular = evaluate_scorer(popularity_scorer(prepared), prepared, "test", k=3, beyond=True)
    assert popular["popularity_ratio@3"] > 1.0  # the most popular items, by construction
    sizes = np.array([len(q) for q in np.array_split(np.arange(prepared.num_users), 4)])
    overall = sum(popular[f"hr@3_q{q + 1}"] * n for q, n in enumerate(sizes)) / sizes.sum()
    assert overall == pytest.approx(popular["hr@3"])
