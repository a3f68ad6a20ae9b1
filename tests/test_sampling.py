"""Seeded client sampling: the same seed trains the same partitions, whatever the node ids."""

import logging

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict

from clients.client_app import identify
from fedrec import records
from fedrec.config import load_config
from fedrec.deploy.device_data import device_partition_id
from server.sampling import SeededSampling, seeded_draw
from server.server_app import _seeded_sampling
from tests.privacy.test_user_level import (  # noqa: F401  (server_identity: autouse fixture)
    STRATEGY_SETTINGS,
    adapters,
    make_strategy,
    server_identity,
    train_reply,
    update_of_norm,
)

NUM_NODES = 20


class IdentifyingGrid:
    """Nodes with fresh random ids (as a simulation gives them in every run) whose
    ``query.identify`` messages the ClientApp's handler answers in this process."""

    def __init__(self, run_id: int, silent: frozenset[int] = frozenset()):
        ids = np.random.default_rng(run_id).choice(2**40, size=NUM_NODES, replace=False)
        self.partition_of = {int(node): p for p, node in enumerate(ids)}
        self.silent = silent
        """Partitions whose nodes reply to identify with an error."""
        self.queried: list[int] = []

    def get_node_ids(self):
        return list(self.partition_of)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == f"query.{records.IDENTIFY_ACTION}"
            node = msg.metadata.dst_node_id
            self.queried.append(node)
            if self.partition_of[node] in self.silent:
                replies.append(Message(Error(code=1, reason="offline"), reply_to=msg))
                continue
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": self.partition_of[node], "num-partitions": NUM_NODES},
                state=RecordDict(),
                run_config={},
            )
            reply = identify(msg, context)
            replies.append(reply)
        return replies


def _partitions(grid: IdentifyingGrid, messages) -> list[int]:
    return sorted(grid.partition_of[m.metadata.dst_node_id] for m in messages)


def _train_draws(seed: int, run_id: int, rounds=(1, 2, 3), **kwargs) -> tuple[list[list[int]], IdentifyingGrid]:
    """The partitions that configure_train sends to in each round of a fresh run."""
    grid = IdentifyingGrid(run_id)
    strategy = make_strategy(
        fraction_train=0.25, sampling=SeededSampling(seed, timeout=5.0), **kwargs
    )
    draws = []
    for server_round in rounds:
        messages = list(strategy.configure_train(server_round, ArrayRecord(adapters()), ConfigRecord(), grid))
        assert len(messages) == 5  # Flower's count: fraction-train 0.25 of 20
        assert len({id(m.content) for m in messages}) == 1  # one payload, as FedAvg sends
        assert messages[0].content[records.CONFIG][records.SERVER_ROUND] == server_round + kwargs.get("round_offset", 0)
        draws.append(_partitions(grid, messages))
    return draws, grid


def test_same_seed_same_partitions_in_runs_with_different_node_ids():
    first, grid = _train_draws(seed=7, run_id=1)
    second, _ = _train_draws(seed=7, run_id=2)
    assert first == second
    assert len({tuple(d) for d in first}) == 3  # each round draws anew
    other_seed, _ = _train_draws(seed=8, run_id=1)
    assert other_seed != first
    # every node was asked once, before the first draw, and never again
    assert sorted(grid.queried) == sorted(grid.partition_of)


def test_a_resumed_run_draws_what_the_uninterrupted_run_drew():
    uninterrupted, _ = _train_draws(seed=7, run_id=1, rounds=(1, 2, 3, 4))
    resumed, _ = _train_draws(seed=7, run_id=3, rounds=(1, 2), round_offset=2)
    assert resumed == uninterrupted[2:]


def test_the_draw_is_the_documented_function_of_seed_round_and_partition_ids():
    draws, _ = _train_draws(seed=7, run_id=1)
    by_partition = {p: p for p in range(NUM_NODES)}
    assert draws == [seeded_draw(by_partition, 5, 7, r) for r in (1, 2, 3)]


def test_evaluate_draws_its_own_seeded_sample():
    grids = [IdentifyingGrid(run_id) for run_id in (1, 2)]
    evaluated = []
    for grid in grids:
        strategy = make_strategy(fraction_evaluate=0.25, sampling=SeededSampling(7, timeout=5.0))
        messages = strategy.configure_evaluate(1, ArrayRecord(adapters()), ConfigRecord(), grid)
        evaluated.append(_partitions(grid, messages))
    assert evaluated[0] == evaluated[1]
    assert len(evaluated[0]) == 5
    assert evaluated[0] != _train_draws(seed=7, run_id=1, rounds=(1,))[0][0]


def test_all_nodes_sampled_asks_nobody():
    grid = IdentifyingGrid(1)
    strategy = make_strategy(sampling=SeededSampling(7, timeout=5.0))  # fraction-train 1.0
    messages = list(strategy.configure_train(1, ArrayRecord(adapters()), ConfigRecord(), grid))
    assert _partitions(grid, messages) == list(range(NUM_NODES))
    assert grid.queried == []


def test_a_node_that_does_not_identify_is_still_sampled_and_warned_about(caplog):
    silent = frozenset({3})
    grid = IdentifyingGrid(1, silent=silent)
    sampling = SeededSampling(7, timeout=5.0)
    strategy = make_strategy(fraction_train=0.5, sampling=sampling)
    with caplog.at_level(logging.WARNING):
        chosen = set()
        for server_round in range(1, 6):
            messages = strategy.configure_train(server_round, ArrayRecord(adapters()), ConfigRecord(), grid)
            chosen |= set(_partitions(grid, messages))
    assert 3 in chosen
    assert sum(key is None for key in sampling.node_keys.values()) == 1
    assert "did not say its partition id: offline" in caplog.text


def test_identify_replies_the_partition_id_that_train_reports_on_a_device(task_identity):
    node_config = {"user-id": "alice", "data-path": "/data/alice.csv"}
    context = Context(
        run_id=1, node_id=5, node_config=node_config, state=RecordDict(),
        run_config={"client-data": "device"},
    )
    query = Message(RecordDict(), dst_node_id=5, message_type=f"query.{records.IDENTIFY_ACTION}")
    reply = identify(query, context)
    assert reply.content[records.METRICS][records.PARTITION_ID] == device_partition_id(node_config)


def test_trained_partitions_lists_the_averaged_replies_only():
    strategy = make_strategy()
    initial = adapters()
    messages = list(strategy.configure_train(1, ArrayRecord(initial), ConfigRecord(), IdentifyingGrid(1)))
    replies = []
    for partition, msg in zip((4, 9, 2), messages):
        reply = train_reply(msg, update_of_norm(0.5, initial, seed=partition), 10)
        reply.content[records.METRICS][records.PARTITION_ID] = partition
        replies.append(reply)
    replies.append(Message(Error(code=records.BUDGET_EXHAUSTED, reason="spent"), reply_to=messages[3]))
    strategy.aggregate_train(1, replies)
    assert strategy.last_round[records.TRAINED_PARTITIONS] == [2, 4, 9]


def test_seeded_sampling_is_off_under_user_level_dp_and_when_turned_off():
    assert isinstance(_seeded_sampling(load_config({"seed": 3}), 10.0), SeededSampling)
    assert _seeded_sampling(load_config({"seeded-sampling": False}), 10.0) is None
    user_dp = load_config({"user-dp.mode": "server-fixed", "user-dp.noise-multiplier": 1.0})
    assert user_dp.user_dp.enabled
    assert _seeded_sampling(user_dp, 10.0) is None
