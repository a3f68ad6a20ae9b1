"""User-level DP (DP-FedAvg): accounting over rounds, Flower's wrappers around FedRecAvg,
and the ClientApp's clipping mod, on real Flower Messages."""

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyServerSideAdaptiveClipping,
    FedAvg,
)
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM, KEY_NORM_BIT
from flwr.supercore.task_identity import TaskIdentity
from opacus.accountants import RDPAccountant

from clients.mods import user_dp_clipping_mod
from fedrec import records
from fedrec.errors import ConfigError
from fedrec.privacy.config import UserLevelDPConfig
from fedrec.privacy.user_level import accounted_noise_multiplier, user_level_epsilon
from server.strategy import FedRecAvg
from server.user_dp import clients_per_round, user_dp_metrics, wrap_strategy

MODES = ("server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


# ---------------------------------------------------------------- accounting


def rdp_epsilon(noise: float, rate: float, rounds: int, delta: float) -> float:
    """Epsilon of ``rounds`` sampled Gaussian steps, straight from Opacus."""
    accountant = RDPAccountant()
    for _ in range(rounds):
        accountant.step(noise_multiplier=noise, sample_rate=rate)
    return accountant.get_epsilon(delta=delta)


def test_epsilon_is_opacus_rdp_over_rounds():
    config = UserLevelDPConfig(mode="server-fixed", noise_multiplier=1.1)
    epsilon, delta = user_level_epsilon(config, sample_rate=0.1, rounds=20, num_clients=200)
    assert delta == pytest.approx(1 / 2000)  # 1/(10 N)
    assert epsilon == pytest.approx(rdp_epsilon(1.1, 0.1, 20, 1 / 2000), rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    def eps(noise, rounds):
        config = UserLevelDPConfig(mode="client-fixed", noise_multiplier=noise)
        return user_level_epsilon(config, 0.05, rounds, 1000)[0]

    assert 0 < eps(1.0, 1) < eps(1.0, 10) < eps(1.0, 100)
    assert eps(0.7, 50) > eps(1.0, 50) > eps(2.0, 50)


def test_unamplified_epsilon_is_the_gaussian_mechanism_every_round():
    config = UserLevelDPConfig(mode="server-fixed", noise_multiplier=2.0, delta=1e-5)
    amplified, delta = user_level_epsilon(config, 0.1, 30, 100)
    unamplified, _ = user_level_epsilon(config, 0.1, 30, 100, amplified=False)
    assert delta == 1e-5
    assert unamplified == pytest.approx(rdp_epsilon(2.0, 1.0, 30, 1e-5), rel=1e-9)
    assert unamplified > 3 * amplified


def test_prv_accountant_is_no_looser_than_rdp():
    config = UserLevelDPConfig(mode="server-fixed", noise_multiplier=1.0)
    rdp, _ = user_level_epsilon(config, 0.1, 20, 100)
    prv, _ = user_level_epsilon(config, 0.1, 20, 100, accountant="prv")
    assert 0 < prv <= rdp


def test_no_rounds_no_noise_and_off():
    noisy = UserLevelDPConfig(mode="server-fixed", noise_multiplier=1.0)
    assert user_level_epsilon(noisy, 0.1, 0, 100)[0] == 0.0
    silent = UserLevelDPConfig(mode="server-fixed", noise_multiplier=0.0)
    assert user_level_epsilon(silent, 0.1, 3, 100)[0] == math.inf
    assert user_level_epsilon(UserLevelDPConfig(), 0.1, 3, 100)[0] == math.inf
    with pytest.raises(ValueError, match="sample_rate"):
        user_level_epsilon(noisy, 0.0, 3, 100)


def test_adaptive_accounts_for_the_noise_flower_adds_and_its_clipped_count():
    """Flower turns z into an update multiplier and a count std; both are released."""
    z, m, n = 1.0, 20, 100
    wrapper = DifferentialPrivacyServerSideAdaptiveClipping(FedAvg(), z, m)
    combined = (wrapper.noise_multiplier**-2 + wrapper.clipped_count_stddev**-2) ** -0.5
    config = UserLevelDPConfig(mode="server-adaptive", noise_multiplier=z)
    assert accounted_noise_multiplier(config, m) == pytest.approx(combined)
    assert combined < z  # the count of 0/1 bits has sensitivity 1, not Andrew et al.'s 1/2
    epsilon, delta = user_level_epsilon(config, m / n, 10, n)
    assert epsilon == pytest.approx(rdp_epsilon(combined, m / n, 10, delta), rel=1e-9)
    fixed = UserLevelDPConfig(mode="server-fixed", noise_multiplier=z)
    assert epsilon > user_level_epsilon(fixed, m / n, 10, n)[0]


def test_adaptive_noise_too_large_for_the_clients_is_a_config_error():
    config = UserLevelDPConfig(mode="client-adaptive", noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="user-dp.noise-multiplier"):
        wrap_strategy(make_strategy(), config, num_sampled_clients=5)


# ---------------------------------------------- wrappers on real Flower Messages


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    """The run/node/task ids a ServerApp process has, so that Messages can be built."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class FakeGrid:
    """All that FedAvg.configure_train asks of a Grid: the connected node ids."""

    def __init__(self, num_nodes: int):
        self.node_ids = list(range(1, num_nodes + 1))

    def get_node_ids(self):
        return self.node_ids


STRATEGY_SETTINGS = {
    "fraction_train": 1.0,
    "fraction_evaluate": 0.0,
    "min_train_nodes": 1,
    "min_available_nodes": 1,
    "weighted_by_key": records.NUM_EXAMPLES,
    "arrayrecord_key": records.ARRAYS,
    "configrecord_key": records.CONFIG,
}
"""Strategy arguments as server_app passes them (weighted by num-examples), all nodes sampled."""


def make_strategy(**kwargs) -> FedRecAvg:
    """FedRecAvg built as server_app builds it."""
    return FedRecAvg(**{**STRATEGY_SETTINGS, **kwargs})


def adapters(shape_a=(4, 6), shape_b=(6, 4), seed=0) -> OrderedDict:
    generator = torch.Generator().manual_seed(seed)
    return OrderedDict(
        [
            ("lora_A.weight", torch.randn(shape_a, generator=generator)),
            ("lora_B.weight", torch.zeros(shape_b)),
        ]
    )


def update_of_norm(norm: float, like: OrderedDict, seed: int) -> OrderedDict:
    generator = torch.Generator().manual_seed(seed)
    update = OrderedDict((k, torch.randn(v.shape, generator=generator)) for k, v in like.items())
    scale = norm / math.sqrt(sum(float(u.square().sum()) for u in update.values()))
    return OrderedDict((k, u * scale) for k, u in update.items())


def clipped(update: OrderedDict, norm: float) -> OrderedDict:
    """The update scaled down to L2 norm ``norm`` if longer (McMahan et al.'s flat clipping)."""
    length = math.sqrt(sum(float(u.double().square().sum()) for u in update.values()))
    return OrderedDict((k, u * min(1.0, norm / length)) for k, u in update.items())


def train_reply(msg: Message, update: OrderedDict, num_examples: int) -> Message:
    """What clients/client_app.py's train sends back: adapters and metrics."""
    received = msg.content[records.ARRAYS].to_torch_state_dict()
    trained = OrderedDict((k, received[k] + update[k]) for k in received)
    metrics = MetricRecord(
        {records.NUM_EXAMPLES: num_examples, records.TRAIN_LOSS: 0.5, records.TRAIN_STEPS: 2}
    )
    return Message(
        RecordDict({records.ARRAYS: ArrayRecord(trained), records.METRICS: metrics}),
        reply_to=msg,
    )


def client_app(updates: dict, examples: dict, mods: list) -> ClientApp:
    """A ClientApp whose train adds a fixed update per node, with ``mods`` on train."""
    app = ClientApp()

    @app.train(mods=mods)
    def train(msg: Message, context: Context) -> Message:
        node = msg.metadata.dst_node_id
        return train_reply(msg, updates[node], examples[node])

    return app


def client_context(mode: str) -> Context:
    return Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config={"user-dp.mode": mode},
    )


def run_round(wrapped, global_state, updates, examples, mode, mods=None, drop=()):
    """configure_train, the clients' replies (through a ClientApp for client modes),
    aggregate_train: what Strategy.start does in one round."""
    messages = list(wrapped.configure_train(1, ArrayRecord(global_state), ConfigRecord(), GRID))
    if mode.startswith("client"):
        app = client_app(updates, examples, [user_dp_clipping_mod] if mods is None else mods)
        replies = [app(msg, client_context(mode)) for msg in messages]
    else:
        replies = [
            train_reply(msg, updates[msg.metadata.dst_node_id], examples[msg.metadata.dst_node_id])
            for msg in messages
        ]
    replies = [r for r in replies if r.metadata.src_node_id not in drop]
    arrays, metrics = wrapped.aggregate_train(1, replies)
    return messages, replies, arrays, metrics


NUM_NODES = 3
GRID = FakeGrid(NUM_NODES)
CLIP = 0.1
NORMS = {1: 0.05, 2: 0.3, 3: 2.0}  # one under the clipping norm, two over
EXAMPLES = {1: 1, 2: 10, 3: 100}  # weighted by these, node 3 would dominate


@pytest.mark.parametrize("mode", MODES)
def test_noiseless_aggregate_is_the_equal_weight_mean_of_clipped_updates(mode):
    global_state = adapters()
    updates = {n: update_of_norm(norm, global_state, seed=n) for n, norm in NORMS.items()}
    strategy = make_strategy(round_offset=4)
    config = UserLevelDPConfig(mode=mode, noise_multiplier=0.0, clipping_norm=CLIP)
    wrapped = wrap_strategy(strategy, config, clients_per_round(strategy, NUM_NODES))
    assert wrapped is not strategy and wrapped.num_sampled_clients == NUM_NODES

    messages, _, arrays, _ = run_round(wrapped, global_state, updates, EXAMPLES, mode)

    expected = {
        k: g + sum(clipped(u, CLIP)[k] for u in updates.values()) / NUM_NODES
        for k, g in global_state.items()
    }
    result = arrays.to_torch_state_dict()
    for key in global_state:
        torch.testing.assert_close(result[key], expected[key], rtol=1e-5, atol=1e-6)
    # FedRecAvg's bookkeeping still runs inside the wrapper
    assert all(m.content[records.CONFIG][records.SERVER_ROUND] == 5 for m in messages)
    assert strategy.last_round[records.CLIENTS] == NUM_NODES
    assert strategy.last_round[records.FAILURES] == 0
    wire_bytes = ArrayRecord(global_state).count_bytes()
    assert strategy.last_round[records.BYTES_UP_PER_CLIENT] == wire_bytes
    assert strategy.last_round[records.TRAIN_LOSS] == pytest.approx(0.5)
    if mode.endswith("adaptive"):  # 2 of 3 clipped, no count noise: Flower's geometric step
        assert wrapped.clipping_norm == pytest.approx(CLIP * math.exp(-0.2 * (2 / 3 - 0.5)))
        assert user_dp_metrics(wrapped, config, 1, NUM_NODES)[records.USER_CLIPPING_NORM] == CLIP


def test_rejected_and_missing_replies_count_as_zero_updates():
    global_state = adapters()
    updates = {n: update_of_norm(norm, global_state, seed=n) for n, norm in NORMS.items()}
    updates[2] = OrderedDict((k, torch.full_like(v, float("nan"))) for k, v in global_state.items())
    strategy = make_strategy()
    config = UserLevelDPConfig(mode="server-fixed", noise_multiplier=0.0, clipping_norm=CLIP)
    wrapped = wrap_strategy(strategy, config, NUM_NODES)

    *_, arrays, _ = run_round(wrapped, global_state, updates, EXAMPLES, "server-fixed", drop={3})

    result = arrays.to_torch_state_dict()
    for key, g in global_state.items():  # node 1's update over m = 3, not over the 1 left
        torch.testing.assert_close(result[key], g + updates[1][key] / 3, rtol=1e-5, atol=1e-6)
    assert strategy.last_round[records.FAILURES] == 1


def test_client_modes_reject_updates_the_client_did_not_clip(caplog):
    """A ClientApp without the clipping mod: the server counts its long updates as zero."""
    global_state = adapters()
    updates = {n: update_of_norm(norm, global_state, seed=n) for n, norm in NORMS.items()}
    strategy = make_strategy()
    config = UserLevelDPConfig(mode="client-fixed", noise_multiplier=0.0, clipping_norm=CLIP)
    wrapped = wrap_strategy(strategy, config, NUM_NODES)

    *_, arrays, _ = run_round(wrapped, global_state, updates, EXAMPLES, "client-fixed", mods=[])

    result = arrays.to_torch_state_dict()
    for key, g in global_state.items():  # only node 1's update (0.05 < 0.1) gets in
        torch.testing.assert_close(result[key], g + updates[1][key] / 3, rtol=1e-5, atol=1e-6)
    assert strategy.last_round[records.FAILURES] == 2
    assert "user_dp_clipping_mod" in caplog.text


BIG = 200 * 100  # entries, so that the sample std of the noise is within ~1%


def noise_of(arrays: ArrayRecord, expected: dict) -> np.ndarray:
    result = arrays.to_torch_state_dict()
    return torch.cat([(result[k] - expected[k]).flatten() for k in expected]).double().numpy()


def test_fixed_clipping_noise_std_is_z_clip_over_m():
    np.random.seed(0)  # Flower draws its noise from numpy's global generator
    global_state = adapters((200, 50), (50, 200))
    updates = {n: update_of_norm(norm, global_state, seed=n) for n, norm in NORMS.items()}
    z, clip = 1.0, 0.5
    config = UserLevelDPConfig(mode="server-fixed", noise_multiplier=z, clipping_norm=clip)
    wrapped = wrap_strategy(make_strategy(), config, NUM_NODES)

    *_, arrays, _ = run_round(wrapped, global_state, updates, EXAMPLES, "server-fixed")

    expected = {
        k: g + sum(clipped(u, clip)[k] for u in updates.values()) / NUM_NODES
        for k, g in global_state.items()
    }
    noise = noise_of(arrays, expected)
    assert noise.size == BIG
    assert abs(noise.mean()) < 0.01
    assert noise.std() == pytest.approx(z * clip / NUM_NODES, rel=0.03)


def test_adaptive_noise_follows_the_norm_the_round_was_clipped_to():
    """Flower would noise at the updated norm (~10% lower here); we noise at the round's."""
    np.random.seed(0)
    m, z, clip = 20, 1.0, 0.5
    grid = FakeGrid(m)
    global_state = adapters((200, 50), (50, 200))
    updates = {n: update_of_norm(2.0, global_state, seed=n) for n in grid.node_ids}  # all clipped
    config = UserLevelDPConfig(mode="server-adaptive", noise_multiplier=z, clipping_norm=clip)
    wrapped = wrap_strategy(make_strategy(), config, m)
    messages = list(wrapped.configure_train(1, ArrayRecord(global_state), ConfigRecord(), grid))
    replies = [train_reply(msg, updates[msg.metadata.dst_node_id], 5) for msg in messages]

    arrays, _ = wrapped.aggregate_train(1, replies)

    expected = {
        k: g + sum(clipped(u, clip)[k] for u in updates.values()) / m
        for k, g in global_state.items()
    }
    std = noise_of(arrays, expected).std()
    assert wrapped.clipping_norm < 0.95 * clip  # the norm for the next round
    assert std == pytest.approx(wrapped.noise_multiplier * clip / m, rel=0.03)
    metrics = user_dp_metrics(wrapped, config, 1, 100)
    assert metrics[records.USER_CLIPPING_NORM] == clip
    assert metrics[records.USER_EPSILON] < metrics[records.USER_EPSILON_UNAMPLIFIED]


def test_off_wraps_nothing():
    strategy = make_strategy()
    config = UserLevelDPConfig(mode="off")
    assert wrap_strategy(strategy, config, NUM_NODES) is strategy
    assert strategy.weighted_by_key == records.NUM_EXAMPLES
    assert strategy.user_dp_clients == 0
    assert user_dp_metrics(strategy, config, 3, NUM_NODES) == {}


# ------------------------------------------------------------- the client mod


def train_message(config: ConfigRecord, state: OrderedDict) -> Message:
    return Message(
        RecordDict({records.ARRAYS: ArrayRecord(state), records.CONFIG: config}),
        dst_node_id=3,
        message_type=MessageType.TRAIN,
    )


def reply_update(reply: Message, state: OrderedDict) -> float:
    received = reply.content[records.ARRAYS].to_torch_state_dict()
    return math.sqrt(sum(float((received[k] - v).square().sum()) for k, v in state.items()))


@pytest.mark.parametrize("mode", ["off", "server-fixed", "client-fixed", "client-adaptive"])
def test_mod_passes_through_without_the_clipping_norm(mode):
    state = adapters()
    app = client_app({3: update_of_norm(2.0, state, 3)}, {3: 7}, [user_dp_clipping_mod])
    reply = app(train_message(ConfigRecord({records.SERVER_ROUND: 1}), state), client_context(mode))
    assert not reply.has_error()
    assert reply_update(reply, state) == pytest.approx(2.0, rel=1e-5)
    assert KEY_NORM_BIT not in reply.content[records.METRICS]


@pytest.mark.parametrize("mode", ["client-fixed", "client-adaptive"])
def test_mod_clips_when_the_server_sends_a_clipping_norm(mode):
    state = adapters()
    app = client_app({3: update_of_norm(2.0, state, 3)}, {3: 7}, [user_dp_clipping_mod])
    config = ConfigRecord({records.SERVER_ROUND: 1, KEY_CLIPPING_NORM: CLIP})
    reply = app(train_message(config, state), client_context(mode))
    assert not reply.has_error()
    assert reply_update(reply, state) == pytest.approx(CLIP, rel=1e-4)
    norm_bit = reply.content[records.METRICS].get(KEY_NORM_BIT)
    assert norm_bit == (1 if mode == "client-adaptive" else None)

