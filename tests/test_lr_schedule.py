"""Learning-rate schedules over federated rounds: the factor, the optimizer, a client's round."""

import itertools
import math

import pytest
from torch import nn

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, TrainConfig, load_config
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.model.build import token_table
from fedrec.model.item_identity import MODULE_NAME as ITEM_IDENTITY
from fedrec.model.sequence_tower import MODULE_NAME as SEQUENCE_TOWER
from fedrec.prepare import prepare
from fedrec.training import make_optimizer, round_lr_scale
from tests.conftest import toy_run_config

ROUNDS = 5


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_a_schedule_starts_at_one_ends_at_lr_final_and_only_falls(schedule):
    train = TrainConfig(lr_schedule=schedule, lr_final=0.2)
    scales = [round_lr_scale(train, r, ROUNDS) for r in range(1, ROUNDS + 1)]
    assert scales[0] == 1.0
    assert scales[-1] == pytest.approx(0.2)
    assert all(a > b for a, b in itertools.pairwise(scales))
    assert scales[2] == pytest.approx(0.6)  # half-way: both shapes pass (1 + final) / 2
    # a resumed run past its plan stays at the final rate
    assert round_lr_scale(train, ROUNDS + 3, ROUNDS) == pytest.approx(0.2)


def test_the_two_shapes_differ_between_the_ends():
    cosine = round_lr_scale(TrainConfig(lr_schedule="cosine", lr_final=0.1), 2, ROUNDS)
    linear = round_lr_scale(TrainConfig(lr_schedule="linear", lr_final=0.1), 2, ROUNDS)
    assert cosine == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert linear == pytest.approx(0.1 + 0.9 * 0.75)


def test_constant_and_single_round_runs_keep_the_rate():
    assert round_lr_scale(TrainConfig(), ROUNDS, ROUNDS) == 1.0
    assert round_lr_scale(TrainConfig(lr_schedule="cosine"), 1, 1) == 1.0


def test_bad_schedule_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match="train.lr-schedule"):
        load_config({"train.lr-schedule": "step"})
    with pytest.raises(ConfigError, match="train.lr-final"):
        load_config({"train.lr-final": 0.0})
    assert load_config({"train.lr-schedule": "cosine"}).train.lr_schedule == "cosine"


class _WithIdentity(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(2, 2)
        setattr(self, ITEM_IDENTITY, nn.Embedding(3, 2))


class _WithIdentityAndTower(_WithIdentity):
    def __init__(self) -> None:
        super().__init__()
        setattr(self, SEQUENCE_TOWER, nn.Linear(2, 2))


def _rates(optimizer) -> dict[int, float]:
    listed = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed)), "a tensor is in two parameter groups"
    return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}


def test_the_optimizer_scales_the_adapter_and_identity_rates():
    optimizer = make_optimizer(_WithIdentity(), TrainConfig(lr=0.002, id_lr=0.01), lr_scale=0.5)
    assert sorted(g["lr"] for g in optimizer.param_groups) == pytest.approx([0.001, 0.005])


def test_each_part_trains_at_its_own_rate_and_unset_rates_fall_back_to_train_lr():
    model = _WithIdentityAndTower()
    tower, identity, adapter = (getattr(model, SEQUENCE_TOWER), getattr(model, ITEM_IDENTITY), model.adapter)
    rates = _rates(make_optimizer(model, TrainConfig(lr=0.002, id_lr=0.01, sequence_lr=0.004), lr_scale=0.5))
    assert rates[id(tower.weight)] == rates[id(tower.bias)] == pytest.approx(0.002)
    assert rates[id(identity.weight)] == pytest.approx(0.005)
    assert rates[id(adapter.weight)] == pytest.approx(0.001)
    assert len(rates) == len(list(model.parameters()))  # every trainable tensor
    unset = _rates(make_optimizer(model, TrainConfig(lr=0.002)))
    assert set(unset.values()) == {0.002}
    with pytest.raises(ConfigError, match="train.sequence-lr"):
        load_config({"train.sequence-lr": -1.0})


def _update_norm(run_config: dict, server_round: int) -> float:
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    start = GlobalModel(config, prepared).adapters()
    data = load_client_data(config, prepared, 0, 24)
    output = run_local_round(config, data, token_table(prepared, config.model), start, server_round)
    return sum(float((output.adapters[k] - v).square().sum()) for k, v in start.items()) ** 0.5


def test_a_client_round_trains_at_its_rounds_rate(tmp_path):
    settings = {"num-server-rounds": ROUNDS, "train.lr": 0.01, "model.item-ids": True}
    constant = toy_run_config(tmp_path, **settings)
    cosine = {**constant, "train.lr-schedule": "cosine", "train.lr-final": 0.01}
    # round 1 runs at the full rate under either schedule (the same seed: the same steps)
    assert _update_norm(cosine, 1) == pytest.approx(_update_norm(constant, 1), rel=1e-6)
    # the last round at 1 % of the rate: Adam's steps scale with the rate
    ratio = _update_norm(cosine, ROUNDS) / _update_norm(constant, ROUNDS)
    assert 0.005 < ratio < 0.02
