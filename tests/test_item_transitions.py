"""The transition prior: each client's counts, their sum on the server, and how rankings use them."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from fedrec import records
from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, TransitionConfig, load_config
from fedrec.evaluation import model_scorer
from fedrec.item_transitions import (
    TRANSITIONS_FILE,
    check_catalogue_size,
    load_transitions,
    local_transitions,
    save_transitions,
    saved_window,
    transition_prior,
    transition_weights,
)
from fedrec.model.build import build_recommender, token_table
from fedrec.prepare import prepare
from tests.conftest import InProcessGrid, toy_run_config


def test_each_target_counts_the_window_of_items_before_it():
    # targets 1, 2, 1 (the first item is no example's target); window 2 adds the item two back
    counts = local_transitions([np.array([0, 1, 2, 1]), np.array([3])], num_items=4, window=2).toarray()
    expected = np.zeros((4, 4))
    for row, col in ((0, 1), (1, 2), (2, 1), (0, 2), (1, 1)):
        expected[row, col] += 1
    np.testing.assert_array_equal(counts, expected)
    one_back = local_transitions([np.array([0, 1, 2, 1])], num_items=4, window=1).toarray()
    assert one_back[0, 2] == 0 and one_back[1, 1] == 0 and one_back.sum() == 3
    # a repeated pair is one entry with its count
    repeated = local_transitions([np.array([0, 1, 0, 1])], num_items=2, window=1)
    assert repeated.nnz == 2 and repeated.toarray()[0, 1] == 2
    with pytest.raises(ValueError, match="outside the catalogue of 4"):
        local_transitions([np.array([0, 4])], num_items=4, window=1)


def test_weights_discount_items_that_follow_or_precede_everything():
    counts = sp.csr_matrix(np.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0], [0.0, 5.0, 0.0]]))
    out = np.array([4.0, 2.0, 5.0]) + 1
    into = np.array([2.0, 8.0, 1.0]) + 1
    np.testing.assert_allclose(
        transition_weights(counts, 0.5).toarray(), counts.toarray() / np.sqrt(out)[:, None] / np.sqrt(into)[None, :]
    )
    np.testing.assert_allclose(transition_weights(counts, 0.0).toarray(), counts.toarray())


def test_prior_favours_what_followed_the_most_recent_items():
    counts = sp.csr_matrix((np.array([4.0, 4.0, 1.0]), ([0, 1, 2], [3, 4, 0])), shape=(5, 5))
    prior = transition_prior(counts, TransitionConfig(weight=0.3, exponent=0.0, decay=0.5, last_items=2))
    # history 2 -> 1 -> 0 (0 most recent): item 3 followed 0 (weight 1), 4 followed 1 (0.5);
    # 2 is beyond last-items=2, so item 0 (which followed 2) gets nothing
    scores = prior([np.array([2, 1, 0]), np.array([4]), np.array([], dtype=np.int64)])
    torch.testing.assert_close(scores[0], torch.tensor([0.0, 0.0, 0.0, 0.3, 0.15]))
    torch.testing.assert_close(scores[1:], torch.zeros(2, 5))  # nothing followed 4; no history
    assert transition_prior(counts, TransitionConfig()) is None  # weight 0: off
    with pytest.raises(ValueError, match="item-transitions.npz"):
        transition_prior(None, TransitionConfig(weight=0.1))


def test_counts_are_saved_sparse_and_checked_against_the_catalogue(tmp_path):
    counts = local_transitions([np.array([0, 1, 2])], num_items=3, window=2)
    assert load_transitions(tmp_path, 3) is None and saved_window(tmp_path) is None
    save_transitions(tmp_path, counts, 2)
    np.testing.assert_array_equal(load_transitions(tmp_path, 3).toarray(), counts.toarray())
    assert saved_window(tmp_path) == 2
    with pytest.raises(ValueError, match="counts of 3 items for a catalogue of 4"):
        load_transitions(tmp_path, 4)
    with pytest.raises(ValueError, match="up to 20000 items"):
        check_catalogue_size(20_001)


@pytest.mark.parametrize(
    "setting",
    [{"dp.enabled": True}, {"secagg.enabled": True}, {"user-dp.mode": "server-fixed"}, {"fraction-evaluate": 0.5}],
)
def test_no_private_or_client_evaluated_run_sends_exact_counts(setting):
    with pytest.raises(ConfigError, match="transitions.weight"):
        load_config({"transitions.weight": 0.2, **setting})
    load_config(setting)  # fine without the prior


@pytest.mark.parametrize(
    "key, value", [("transitions.decay", 0.0), ("transitions.window", 0), ("transitions.last-items", 0), ("transitions.weight", -1.0)]
)
def test_bad_settings_name_the_setting(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config({key: value})


def test_scorer_adds_each_users_prior_from_their_own_history(toy_prepared):
    config, prepared = toy_prepared
    model = build_recommender(config.model, config.lora, prepared.num_items)
    table = token_table(prepared, config.model)
    histories = [prepared.all_train_items[u] for u in range(4)]
    counts = local_transitions(histories, prepared.num_items, 3)
    prior = transition_prior(counts, TransitionConfig(weight=0.5))
    args = (model, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu"))
    users = np.array([3, 1])
    with_prior = model_scorer(*args, user_prior=prior)(users)
    expected = model_scorer(*args)(users) + prior([histories[3], histories[1]]).numpy()
    np.testing.assert_allclose(with_prior, expected, atol=1e-6)
    rows = prior([histories[3], histories[1]]).numpy()
    assert rows.max() == pytest.approx(0.5) and not np.allclose(rows[0], rows[1])  # per user, not per item


def test_server_sums_every_clients_exact_counts_saves_and_reuses_them(tmp_path, task_identity):
    from server.item_transitions import run_item_transitions

    run_config = toy_run_config(tmp_path, **{"transitions.weight": 0.2, "transitions.window": 3})
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    n = prepared.num_users
    expected = sum(
        local_transitions(load_client_data(config, prepared, p, n).sequences, prepared.num_items, 3).toarray()
        for p in range(n)
    )
    # one user per client: the sum is the count over every user's training items
    np.testing.assert_array_equal(expected, local_transitions(prepared.all_train_items, prepared.num_items, 3).toarray())
    grid = InProcessGrid(run_config, n)
    out = tmp_path / "out"
    total, summary = run_item_transitions(grid, config, prepared.catalogue_digest, prepared.num_items, out, 10.0)
    assert grid.sent == [f"query.{records.TRANSITIONS_ACTION}"] * n
    assert summary["clients"] == n and summary["failures"] == 0 and summary["total"] == expected.sum()
    np.testing.assert_array_equal(total.toarray(), expected)
    np.testing.assert_array_equal(load_transitions(out, prepared.num_items).toarray(), expected)

    resumed = load_config({**run_config, "resume": True})
    again, summary = run_item_transitions(InProcessGrid(run_config, n), resumed, prepared.catalogue_digest, prepared.num_items, out, 10.0)
    assert summary is None and (again != total).nnz == 0  # no client asked again
    # resumed with another window: the saved counts do not fit, so every client is asked again
    wider = load_config({**run_config, "resume": True, "transitions.window": 4})
    grid = InProcessGrid({**run_config, "transitions.window": 4}, n)
    recounted, summary = run_item_transitions(grid, wider, prepared.catalogue_digest, prepared.num_items, out, 10.0)
    assert len(grid.sent) == n and summary["clients"] == n and recounted.sum() > total.sum()
    assert saved_window(out) == 4

    # a client whose settings have the prior off sends nothing
    off = InProcessGrid({**run_config, "transitions.weight": 0.0}, 2)
    with pytest.raises(RuntimeError, match="no client returned transition counts"):
        run_item_transitions(off, config, prepared.catalogue_digest, prepared.num_items, tmp_path / "other", 10.0)
    assert not (tmp_path / "other" / TRANSITIONS_FILE).exists()
