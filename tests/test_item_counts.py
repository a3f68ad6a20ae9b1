"""The popularity prior: device-noised item counts, their ε, and how rankings use them."""

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from opacus.accountants import create_accountant

from clients.client_app import query
from fedrec import item_counts as item_counts_module
from fedrec import records
from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, PopularityConfig, load_config
from fedrec.evaluation import model_scorer
from fedrec.item_counts import (
    load_item_counts,
    local_item_counts,
    noised,
    planned_releases,
    popularity_prior,
    save_item_counts,
)
from fedrec.model.build import build_recommender, token_table
from fedrec.prepare import prepare
from fedrec.privacy.accounting import (
    AccountantState,
    make_accountant,
    plan_noise_multiplier,
)
from fedrec.privacy.config import PrivacyConfig
from tests.conftest import InProcessGrid, toy_run_config


def test_counts_are_the_targets_of_the_training_examples():
    # example p predicts s_p from s_0..s_{p-1}: the first item of a sequence is no target
    counts = local_item_counts([np.array([4, 1, 1, 3]), np.array([2]), np.array([0, 4])], num_items=5)
    np.testing.assert_array_equal(counts, [0, 2, 0, 1, 1])
    with pytest.raises(ValueError, match="outside the catalogue of 5"):
        local_item_counts([np.array([0, 5])], num_items=5)


def test_noise_has_the_configured_scale_and_is_unpredictable():
    counts = np.full(200_000, 3.0)
    draws = noised(counts, 2.0, seed=1)
    assert abs(draws.mean() - 3.0) < 0.02 and abs(draws.std() - 2.0) < 0.02
    np.testing.assert_array_equal(draws, noised(counts, 2.0, seed=1))
    assert not np.array_equal(noised(counts[:10], 2.0), noised(counts[:10], 2.0))  # OS entropy


def test_prior_is_the_weighted_log_count_and_off_at_weight_zero(tmp_path):
    counts = np.array([0.0, 9.0, -4.0, 99.0])
    prior = popularity_prior(counts, PopularityConfig(weight=0.05))
    torch.testing.assert_close(prior, 0.05 * torch.log1p(torch.tensor([0.0, 9.0, 0.0, 99.0])))
    assert popularity_prior(counts, PopularityConfig()) is None
    with pytest.raises(ValueError, match="item counts"):
        popularity_prior(None, PopularityConfig(weight=0.1))
    save_item_counts(tmp_path, counts)
    np.testing.assert_array_equal(load_item_counts(tmp_path, 4), counts)
    with pytest.raises(ValueError, match="4 counts for a catalogue of 5"):
        load_item_counts(tmp_path, 5)
    with pytest.raises(ConfigError, match="popularity.noise"):
        load_config({"popularity.weight": 0.1, "popularity.noise": 0.0})


def test_the_plan_leaves_room_for_the_release_and_spends_the_target():
    dp = PrivacyConfig(enabled=True, target_epsilon=4.0)
    release = planned_releases(load_config({"popularity.weight": 0.05, "popularity.noise": 2.0}))
    assert release == [(2.0, 1.0, 1)]
    delta = 1e-3
    alone = plan_noise_multiplier(dp, 0.1, 4, 5, delta)
    after = plan_noise_multiplier(dp, 0.1, 4, 5, delta, release)
    assert after > alone  # DP-SGD gets less of the budget
    total = AccountantState("rdp", [*release, (after, 0.1, 20)])
    spent = make_accountant("rdp", total).get_epsilon(delta=delta)
    assert 4.0 - 0.01 <= spent <= 4.0
    with pytest.raises(ValueError, match="popularity.noise"):
        plan_noise_multiplier(PrivacyConfig(enabled=True, target_epsilon=1.0), 0.1, 4, 5, delta, release)


def test_scorer_adds_the_prior_to_every_users_scores(toy_prepared):
    config, prepared = toy_prepared
    model = build_recommender(config.model, config.lora, prepared.num_items)
    table = token_table(prepared, config.model)
    histories = [prepared.all_train_items[u] for u in range(3)]
    args = (model, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu"))
    prior = torch.linspace(0, 1, prepared.num_items)
    users = np.arange(3)
    np.testing.assert_allclose(
        model_scorer(*args, item_prior=prior)(users), model_scorer(*args)(users) + prior.numpy(), atol=1e-6
    )


def pin_entropy(monkeypatch) -> list[int]:
    """Make the devices' OS-entropy seeds 1, 2, 3, ... in call order; returns the seeds drawn so far.

    The noise is then known to the test exactly, so its scale is checked without a
    statistical tolerance on a 40-item catalogue (which failed about once in 40 runs).
    """
    drawn: list[int] = []
    counter = itertools.count(1)

    def randbits(bits: int) -> int:
        drawn.append(next(counter))
        return drawn[-1]

    monkeypatch.setattr(item_counts_module, "secrets", SimpleNamespace(randbits=randbits))
    return drawn


def noise_drawn(seed: int, size: int, scale: float) -> np.ndarray:
    """The N(0, scale^2) draws a device seeded with ``seed`` adds, computed independently of ``noised``."""
    return np.random.default_rng(seed).normal(0.0, scale, size=size)


def _ask(run_config, prepared, context=None):
    context = context or Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": prepared.num_users},
        state=RecordDict(),
        run_config=run_config,
    )
    content = RecordDict({records.CONFIG: ConfigRecord({records.CATALOGUE_DIGEST: prepared.catalogue_digest})})
    return query(Message(content, dst_node_id=1, message_type="query"), context), context


def test_client_reply_is_noised_and_its_release_is_accounted(tmp_path, task_identity, monkeypatch):
    run_config = toy_run_config(
        tmp_path, **{"popularity.weight": 0.05, "dp.enabled": True, "dp.target-epsilon": 8.0}
    )
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    data = load_client_data(config, prepared, 0, prepared.num_users)
    exact = local_item_counts(data.sequences, prepared.num_items)
    seeds = pin_entropy(monkeypatch)
    reply, context = _ask(run_config, prepared)
    sent = reply.content[records.ARRAYS][records.ITEM_COUNTS].numpy()
    assert sent.shape == exact.shape and np.all(sent != exact)  # nothing leaves un-noised
    assert seeds == [1]  # one fresh draw of entropy per release
    np.testing.assert_allclose(sent, exact + noise_drawn(1, exact.size, 2.0), rtol=0, atol=1e-5)  # N(0, 2^2)

    delta = 1 / (10 * exact.sum())
    accountant = create_accountant("rdp")
    accountant.history = [(2.0, 1.0, 1)]
    metrics = reply.content[records.METRICS]
    assert metrics[records.EPSILON] == pytest.approx(accountant.get_epsilon(delta=delta))
    history = context.state.config_records[records.DP_STATE]
    assert list(history["noise-multipliers"]) == [2.0] and list(history["steps"]) == [1]

    # a budget the release would exceed: the device refuses and sends nothing
    tight = {**run_config, "dp.target-epsilon": 1.0}
    refused, _ = _ask(tight, prepared)
    assert refused.has_error() and refused.error.code == records.BUDGET_EXHAUSTED
    assert math.isfinite(metrics[records.EPSILON])


def test_server_sums_every_clients_counts_saves_them_and_reuses_them_on_resume(tmp_path, task_identity, monkeypatch):
    from server.item_counts import run_item_counts

    run_config = toy_run_config(tmp_path, **{"popularity.weight": 0.05, "dp.enabled": True, "dp.target-epsilon": 8.0})
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    n = prepared.num_users
    exact = sum(
        local_item_counts(load_client_data(config, prepared, p, n).sequences, prepared.num_items) for p in range(n)
    )
    out = tmp_path / "out"
    seeds = pin_entropy(monkeypatch)
    counts, summary = run_item_counts(InProcessGrid(run_config, n), config, prepared.catalogue_digest, prepared.num_items, out, 10.0)
    assert summary["clients"] == n and summary["failures"] == 0
    assert summary["noise_std_of_sum"] == pytest.approx(2.0 * math.sqrt(n))
    assert seeds == list(range(1, n + 1))  # every device drew its own noise
    noise = sum(noise_drawn(seed, prepared.num_items, 2.0) for seed in seeds)  # each count: exact + N(0, 4 n)
    np.testing.assert_allclose(counts, exact + noise, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(load_item_counts(out, prepared.num_items), counts)

    class Unreachable:
        def get_node_ids(self):
            raise AssertionError("a resumed run must not ask again")

    resumed = load_config({**run_config, "resume": True})
    again, none = run_item_counts(Unreachable(), resumed, prepared.catalogue_digest, prepared.num_items, out, 10.0)
    assert none is None and np.array_equal(again, counts)

    tight = {**run_config, "dp.target-epsilon": 0.3}  # the release alone costs more
    with pytest.raises(RuntimeError, match=r"privacy budget exhausted.*raise popularity.noise"):
        run_item_counts(InProcessGrid(tight, n), load_config(tight), prepared.catalogue_digest, prepared.num_items, tmp_path / "o2", 10.0)
