"""FedRecAvg rejects malformed updates before averaging; the aggregate is the valid ones' alone."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from fedrec import records
from server.strategy import server_strategy
from tests.privacy.test_user_level import (  # noqa: F401  (server_identity: autouse fixture)
    STRATEGY_SETTINGS,
    FakeGrid,
    adapters,
    make_strategy,
    server_identity,
    train_reply,
    update_of_norm,
)


def _round(strategy, corrupt):
    """One round over 4 nodes: node 1 honest, the others' replies passed through ``corrupt``."""
    initial = adapters()
    messages = list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), FakeGrid(4)))
    honest = update_of_norm(0.5, initial, seed=1)
    replies = [train_reply(messages[0], honest, 10)]
    for index, msg in enumerate(messages[1:], start=1):
        replies.append(corrupt(index, msg, initial))
    arrays, _ = strategy.aggregate_train(1, replies)
    return initial, honest, arrays.to_torch_state_dict()


def _bad(index, msg, initial):
    if index == 1:  # NaN in one tensor
        reply = train_reply(msg, update_of_norm(0.5, initial, seed=2), 10)
        state = reply.content[records.ARRAYS].to_torch_state_dict()
        state["lora_A.weight"][0, 0] = math.nan
        reply.content[records.ARRAYS] = ArrayRecord(state)
        return reply
    if index == 2:  # an absurd norm, heavily weighted
        return train_reply(msg, update_of_norm(1e6, initial, seed=3), 10_000)
    return Message(Error(code=records.DEVICE_DATA_INVALID, reason="bad file"), reply_to=msg)


def test_nan_absurd_norm_and_error_replies_leave_the_honest_update_alone(caplog):
    strategy = make_strategy(max_update_norm=100.0)
    initial, honest, aggregate = _round(strategy, _bad)
    for key in initial:
        torch.testing.assert_close(aggregate[key], initial[key] + honest[key])
    assert strategy.last_round[records.REJECTED_UPDATES] == 2
    assert strategy.last_round[records.FAILURES] == 3
    assert "holds NaN or Inf" in caplog.text
    assert "exceeds max-update-norm 100" in caplog.text
    assert f"replied with error {records.DEVICE_DATA_INVALID}: bad file" in caplog.text


def test_without_a_norm_bound_a_huge_update_gets_in():
    """The bound is what keeps it out (so the test above tests the bound)."""
    strategy = make_strategy(max_update_norm=0.0)
    initial, honest, aggregate = _round(strategy, _bad)
    assert strategy.last_round[records.REJECTED_UPDATES] == 1  # only the NaN one
    assert not torch.allclose(aggregate["lora_A.weight"], initial["lora_A.weight"] + honest["lora_A.weight"])


SETTINGS = {**STRATEGY_SETTINGS, "max_update_norm": 100.0}


def test_fedavgm_scales_the_validated_mean_by_the_server_learning_rate():
    strategy = server_strategy("fedavgm", server_lr=2.0, server_momentum=0.0, **SETTINGS)
    initial, honest, aggregate = _round(strategy, _bad)
    assert strategy.last_round[records.REJECTED_UPDATES] == 2  # validation still runs first
    for key in initial:
        torch.testing.assert_close(aggregate[key], initial[key] + 2.0 * honest[key])


def test_fedadam_takes_its_adaptive_step_from_the_validated_mean():
    strategy = server_strategy("fedadam", server_lr=0.01, server_momentum=0.9, **SETTINGS)
    initial, honest, aggregate = _round(strategy, _bad)
    assert strategy.last_round[records.REJECTED_UPDATES] == 2
    beta_1, beta_2, tau, server_round = 0.9, 0.99, strategy.tau, 1
    rate = 0.01 * math.sqrt(1 - beta_2 ** (server_round + 1)) / (1 - beta_1 ** (server_round + 1))
    assert all(aggregate[key].dtype == initial[key].dtype == torch.float32 for key in initial)
    for key in initial:
        delta = honest[key].double()
        m, v = (1 - beta_1) * delta, (1 - beta_2) * delta.square()
        want = initial[key].double() + rate * m / (v.sqrt() + tau)
        torch.testing.assert_close(aggregate[key].double(), want, rtol=1e-5, atol=1e-6)
    # per coordinate: a coordinate with a 100x smaller mean update moves far less than 100x less
    steps = (aggregate["lora_A.weight"] - initial["lora_A.weight"]).abs().flatten()
    updates = honest["lora_A.weight"].abs().flatten()
    big, small = int(updates.argmax()), int(updates.argmin())
    assert steps[big] / steps[small] < updates[big] / updates[small]


def test_server_optimizers_refuse_secure_aggregation_and_user_level_dp():
    from fedrec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="server-optimizer"):
        load_config({"server-optimizer": "fedadam", "secagg.enabled": True})
    with pytest.raises(ConfigError, match="server-optimizer"):
        load_config({"server-optimizer": "fedavgm", "user-dp.mode": "server-fixed"})
    with pytest.raises(ConfigError, match="server-optimizer"):
        load_config({"server-optimizer": "sgd"})
