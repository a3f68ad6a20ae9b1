"""A client's privacy accountant across rounds, its persistence, and budget planning."""

import json
import math

import pytest
from flwr.app import ConfigRecord

from fedrec.errors import ConfigError
from fedrec.privacy.accounting import (
    AccountantState,
    delta_for,
    epsilon,
    make_accountant,
    plan_noise_multiplier,
    would_exceed,
)
from fedrec.privacy.config import PrivacyConfig

DELTA = 1e-3
SIGMA, RATE = 1.2, 0.25


def run_round(state: AccountantState, steps: int, sigma: float = SIGMA, rate: float = RATE):
    """One round of ``steps`` DP-SGD steps, continuing from ``state`` (as make_private does)."""
    accountant = make_accountant(state.mechanism, state)
    for _ in range(steps):
        accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return AccountantState(state.mechanism, list(accountant.history), state.rounds + 1)


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_accumulates_across_rounds(mechanism):
    fresh = AccountantState(mechanism)
    assert epsilon(fresh, DELTA) == 0.0
    first = run_round(fresh, 5)
    second = run_round(first, 5)
    assert first.history == [(SIGMA, RATE, 5)]  # restoring copied it: the round did not mutate it
    assert second.rounds == 2 and second.steps == 10

    one_round, two_rounds = epsilon(first, DELTA), epsilon(second, DELTA)
    assert 0 < one_round < two_rounds
    at_once = make_accountant(mechanism, fresh)
    for _ in range(10):
        at_once.step(noise_multiplier=SIGMA, sample_rate=RATE)
    assert two_rounds == pytest.approx(at_once.get_epsilon(delta=DELTA), rel=1e-9)


def test_state_round_trips():
    state = AccountantState("prv", [(1.1, 0.25, 7), (0.9, 0.5, 3)], rounds=2)

    record = state.to_config_record()
    assert isinstance(record, ConfigRecord)
    assert AccountantState.from_config_record(record) == state
    empty = AccountantState("rdp")
    assert AccountantState.from_config_record(empty.to_config_record()) == empty

    assert AccountantState.from_dict(json.loads(json.dumps(state.to_dict()))) == state


def test_state_save_is_atomic_and_loads(tmp_path):
    state = AccountantState("rdp", [(1.0, 0.1, 4)], rounds=1)
    path = tmp_path / "client" / "privacy.json"
    state.save(path)
    run_round(state, 3).save(path)  # overwrite in place
    assert AccountantState.load(path) == run_round(state, 3)
    assert [p.name for p in path.parent.iterdir()] == ["privacy.json"]  # no temporary left


def test_restoring_another_mechanism_is_refused():
    with pytest.raises(ValueError, match="prv"):
        make_accountant("rdp", AccountantState("prv", [(1.0, 0.1, 4)]))
    assert make_accountant("rdp", AccountantState("prv")).history == []  # nothing spent yet


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_planned_noise_spends_the_target_by_the_last_round(mechanism):
    config = PrivacyConfig(enabled=True, target_epsilon=2.0, accountant=mechanism)
    steps, rounds = 8, 3
    sigma = plan_noise_multiplier(config, RATE, steps, rounds, DELTA)
    state = AccountantState(mechanism)
    for _ in range(rounds):
        refused, _ = would_exceed(state, config, DELTA, sigma, RATE, steps)
        assert not refused
        state = run_round(state, steps, sigma)
    spent = epsilon(state, DELTA)
    assert 0.95 * config.target_epsilon <= spent <= config.target_epsilon
    refused, after = would_exceed(state, config, DELTA, sigma, RATE, steps)
    assert refused and after > config.target_epsilon  # a fourth round would overspend


def test_would_exceed_refuses_a_round_past_max_epsilon():
    config = PrivacyConfig(enabled=True, max_epsilon=2.0)
    state = run_round(AccountantState("rdp"), 5, sigma=2.0)
    before = epsilon(state, DELTA)
    assert before < 2.0

    refused, after = would_exceed(state, config, DELTA, 0.5, RATE, 20)
    assert refused and after > 2.0
    allowed, small = would_exceed(state, config, DELTA, 20.0, RATE, 1)
    assert not allowed and before < small <= 2.0
    assert state == run_round(AccountantState("rdp"), 5, sigma=2.0)  # computed on a copy

    unlimited, huge = would_exceed(state, PrivacyConfig(enabled=True), DELTA, 0.3, RATE, 50)
    assert not unlimited and huge > 10


def test_delta_defaults_to_a_tenth_of_one_over_n():
    assert delta_for(PrivacyConfig(), 50) == pytest.approx(1 / 500)
    assert delta_for(PrivacyConfig(delta=1e-5), 50) == 1e-5
    with pytest.raises(ValueError):
        delta_for(PrivacyConfig(), 0)


@pytest.mark.parametrize(
    ("kwargs", "setting"),
    [
        ({"noise_multiplier": -1.0}, "dp.noise-multiplier"),
        ({"enabled": True, "noise_multiplier": 0.0}, "dp.noise-multiplier"),
        ({"noise_multiplier": math.nan}, "dp.noise-multiplier"),
        ({"max_grad_norm": 0.0}, "dp.max-grad-norm"),
        ({"target_epsilon": -2.0}, "dp.target-epsilon"),
        ({"target_epsilon": math.inf}, "dp.target-epsilon"),
        ({"delta": 1.0}, "dp.delta"),
        ({"delta": -1e-5}, "dp.delta"),
        ({"accountant": "gdp"}, "dp.accountant"),
        ({"max_epsilon": -1.0}, "dp.max-epsilon"),
        ({"target_epsilon": 4.0, "max_epsilon": 2.0}, "dp.max-epsilon"),
        ({"enabled": "yes"}, "dp.enabled"),
    ],
)
def test_bad_settings_name_the_setting(kwargs, setting):
    with pytest.raises(ConfigError, match=f"'{setting}'"):
        PrivacyConfig(**kwargs)


def test_good_settings():
    config = PrivacyConfig(enabled=True, noise_multiplier=0.0, target_epsilon=3.0, accountant="prv")
    assert config.budget == 3.0
    assert PrivacyConfig(target_epsilon=3.0, max_epsilon=5.0).budget == 5.0
    assert PrivacyConfig().budget == 0.0
