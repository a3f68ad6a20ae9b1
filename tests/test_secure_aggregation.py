"""Secure aggregation (SecAgg+): settings, the client's mods, and whole rounds.

The protocol tests check what matters: the aggregate that SecAgg+ unmasks equals
the weighted FedAvg of the very updates the clients sent (within the bound on
its quantization error), also when a client drops out after sharing its keys.
They run the protocol twice: in process (a Grid that calls the ClientApp
directly; fast) and in a real Flower simulation with fedrec's own train handler.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from flwr.supercore.task_identity import TaskIdentity

from clients.client_app import identify
from clients.client_app import train as fedrec_train
from clients.mods import run_config_mod
from clients.secure_aggregation import SECAGG_MODS, secagg_mod, warn_if_clipped
from fedrec import records
from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.global_model import GlobalModel
from fedrec.model.adapter_arrays import join_keys
from fedrec.prepare import prepare
from fedrec.privacy.config import SecAggConfig
from server.sampling import SeededSampling, seeded_draw
from server.secure_aggregation import (
    SecAggFedRec,
    quantization_error_bound,
    secaggplus_workflow,
)
from tests.conftest import toy_run_config

# -- settings -------------------------------------------------------------------


def test_counts_become_ints_and_fractions_stay_floats():
    workflow = secaggplus_workflow(SecAggConfig())
    assert (workflow.num_shares, workflow.reconstruction_threshold) == (3, 2)
    assert type(workflow.num_shares) is int and type(workflow.reconstruction_threshold) is int
    assert workflow.timeout is None

    workflow = secaggplus_workflow(
        SecAggConfig(num_shares=0.5, reconstruction_threshold=0.6, timeout=30.0, max_weight=64.0)
    )
    assert type(workflow.num_shares) is float and workflow.num_shares == 0.5
    assert workflow.reconstruction_threshold == 0.6
    assert (workflow.timeout, workflow.max_weight) == (30.0, 64.0)


@pytest.mark.parametrize(
    ("settings", "key"),
    [
        (SecAggConfig(num_shares=3.5), "secagg.num-shares"),
        (SecAggConfig(num_shares=3.0, reconstruction_threshold=3.0), "secagg.reconstruction-threshold"),
    ],
)
def test_settings_flower_would_reject_are_named(settings, key):
    with pytest.raises(ConfigError, match=key):
        secaggplus_workflow(settings)


def test_two_shares_are_refused_when_set():
    """Flower's SecAgg+ needs more than 2 shares: the setting itself says so."""
    with pytest.raises(ConfigError, match="secagg.num-shares"):
        load_config({"secagg.num-shares": 2.0})


def test_secagg_needs_two_clients_a_round():
    config = load_config({"secagg.enabled": True, "min-train-nodes": 1})
    with pytest.raises(ConfigError, match="min-train-nodes"):
        SecAggFedRec(config, _context(0, 1, {}))


def test_error_bound_shrinks_with_a_tighter_max_weight():
    loose = quantization_error_bound([10, 20], SecAggConfig(max_weight=1000.0))
    tight = quantization_error_bound([10, 20], SecAggConfig(max_weight=20.0))
    assert loose == pytest.approx(50 * tight, rel=1e-3)
    assert tight == pytest.approx(2 * 2 * 8.0 / (1.5 * 2**22), rel=1e-3)


# -- the client's mods ----------------------------------------------------------


@pytest.fixture()
def task_identity(monkeypatch):
    """New Messages read the process's task identity, which Flower's runtimes set."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", SUPERLINK_NODE_ID)):
        monkeypatch.setattr(TaskIdentity, name, value)


STATE = OrderedDict(
    [("layer.1.lora_B.weight", torch.zeros(3, 2)), ("layer.0.lora_A.weight", torch.ones(2, 4))]
)
KEYS = sorted(STATE)


def _context(partition_id: int, num_partitions: int, run_config: dict) -> Context:
    return Context(
        run_id=1,
        node_id=100 + partition_id,
        node_config={"partition-id": partition_id, "num-partitions": num_partitions},
        state=RecordDict(),
        run_config=run_config,
    )


def _train_message(content: RecordDict, node_id: int = 100) -> Message:
    return Message(content, dst_node_id=node_id, message_type="train")


def _reply(msg: Message, state: dict, num_examples: int, **extra: float) -> Message:
    metrics = MetricRecord({records.NUM_EXAMPLES: num_examples, records.TRAIN_LOSS: 0.5, **extra})
    return Message(
        RecordDict({records.ARRAYS: ArrayRecord(state), records.METRICS: metrics}), reply_to=msg
    )


@pytest.mark.usefixtures("task_identity")
def test_secagg_mod_passes_plain_messages_through():
    plain = _train_message(
        RecordDict(
            {
                records.ARRAYS: ArrayRecord(STATE),
                records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1}),
            }
        )
    )
    seen = []

    def train(msg, context):
        seen.append(msg)
        return _reply(msg, msg.content[records.ARRAYS].to_torch_state_dict(), 7)

    app = ClientApp()
    app.train(mods=SECAGG_MODS)(train)
    reply = app(plain, _context(0, 1, {}))
    assert seen == [plain]
    assert reply.content[records.METRICS][records.NUM_EXAMPLES] == 7
    assert set(reply.content[records.ARRAYS]) == set(STATE)
    # Flower's mod alone would fail on it: this is why secagg_mod checks first.
    with pytest.raises(KeyError):
        secaggplus_mod(plain, _context(0, 1, {}), train)
    assert secagg_mod(plain, _context(0, 1, {}), train).content is not None


@pytest.mark.usefixtures("task_identity")
def test_legacy_fit_reaches_the_handler_as_named_adapters_and_returns_as_fitres():
    arrays = [STATE[k].numpy() for k in KEYS]
    fitins = FitIns(
        ndarrays_to_parameters(arrays),
        {records.SERVER_ROUND: 4, records.ADAPTER_KEYS: join_keys(KEYS)},
    )
    msg = _train_message(compat.fitins_to_recorddict(fitins, keep_input=True))
    seen = {}

    def train(msg, context):
        seen["state"] = msg.content[records.ARRAYS].to_torch_state_dict()
        seen["round"] = msg.content[records.CONFIG][records.SERVER_ROUND]
        trained = {k: v + 1 for k, v in seen["state"].items()}
        return _reply(msg, trained, 12)

    app = ClientApp()
    app.train(mods=SECAGG_MODS)(train)
    reply = app(msg, _context(0, 1, {}))

    assert list(seen["state"]) == KEYS and seen["round"] == 4
    for key in KEYS:
        assert torch.equal(seen["state"][key], STATE[key])
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    assert fitres.num_examples == 12 and fitres.metrics == {records.TRAIN_LOSS: 0.5}
    for key, array in zip(KEYS, parameters_to_ndarrays(fitres.parameters)):
        np.testing.assert_array_equal(array, STATE[key].numpy() + 1)


# -- whole SecAgg+ rounds in process -------------------------------------------


def _over_the_wire(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class LocalGrid:
    """A Grid that hands each message to a ClientApp in process (one Context per node).

    Contents are serialized both ways, as on the wire: each node gets its own copy.
    """

    def __init__(self, app: ClientApp, num_nodes: int, run_config: dict) -> None:
        self.app = app
        self.contexts = {
            100 + i: _context(i, num_nodes, dict(run_config)) for i in range(num_nodes)
        }
        self.run = SimpleNamespace(run_id=1)

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg.content = _over_the_wire(msg.content)
            try:
                reply = self.app(msg, self.contexts[msg.metadata.dst_node_id])
                if reply.has_content():
                    reply.content = _over_the_wire(reply.content)
                replies.append(reply)
            except Exception as err:  # noqa: BLE001 - a client failing is what we test
                replies.append(Message(Error(code=1, reason=repr(err)), reply_to=msg))
        return replies


def _weighted_average(updates: dict[int, tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates.values())
    return {
        k: sum(state[k].double() * n for state, n in updates.values()) / total for k in STATE
    }


def _assert_close(aggregate: dict, expected: dict, bound: float) -> None:
    """Within the quantization bound (plus float32 rounding of the aggregate)."""
    for key, value in expected.items():
        error = (aggregate[key].double() - value).abs().max().item()
        allowed = bound + 1e-7 * value.abs().max().item()
        assert error <= allowed, f"{key}: error {error:.3g} above the bound {allowed:.3g}"


def _run_in_process(
    fail,
    num_nodes: int = 5,
    num_rounds: int = 2,
    fraction_train: float = 1.0,
    seed: int | None = None,
    round_offset: int = 0,
):
    """SecAgg+ rounds over a LocalGrid; clients send deterministic updates.

    Client ``pid`` sends adapters + (pid + 1) / 100 + round / 10 with weight
    10 (pid + 1) and a DP-SGD epsilon of (pid + 1) / 10; ``fail(pid, round)`` may
    instead return ``"raise"`` (the client fails in the stage that collects masked
    vectors), ``"nan"`` (it sends NaN) or ``"refuse"`` (it replies with the error
    of a client whose privacy budget is spent).
    With ``fraction_train`` < 1 a round takes that share of the nodes (at least 2),
    drawn by seeded sampling from ``seed`` if given; ``round_offset``: a resumed run's.
    Returns (per-round figures, aggregates by round, updates sent by round, config).
    """
    sent: dict[int, dict[int, tuple[dict, int]]] = {}

    def train(msg, context):
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
        state = msg.content[records.ARRAYS].to_torch_state_dict()
        trained = {k: v + (pid + 1) / 100 + server_round / 10 for k, v in state.items()}
        num_examples = 10 * (pid + 1)
        failure = fail(pid, server_round)
        if failure == "raise":
            raise RuntimeError(f"client {pid} drops out after sharing its keys")
        if failure == "refuse":
            return Message(Error(code=records.BUDGET_EXHAUSTED, reason="budget spent"), reply_to=msg)
        if failure == "nan":
            trained = {k: torch.full_like(v, float("nan")) for k, v in trained.items()}
        else:
            sent.setdefault(server_round, {})[pid] = (trained, num_examples)
        privacy = {records.PARTITION_ID: pid, records.EPSILON: (pid + 1) / 10}
        return _reply(msg, trained, num_examples, **privacy)

    app = ClientApp()
    app.train(mods=SECAGG_MODS)(train)
    app.query(records.IDENTIFY_ACTION)(identify)
    run_config = {
        "secagg.enabled": True,
        "secagg.max-weight": float(10 * num_nodes),
        "fraction-train": fraction_train,
        "min-train-nodes": num_nodes if fraction_train == 1.0 else 2,
    }
    config = load_config(run_config)
    aggregates = {}

    def evaluate(server_round, arrays):
        aggregates[server_round] = arrays.to_torch_state_dict()
        return MetricRecord({"evaluated": 1.0})

    sampling = None if seed is None else SeededSampling(seed, timeout=10.0)
    strategy = SecAggFedRec(config, _context(0, 1, run_config), round_offset=round_offset, sampling=sampling)
    grid = LocalGrid(app, num_nodes, run_config)
    rounds = strategy.start(grid, ArrayRecord(STATE), num_rounds, evaluate_fn=evaluate)
    return rounds, aggregates, sent, config


@pytest.mark.usefixtures("task_identity")
def test_in_process_rounds_match_weighted_fedavg_and_survive_a_dropout():
    rounds, aggregates, sent, config = _run_in_process(
        lambda pid, server_round: "raise" if (pid, server_round) == (0, 2) else None
    )

    assert sorted(aggregates) == [0, 1, 2]
    assert [r[records.ROUND] for r in rounds] == [1, 2]
    assert sorted(sent[1]) == [0, 1, 2, 3, 4] and sorted(sent[2]) == [1, 2, 3, 4]
    for server_round, expected_failures in ((1, 0), (2, 1)):
        stats = rounds[server_round - 1]
        assert stats[records.CLIENTS] == 5 and stats[records.FAILURES] == expected_failures
        bound = stats[records.SECAGG_ERROR_BOUND]
        assert bound == quantization_error_bound(
            [n for _, n in sent[server_round].values()], config.secagg
        )
        assert 0 < bound < 1e-4
        _assert_close(aggregates[server_round], _weighted_average(sent[server_round]), bound)
        assert aggregates[server_round][KEYS[0]].dtype == torch.float32
        # Every stage is metered: more than the adapters go down and up.
        adapter_bytes = ArrayRecord(STATE).count_bytes()
        assert stats[records.BYTES_DOWN_PER_CLIENT] > adapter_bytes
        assert stats[records.BYTES_UP_PER_CLIENT] > adapter_bytes
        assert stats[records.TRAIN_LOSS] == pytest.approx(0.5)
    # Unweighted averaging would differ by far more than the bound.
    unweighted = {k: sum(s[k] for s, _ in sent[1].values()) / 5 for k in STATE}
    gap = (aggregates[1][KEYS[0]] - unweighted[KEYS[0]]).abs().max().item()
    assert gap > 100 * rounds[0][records.SECAGG_ERROR_BOUND]


@pytest.mark.usefixtures("task_identity")
def test_a_client_with_a_nan_update_drops_out_instead_of_poisoning_the_sum():
    rounds, aggregates, sent, _ = _run_in_process(
        lambda pid, server_round: "nan" if pid == 2 else None, num_nodes=4, num_rounds=1
    )
    assert sorted(sent[1]) == [0, 1, 3]
    assert rounds[0][records.FAILURES] == 1
    assert all(torch.isfinite(t).all() for t in aggregates[1].values())
    _assert_close(aggregates[1], _weighted_average(sent[1]), rounds[0][records.SECAGG_ERROR_BOUND])


@pytest.mark.usefixtures("task_identity")
def test_dp_sgd_epsilons_and_budget_refusals_are_reported():
    rounds, _, sent, _ = _run_in_process(
        lambda pid, server_round: "refuse" if pid == 3 else None, num_nodes=4, num_rounds=1
    )
    stats = rounds[0]
    assert sorted(sent[1]) == [0, 1, 2]
    assert stats[records.FAILURES] == 1 and stats[records.BUDGET_REFUSALS] == 1
    assert stats[records.EPSILON_MAX] == pytest.approx(0.3)
    assert stats[records.CLIENT_EPSILONS] == {"0": 0.1, "1": 0.2, "2": 0.3}
    assert records.EPSILON not in stats and records.PARTITION_ID not in stats  # not averaged


@pytest.mark.usefixtures("task_identity")
def test_seeded_sampling_draws_the_same_partitions_through_secagg():
    """Half of 6 nodes a round, drawn by the seeded draw over partition ids, as without SecAgg+."""
    draws = {}
    for seed in (3, 3, 4):
        rounds, _, sent, _ = _run_in_process(lambda pid, r: None, num_nodes=6, num_rounds=3, fraction_train=0.5, seed=seed)
        trained = [r[records.TRAINED_PARTITIONS] for r in rounds]
        assert trained == [sorted(sent[r]) for r in (1, 2, 3)]  # the partitions whose updates were summed
        assert all(len(t) == 3 for t in trained)
        draws.setdefault(seed, []).append(trained)
    nodes = {100 + p: p for p in range(6)}  # LocalGrid's node ids
    expected = [sorted(nodes[n] for n in seeded_draw(nodes, 3, 3, r)) for r in (1, 2, 3)]
    assert draws[3] == [expected, expected]
    assert draws[4][0] != expected
    # a run resumed after round 1 draws what the uninterrupted run drew in rounds 2 and 3
    rounds, _, sent, _ = _run_in_process(lambda pid, r: None, 6, 2, fraction_train=0.5, seed=3, round_offset=1)
    assert [r[records.TRAINED_PARTITIONS] for r in rounds] == expected[1:]
    assert sorted(sent) == [2, 3]


def test_user_level_dp_is_refused_with_secagg():
    config = load_config({"secagg.enabled": True, "user-dp.mode": "server-fixed"})
    with pytest.raises(ConfigError, match="user-dp.mode"):
        SecAggFedRec(config, _context(0, 1, {}))


def test_clipping_is_reported(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("fedrec"), "propagate", True)  # to caplog
    state = SecAggPlusState(clipping_range=8.0, max_weight=100.0)
    arrays = [np.array([0.5, -20.0], dtype=np.float32)]
    assert not warn_if_clipped(arrays, num_examples=10, state=state)  # 20 x 0.1 = 2 < 8
    assert warn_if_clipped(arrays, num_examples=50, state=state)  # 20 x 0.5 = 10 > 8
    assert "secagg.clipping-range" in caplog.text


# -- a real Flower simulation with fedrec's train handler ------------------------

NUM_CLIENTS = 4
DROPPED = 0  # partition that fails in round 2, in the stage that collects masked vectors


def _simulation_apps(run_config: dict, out: Path, found: dict) -> tuple[ServerApp, ClientApp]:
    """fedrec's train handler behind the SecAgg+ mods; a ServerApp running SecAggFedRec.

    ``run_simulation`` has no run config, so a mod hands the test's to each client
    (in a copy of its Context that shares the node's state: Flower forbids changing
    the run config in place).
    Each client saves the update it sends; partition DROPPED fails in round 2.
    """

    client = ClientApp(mods=[run_config_mod(run_config)])

    @client.train(mods=SECAGG_MODS)
    def recorded_train(msg, context):
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
        if server_round == 2 and pid == DROPPED:
            raise RuntimeError("dropping out after sharing keys")
        reply = fedrec_train(msg, context)
        update = {
            "adapters": reply.content[records.ARRAYS].to_torch_state_dict(),
            "num_examples": int(reply.content[records.METRICS][records.NUM_EXAMPLES]),
        }
        torch.save(update, out / f"update-r{server_round}-p{pid}.pt")
        return reply

    server = ServerApp()

    @server.main()
    def main(grid, context):
        config = load_config(run_config)
        model = GlobalModel(config, prepare(config.data, config.eval))
        found["initial"] = model.adapters()
        found["aggregates"] = {}

        def evaluate(server_round, arrays):
            found["aggregates"][server_round] = arrays.to_torch_state_dict()

        strategy = SecAggFedRec(config, context)
        found["rounds"] = strategy.start(
            grid, ArrayRecord(model.adapters()), config.federation.num_server_rounds, evaluate
        )

    return server, client


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("secagg")
    run_config = toy_run_config(
        folder,
        **{
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            "min-train-nodes": NUM_CLIENTS,
            "partition.scheme": "iid",
            "partition.num-partitions": NUM_CLIENTS,
            "runtime.threads": 1,
            "secagg.enabled": True,
            "train.max-steps": 0,  # a whole epoch: clients weigh differently
            "secagg.max-weight": 100.0,  # above any client's examples (about 30-40 here)
        },
    )
    config = load_config(run_config)
    prepare(config.data, config.eval)  # once, before the clients read the cache
    out = folder / "updates"
    out.mkdir()
    found: dict = {}
    server, client = _simulation_apps(run_config, out, found)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    assert "rounds" in found, "the ServerApp did not finish; see the log above"
    updates = {}
    for path in out.glob("update-r*-p*.pt"):
        server_round, pid = (int(part[1:]) for part in path.stem.split("-")[1:])
        update = torch.load(path)
        updates.setdefault(server_round, {})[pid] = (update["adapters"], update["num_examples"])
    return config, found, updates


def _expected(updates: dict[int, tuple[dict, int]]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in updates.values())
    keys = next(iter(updates.values()))[0]
    return {k: sum(s[k].double() * n for s, n in updates.values()) / total for k in keys}


@pytest.mark.slow
def test_simulated_secagg_equals_weighted_fedavg_of_the_sent_updates(simulated):
    config, found, updates = simulated
    stats = found["rounds"][0]
    assert sorted(updates[1]) == list(range(NUM_CLIENTS))
    assert len({n for _, n in updates[1].values()}) > 1, "the clients should weigh differently"
    assert stats[records.CLIENTS] == NUM_CLIENTS and stats[records.FAILURES] == 0
    bound = stats[records.SECAGG_ERROR_BOUND]
    assert bound == quantization_error_bound([n for _, n in updates[1].values()], config.secagg)
    expected = _expected(updates[1])
    aggregate = found["aggregates"][1]
    _assert_close(aggregate, expected, bound)
    # Training moved the adapters by far more than the quantization error.
    moved = max((aggregate[k] - found["initial"][k]).abs().max().item() for k in expected)
    assert moved > 100 * bound
    assert stats[records.TRAIN_LOSS] > 0


@pytest.mark.slow
def test_simulated_round_survives_a_client_dropping_out(simulated):
    _, found, updates = simulated
    stats = found["rounds"][1]
    survivors = sorted(set(range(NUM_CLIENTS)) - {DROPPED})
    assert sorted(updates[2]) == survivors
    assert stats[records.CLIENTS] == NUM_CLIENTS and stats[records.FAILURES] == 1
    _assert_close(found["aggregates"][2], _expected(updates[2]), stats[records.SECAGG_ERROR_BOUND])
