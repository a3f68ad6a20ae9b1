"""FedRecAvg rejects malformed updates before averaging; the aggregate is the valid ones' alone."""

import logging
import math

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from peft import LoraConfig, get_peft_model

from fedrec import records
from fedrec.checkpoint import SERVER_STATE_FILE, load_server_state, save_checkpoint
from server.optimizer_state import keeps_state, optimizer_state, restore_optimizer_state
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


def _train_rounds(strategy, arrays, flower_rounds, offset=0):
    """Rounds over 3 nodes, numbered as Flower numbers them in this run; a resumed
    run's are ``offset`` behind the run's. Each round's updates depend on its round
    in the run only, as in a run and its resumed copy."""
    for local in flower_rounds:
        global_round = offset + local
        messages = list(strategy.configure_train(local, ArrayRecord(arrays), ConfigRecord(), FakeGrid(3)))
        replies = [
            train_reply(m, update_of_norm(0.5 / global_round, arrays, seed=10 * global_round + i), 10 + i)
            for i, m in enumerate(messages)
        ]
        arrays = strategy.aggregate_train(local, replies)[0].to_torch_state_dict()
    return arrays


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_a_resumed_server_optimizer_steps_as_the_uninterrupted_one(name, tmp_path):
    """Its state, saved with the checkpoint and restored, gives round 3 exactly the
    uninterrupted run's adapters; restarting the state from zero does not."""

    def strategy(offset=0):
        return server_strategy(name, server_lr=0.1, server_momentum=0.9, round_offset=offset, **SETTINGS)

    uninterrupted = strategy()
    after_two = _train_rounds(uninterrupted, adapters(), [1, 2])
    state = optimizer_state(uninterrupted)
    assert keeps_state(uninterrupted) and state
    want = _train_rounds(uninterrupted, after_two, [3])

    model = _tiny_peft_model()
    folder = save_checkpoint(model, tmp_path, 2, server_state=state)
    assert (folder / SERVER_STATE_FILE).exists()
    resumed = strategy(offset=2)
    assert restore_optimizer_state(resumed, load_server_state(folder), after_two, rounds_done=2)
    got = _train_rounds(resumed, after_two, [1], offset=2)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-7)

    restarted = _train_rounds(strategy(offset=2), after_two, [1], offset=2)
    assert max(float((restarted[k] - want[k]).abs().max()) for k in want) > 1e-3


def test_a_saved_state_that_does_not_fit_is_refused_and_stateless_strategies_save_none(caplog):

    fedadam = server_strategy("fedadam", server_lr=0.1, server_momentum=0.9, **SETTINGS)
    after_one = _train_rounds(fedadam, adapters(), [1])
    state = optimizer_state(fedadam)
    assert set(state) == {f"{m}/{k}" for m in ("m_t", "v_t") for k in after_one}
    other_shapes = adapters(shape_a=(4, 7), shape_b=(7, 4))
    assert not restore_optimizer_state(server_strategy("fedadam", 0.1, 0.9, **SETTINGS), state, other_shapes, 1)
    assert "does not fit the adapters" in caplog.text
    assert not restore_optimizer_state(server_strategy("fedavgm", 0.1, 0.9, **SETTINGS), state, after_one, 1)
    assert "is not the state of FedRecAvgM" in caplog.text
    for stateless in ("fedavg", "fedprox"):
        plain = server_strategy(stateless, 0.1, 0.9, **SETTINGS)
        _train_rounds(plain, adapters(), [1])
        assert not keeps_state(plain) and optimizer_state(plain) == {}
    assert not keeps_state(server_strategy("fedavgm", 1.0, 0.0, **SETTINGS))


def _tiny_peft_model():
    """A PEFT model to checkpoint (the adapters beside the server state are not under test)."""
    base = torch.nn.Sequential(torch.nn.Linear(4, 4))
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))


def _step_size(before, after):
    return torch.cat([(after[k] - before[k]).flatten() for k in before])


@pytest.mark.parametrize("name", ["fedadam", "fedavgm"])
def test_the_server_learning_rate_steps_down_from_its_round(name):
    """Round 1 at server-lr; from round 2 on, the same state and replies take a step
    scaled by the new rate over the old (the step is linear in the rate for both)."""
    stepped = server_strategy(name, server_lr=0.1, server_momentum=0.9, server_lr_steps=[(2, 0.01)], **SETTINGS)
    constant = server_strategy(name, server_lr=0.1, server_momentum=0.9, **SETTINGS)
    start = adapters()
    after_one = _train_rounds(stepped, start, [1])
    torch.testing.assert_close(after_one, _train_rounds(constant, start, [1]))
    got = _step_size(after_one, _train_rounds(stepped, after_one, [2]))
    full = _step_size(after_one, _train_rounds(constant, after_one, [2]))
    assert float(full.abs().max()) > 1e-4
    torch.testing.assert_close(got, 0.1 * full, rtol=1e-4, atol=1e-7)
    assert stepped.last_round[records.SERVER_LR] == 0.01 and constant.last_round[records.SERVER_LR] == 0.1


def test_fedavgm_at_rate_one_without_momentum_still_takes_the_stepped_rate():
    """FedAvgM built with rate 1 and no momentum skips its server step; once the rate
    steps to 0.5 the server must apply it (half the mean update)."""
    strategy = server_strategy("fedavgm", server_lr=1.0, server_momentum=0.0, server_lr_steps=[(2, 0.5)], **SETTINGS)
    plain = server_strategy("fedavg", server_lr=1.0, server_momentum=0.0, **SETTINGS)
    after_one = _train_rounds(strategy, adapters(), [1])
    got = _step_size(after_one, _train_rounds(strategy, after_one, [2]))
    mean = _step_size(after_one, _train_rounds(plain, after_one, [2]))
    torch.testing.assert_close(got, 0.5 * mean, rtol=1e-5, atol=1e-7)


def test_a_resumed_run_steps_by_the_runs_round_not_flowers(caplog):
    """Resumed after 20 rounds, Flower's round 1 is the run's round 21."""
    caplog.set_level(logging.INFO, logger="fedrec.server.strategy")
    start = adapters()
    late = server_strategy("fedadam", 0.1, 0.9, round_offset=20, server_lr_steps=[(21, 0.01)], **SETTINGS)
    not_yet = server_strategy("fedadam", 0.1, 0.9, round_offset=20, server_lr_steps=[(22, 0.01)], **SETTINGS)
    at_low = server_strategy("fedadam", 0.01, 0.9, round_offset=20, **SETTINGS)
    at_high = server_strategy("fedadam", 0.1, 0.9, round_offset=20, **SETTINGS)
    torch.testing.assert_close(_train_rounds(late, start, [1], 20), _train_rounds(at_low, start, [1], 20))
    torch.testing.assert_close(_train_rounds(not_yet, start, [1], 20), _train_rounds(at_high, start, [1], 20))
    assert "Round 21: server learning rate 0.1 -> 0.01" in caplog.text


def test_a_server_lr_step_needs_a_server_learning_rate():
    from fedrec.config import ConfigError, load_config

    with pytest.raises(ValueError, match="no server learning rate"):
        server_strategy("fedavg", 1.0, 0.9, server_lr_steps=[(2, 0.5)], **SETTINGS)
    with pytest.raises(ConfigError, match="server-lr-step-round"):
        load_config({"server-lr-step-round": 21, "server-lr-step-to": 0.01})  # default fedavg
    with pytest.raises(ConfigError, match="server-lr-step-to"):
        load_config({"server-optimizer": "fedadam", "server-lr-step-round": 21})
    config = load_config({"server-optimizer": "fedadam", "server-lr-step-round": 21, "server-lr-step-to": 0.01})
    assert config.federation.server_lr_steps == ((21, 0.01),)
    assert load_config({"server-optimizer": "fedadam", "server-lr-step-round": 0}).federation.server_lr_steps == ()


def test_the_server_learning_rate_steps_more_than_once(caplog):
    """"21,31" / "0.01,0.003": each rate holds from its round until the next step."""
    from fedrec.config import load_config

    caplog.set_level(logging.INFO, logger="fedrec.server.strategy")
    steps = load_config(
        {"server-optimizer": "fedadam", "server-lr-step-round": "2,4", "server-lr-step-to": "0.01,0.003"}
    ).federation.server_lr_steps
    assert steps == ((2, 0.01), (4, 0.003))
    strategy = server_strategy("fedadam", 0.1, 0.9, server_lr_steps=steps, **SETTINGS)
    rates = []
    arrays = adapters()
    for server_round in range(1, 6):
        arrays = _train_rounds(strategy, arrays, [server_round])
        rates.append(strategy.last_round[records.SERVER_LR])
    assert rates == [0.1, 0.01, 0.01, 0.003, 0.003]
    assert "Round 4: server learning rate 0.01 -> 0.003" in caplog.text


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        ({"server-lr-step-round": "21,31", "server-lr-step-to": 0.01}, "server-lr-step-to"),
        ({"server-lr-step-round": "31,21", "server-lr-step-to": "0.01,0.003"}, "server-lr-step-round"),
        ({"server-lr-step-round": "21,21", "server-lr-step-to": "0.01,0.003"}, "server-lr-step-round"),
        ({"server-lr-step-round": "21,x", "server-lr-step-to": "0.01,0.003"}, "server-lr-step-round"),
        ({"server-lr-step-round": -1, "server-lr-step-to": 0.01}, "server-lr-step-round"),
        ({"server-lr-step-round": "21,31", "server-lr-step-to": "0.01,0"}, "server-lr-step-to"),
        ({"server-lr-step-round": 21, "server-lr-step-to": "nan"}, "server-lr-step-to"),
    ],
)
def test_a_bad_server_lr_schedule_names_its_setting(settings, key):
    from fedrec.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=key):
        load_config({"server-optimizer": "fedadam", **settings})
