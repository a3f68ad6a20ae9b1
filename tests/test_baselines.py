"""The central baselines: BPR-MF (sound negatives, learns the toy data's tastes),
EASE and item-kNN (exact weights, settings chosen on validation)."""

import json

import numpy as np
import torch

from fedrec.baselines import BprSettings, _negatives, train_bpr_mf
from fedrec.cli import main
from fedrec.evaluation import evaluate_scorer, popularity_scorer
from fedrec.item_item_baselines import (
    cosine_similarity,
    ease_weights,
    interaction_matrix,
    item_item_scorer,
    run_item_item_baselines,
)


def test_negatives_are_never_items_the_user_has():
    rng = np.random.default_rng(0)
    seen = [set(range(9)), {1}]  # user 0 has 9 of 10 items: only item 9 is left
    users = np.array([0, 1, 0, 0, 1] * 20)
    negatives = _negatives(rng, users, seen, 10)
    assert all(n not in seen[u] for u, n in zip(users, negatives))
    assert set(negatives[users == 0]) == {9}


def test_bpr_mf_learns_the_toy_tastes_and_keeps_the_best_epoch(toy_prepared):
    _, prepared = toy_prepared
    model, history = train_bpr_mf(prepared, BprSettings(dim=8, epochs=40, batch_size=32, lr=0.05), k=5)
    assert len(history) == 40
    # users like odd or even items: after training, their own parity scores higher
    scores = model.scorer()(np.arange(prepared.num_users))
    ids = prepared.items["item_id"].str[1:].astype(int).to_numpy()
    taste = np.array([(ids[h] % 2).mean() > 0.5 for h in prepared.all_train_items])  # mostly odd items
    odd = scores[:, ids % 2 == 1].mean(1) > scores[:, ids % 2 == 0].mean(1)
    assert (odd == taste).mean() > 0.8
    best = max(h["valid_ndcg@5"] for h in history)
    assert best > history[0]["valid_ndcg@5"]


def test_cli_writes_baselines_json(tmp_path, capsys):
    from tests.conftest import toy_run_config

    overrides = toy_run_config(tmp_path)
    settings = " ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in overrides.items())
    assert main(["baselines", "--preset", "smoke", "--epochs", "3", "--sasrec-epochs", "2", "--refit", "--run-config", settings]) == 0
    results = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert results["bpr-mf"]["best_epoch"] in (1, 2, 3) and len(results["bpr-mf"]["epochs"]) == 3
    assert {"hr@10", "hr@10_full", "coverage@10"} <= set(results["popularity"])
    assert results["ease"]["l2"] > 0 and "hr@10_full" in results["item-knn"]["test"]
    assert results["sasrec"]["settings"]["epochs"] == 2 and "hr@10_full" in results["sasrec"]["test"]
    assert results["bpr-mf"]["refit"]["epochs"] == results["bpr-mf"]["best_epoch"]
    assert results["sasrec"]["refit"]["epochs"] == results["sasrec"]["best_epoch"]
    assert "hr@10_full" in results["bpr-mf"]["refit"]["test"] and "hr@10_full" in results["sasrec"]["refit"]["test"]
    printed = capsys.readouterr().out
    assert all(f"{name}:" in printed for name in ("bpr-mf", "ease", "item-knn", "sasrec", "bpr-mf+valid", "sasrec+valid"))


def test_bpr_mf_refit_trains_on_the_validation_items_too(toy_prepared):
    _, prepared = toy_prepared
    settings = BprSettings(dim=8, epochs=40, batch_size=32, lr=0.05)
    chosen, _ = train_bpr_mf(prepared, settings, k=5)
    refitted, history = train_bpr_mf(prepared, settings, k=5, refit=True)
    assert [h["epoch"] for h in history] == list(range(1, 41)) and "valid_ndcg@5" not in history[0]
    # the refit has seen each user's validation item as a positive: it ranks it higher
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    users = np.arange(prepared.num_users)

    def mean_rank(model):
        scores = model.scorer()(users)
        return float(np.mean((scores > scores[users, valid][:, None]).sum(1)))

    assert mean_rank(refitted) < mean_rank(chosen) - 1


def test_ease_weights_solve_the_constrained_least_squares():
    rng = np.random.default_rng(0)
    histories = [rng.choice(12, size=rng.integers(2, 7), replace=False) for _ in range(30)]
    matrix = interaction_matrix(histories, 12)
    weights = ease_weights(matrix, 5.0).double()
    gram = torch.from_numpy((matrix.T @ matrix).toarray())
    assert torch.all(torch.diag(weights) == 0)
    # stationarity of ||X - XW||^2 + l2 ||W||^2 with diag(W) = 0: the gradient
    # (G + l2 I) W - G vanishes off the diagonal (the diagonal holds the multipliers)
    gradient = (gram + 5.0 * torch.eye(12, dtype=gram.dtype)) @ weights - gram
    off = gradient - torch.diag(torch.diag(gradient))
    assert off.abs().max() < 1e-9 and torch.diag(gradient).abs().min() > 1e-3


def test_item_knn_sums_cosine_similarity_to_the_last_items():
    histories = [np.array([0, 1, 2]), np.array([1, 2]), np.array([2, 3]), np.array([0, 3, 1])]
    similarity = cosine_similarity(interaction_matrix(histories, 4))
    columns = interaction_matrix(histories, 4).toarray()
    expected = columns.T @ columns / np.sqrt(np.outer(columns.sum(0), columns.sum(0)))
    np.fill_diagonal(expected, 0)
    np.testing.assert_allclose(similarity.numpy(), expected)
    scores = item_item_scorer(histories, similarity, last=1)(np.array([0, 3]))
    np.testing.assert_allclose(scores, expected[[2, 1]], rtol=1e-6)  # each user's last item's row
    everything = item_item_scorer(histories, similarity)(np.array([0]))
    np.testing.assert_allclose(everything[0], expected[[0, 1, 2]].sum(0), rtol=1e-6)


def test_item_item_baselines_pick_settings_on_validation_and_learn_the_toy_tastes(toy_prepared):
    _, prepared = toy_prepared
    results = run_item_item_baselines(prepared, k=5)
    popularity = evaluate_scorer(popularity_scorer(prepared), prepared, "test", 5)
    for name, key in (("ease", "l2"), ("item-knn", "last_items")):
        tried = results[name]["validation"]
        best = max(tried, key=lambda t: t["valid_ndcg@5"])
        assert results[name][key] == best["setting"] and len(tried) > 1
        assert results[name]["test"]["hr@5"] > popularity["hr@5"]  # users like odd or even items
