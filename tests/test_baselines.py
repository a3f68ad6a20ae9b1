"""The BPR-MF baseline: sound negatives, learns the toy data's tastes, same evaluation."""

import json

import numpy as np

from fedrec.baselines import BprSettings, _negatives, train_bpr_mf
from fedrec.cli import main


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
    assert main(["baselines", "--preset", "smoke", "--epochs", "3", "--run-config", settings]) == 0
    results = json.loads((tmp_path / "out" / "baselines.json").read_text())
    assert results["bpr-mf"]["best_epoch"] in (1, 2, 3) and len(results["bpr-mf"]["epochs"]) == 3
    assert {"hr@10", "hr@10_full", "coverage@10"} <= set(results["popularity"])
    assert "bpr-mf:" in capsys.readouterr().out
