"""FedRecAvg rejects malformed updates before averaging; the aggregate is the valid ones' alone."""

import math

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message

from fedrec import records
from tests.privacy.test_user_level import (  # noqa: F401  (server_identity: autouse fixture)
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
