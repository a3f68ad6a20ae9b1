"""SASRec, the central sequential baseline: causal, next-item aligned, sound negatives."""

import numpy as np
import pytest
import torch

from fedrec.sequential_baseline import (
    PAD,
    SasRec,
    SasRecSettings,
    SeenItems,
    _unseen,
    left_padded,
    run_sasrec_baseline,
    sasrec_scorer,
    train_sasrec,
)

NUM_ITEMS = 12
TINY = SasRecSettings(dim=16, blocks=1, heads=2, dropout=0.0, max_len=8, epochs=60, eval_every=20, batch_size=16, lr=0.01)


def cyclic_histories(rng: np.random.Generator, users: int) -> list[np.ndarray]:
    """Each user walks round the catalogue from a random start, up (+1) or down (-1).

    Which item comes next depends on the order of the last two items, not on
    which items the history holds: the same set of items is walked both ways.
    """
    return [
        (rng.integers(NUM_ITEMS) + rng.choice([1, -1]) * np.arange(rng.integers(4, 9))) % NUM_ITEMS
        for _ in range(users)
    ]


def next_item_accuracy(model: SasRec, histories: list[np.ndarray]) -> float:
    """How often each history's last item is the top-1 prediction from the items before it (those excluded, as in ranking)."""
    scores = sasrec_scorer(model, [h[:-1] for h in histories])(np.arange(len(histories)))
    for row, history in enumerate(histories):
        scores[row, history[:-1]] = -np.inf
    return float(np.mean(scores.argmax(1) == np.array([h[-1] for h in histories])))


def test_left_padding_keeps_the_latest_items_right_aligned():
    tokens = left_padded([np.array([3, 4, 5, 6]), np.array([7]), np.array([], dtype=np.int64)], max_len=3)
    assert tokens.tolist() == [[4 + 1, 5 + 1, 6 + 1], [PAD, PAD, 7 + 1], [PAD, PAD, PAD]]


def test_a_position_never_sees_later_items():
    torch.manual_seed(0)
    model = SasRec(NUM_ITEMS, TINY).eval()
    tokens = torch.tensor([[0, 0, 3, 5, 7, 2, 9, 4]])
    changed = tokens.clone()
    changed[0, 5:] = torch.tensor([11, 1, 6])
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[0, :5], after[0, :5])
    assert not torch.allclose(before[0, 5:], after[0, 5:])
    assert before[0, :2].abs().max() == 0  # padding positions carry nothing


def test_negatives_are_never_items_the_user_has_unless_they_have_every_item():
    rng = np.random.default_rng(0)
    # user 0: only item 5 is left; user 2: nothing is left, so any item (and no endless loop)
    seen = SeenItems.of([[4, 0, 1, 2, 3, 1], [2, 1], list(range(6)), []], num_items=6)
    users = np.array([0, 1, 2, 3] * 50)
    negatives = _unseen(rng, users, seen)
    assert set(negatives[users == 0]) == {5}
    assert set(negatives[users == 1]) == {0, 3, 4, 5}
    assert len(set(negatives[users == 2])) > 1
    assert set(negatives[users == 3]) == set(range(6))
    assert seen.contains(np.array([0, 0, 1, 3]), np.array([3, 5, 2, 0])).tolist() == [True, False, True, False]


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_sasrec_learns_which_item_comes_next_and_keeps_the_best_validation(loss):
    rng = np.random.default_rng(0)
    train, held_out = cyclic_histories(rng, 48), cyclic_histories(rng, 24)
    settings = SasRecSettings(**{**TINY.__dict__, "loss": loss})
    calls = []

    def validate(model):
        calls.append(next_item_accuracy(model, train))
        return calls[-1]

    model, history = train_sasrec(train, NUM_ITEMS, settings, validate)
    assert [h["epoch"] for h in history] == [20, 40, 60]
    # the kept state is the best validated one, and it predicts unseen users' next items from their order
    assert next_item_accuracy(model, train) == pytest.approx(max(calls))
    assert next_item_accuracy(model, held_out) > 0.9


def test_settings_refuse_unknown_losses_and_impossible_shapes():
    with pytest.raises(ValueError, match="loss 'bpr'"):
        SasRecSettings(loss="bpr")
    with pytest.raises(ValueError, match="multiple of heads"):
        SasRecSettings(dim=10, heads=3)
    with pytest.raises(ValueError, match="max_len"):
        SasRecSettings(max_len=0)


def test_baseline_on_prepared_data_reports_both_protocols_from_the_best_epoch(toy_prepared):
    _, prepared = toy_prepared
    settings = SasRecSettings(dim=16, blocks=1, max_len=20, epochs=4, eval_every=2, batch_size=16)
    results = run_sasrec_baseline(prepared, settings, k=3)
    assert [h["epoch"] for h in results["epochs"]] == [2, 4]
    assert results["best_epoch"] == max(results["epochs"], key=lambda h: h["valid"])["epoch"]
    assert results["validation"]["ndcg@3"] == pytest.approx(max(h["valid"] for h in results["epochs"]))
    assert {"hr@3", "ndcg@3", "hr@3_full", "coverage@3"} <= set(results["test"])
    assert results["settings"]["loss"] == "bce"


def test_refit_trains_a_fresh_model_on_the_validation_items_for_the_chosen_epochs(toy_prepared, monkeypatch):
    import fedrec.sequential_baseline as sequential

    _, prepared = toy_prepared
    calls = []
    real_train = sequential.train_sasrec

    def spy(histories, num_items, settings, validate, excluded=()):
        calls.append(([h.tolist() for h in histories], settings.epochs, validate))
        return real_train(histories, num_items, settings, validate, excluded)

    monkeypatch.setattr(sequential, "train_sasrec", spy)
    settings = SasRecSettings(dim=16, blocks=1, max_len=20, epochs=4, eval_every=2, batch_size=16)
    results = run_sasrec_baseline(prepared, settings, k=3, refit=True)
    (chosen_histories, _, validate), (refit_histories, refit_epochs, refit_validate) = calls
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    assert validate is not None and refit_validate is None
    assert chosen_histories == [h.tolist() for h in prepared.all_train_items]
    assert refit_histories == [[*h, int(valid[u])] for u, h in enumerate(chosen_histories)]
    assert refit_epochs == results["best_epoch"] == results["refit"]["epochs"]
    assert [h["epoch"] for h in results["refit"]["losses"]] == list(range(2, refit_epochs + 1, 2))
    assert {"hr@3", "ndcg@3", "hr@3_full"} <= set(results["refit"]["test"])


def test_each_position_is_trained_on_the_item_that_follows_it(monkeypatch):
    import fedrec.sequential_baseline as sequential

    batches = []
    real_loss = sequential._loss

    def spy(model, inputs, targets, negatives, kind):
        batches.append((inputs.clone(), targets.clone(), negatives.clone()))
        return real_loss(model, inputs, targets, negatives, kind)

    monkeypatch.setattr(sequential, "_loss", spy)
    histories = [np.array([3, 1, 4, 1, 5]), np.array([9, 2, 6])]
    settings = SasRecSettings(**{**TINY.__dict__, "max_len": 6, "epochs": 1, "eval_every": 1})
    train_sasrec(histories, NUM_ITEMS, settings, validate=lambda model: 0.0, excluded=[[7], [8]])
    (inputs, targets, negatives), = batches
    by_user = {int(row[row != PAD][0]): (row, targets[r], negatives[r]) for r, row in enumerate(inputs)}
    inputs0, targets0, negatives0 = by_user[3 + 1]
    assert inputs0.tolist() == [PAD, PAD, 4, 2, 5, 2] and targets0.tolist() == [PAD, 4, 2, 5, 2, 6]
    # negatives only where a target is real, never the user's items or held-out item
    assert (negatives0 == PAD).tolist() == (targets0 == PAD).tolist()
    assert not set((negatives0[negatives0 != PAD] - 1).tolist()) & {3, 1, 4, 5, 7}
    inputs1, targets1, _ = by_user[9 + 1]
    assert targets1[-2:].tolist() == [2 + 1, 6 + 1] and inputs1[-2:].tolist() == [9 + 1, 2 + 1]
