"""FedProx: the clients' proximal term, privately or not, and the server that sends its mu."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.client_app import train
from fedrec import records
from fedrec.config import ConfigError, load_config
from fedrec.global_model import GlobalModel
from fedrec.prepare import prepare
from fedrec.proximal import proximal_term
from tests.conftest import toy_run_config
from tests.test_strategy import (  # noqa: F401  (server_identity: autouse fixture)
    SETTINGS,
    FakeGrid,
    _bad,
    _round,
    adapters,
    server_identity,
)

MU = 0.5
STEPS = 4


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(8, 3, generator=generator), torch.randn(8, 1, generator=generator))


def _model() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(3, 1)


def _train_with_loss_term(mu: float) -> nn.Linear:
    """FedProx as its paper writes it: mu / 2 * ||w - w_global||^2 in the loss."""
    model = _model()
    start = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    x, y = _data().tensors
    for _ in range(STEPS):
        loss = nn.functional.mse_loss(model(x), y)
        loss = loss + mu / 2 * sum((p - s).square().sum() for p, s in zip(model.parameters(), start))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def _train_with_hook(model: nn.Module, optimizer, loader, mu: float) -> None:
    with proximal_term(optimizer, mu):
        for _ in range(STEPS):
            x, y = next(iter(loader))
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


def _weights(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_the_hook_takes_the_steps_of_the_loss_term():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_with_hook(model, optimizer, DataLoader(_data(), batch_size=8), MU)
    torch.testing.assert_close(_weights(model), _weights(_train_with_loss_term(MU)))
    # the term matters at this mu (else the comparison above would prove nothing)
    assert not torch.allclose(_weights(model), _weights(_train_with_loss_term(0.0)))
    assert not optimizer._optimizer_step_pre_hooks  # removed on exit


def test_under_opacus_the_term_is_added_after_clipping_and_noise():
    """Opacus rebuilds .grad from per-sample gradients, so a loss term would vanish;
    with no noise and no clipping, the private steps equal the non-private ones."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    private_model, private_optimizer, private_loader = PrivacyEngine().make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(_data(), batch_size=8),
        noise_multiplier=0.0,
        max_grad_norm=1e6,
        poisson_sampling=False,
    )
    _train_with_hook(private_model, private_optimizer, private_loader, MU)
    torch.testing.assert_close(_weights(model), _weights(_train_with_loss_term(MU)))


def test_mu_zero_changes_nothing_and_a_negative_mu_is_refused():
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_with_hook(model, optimizer, DataLoader(_data(), batch_size=8), 0.0)
    torch.testing.assert_close(_weights(model), _weights(_train_with_loss_term(0.0)))
    with pytest.raises(ValueError, match="mu"), proximal_term(optimizer, -1.0):
        pass


def test_fedprox_sends_mu_and_averages_like_fedavg():
    from server.strategy import server_strategy

    strategy = server_strategy("fedprox", server_lr=1.0, server_momentum=0.0, proximal_mu=0.25, **SETTINGS)
    messages = strategy.configure_train(1, ArrayRecord(adapters()), ConfigRecord(), FakeGrid(3))
    assert [m.content[records.CONFIG][records.PROXIMAL_MU] for m in messages] == [0.25] * 3
    initial, honest, aggregate = _round(strategy, _bad)
    for key in initial:
        torch.testing.assert_close(aggregate[key], initial[key] + honest[key])


def test_settings_that_would_drop_the_term_are_refused():
    with pytest.raises(ConfigError, match="proximal-mu"):
        load_config({"server-optimizer": "fedprox"})  # mu = 0: FedAvg in disguise
    with pytest.raises(ConfigError, match="proximal-mu"):
        load_config({"proximal-mu": -0.1})
    with pytest.raises(ConfigError, match="proximal-mu"):
        load_config({"proximal-mu": 0.1, "secagg.enabled": True})
    assert load_config({"proximal-mu": 0.1, "server-optimizer": "fedadam"}).federation.proximal_mu == 0.1


def _client_update_norm(tmp_path, mu: float | None) -> float:
    run_config = toy_run_config(
        tmp_path, **{"train.max-steps": 6, "train.batch-size": 2, "train.local-epochs": 3, "train.lr": 0.01}
    )
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    start = GlobalModel(config, prepared).adapters()
    sent = {records.SERVER_ROUND: 1}
    if mu is not None:
        sent[records.PROXIMAL_MU] = mu
    message = Message(
        RecordDict({records.ARRAYS: ArrayRecord(start), records.CONFIG: ConfigRecord(sent)}),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=7,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 24},
        state=RecordDict(),
        run_config=run_config,
    )
    reply = train(message, context)
    assert not reply.has_error(), reply.error
    trained = reply.content[records.ARRAYS].to_torch_state_dict()
    return sum(float((trained[k] - v).square().sum()) for k, v in start.items()) ** 0.5


def test_the_client_app_applies_the_mu_the_server_sent(tmp_path):
    free = _client_update_norm(tmp_path, None)
    assert _client_update_norm(tmp_path, 0.0) == pytest.approx(free, rel=1e-6)
    held = _client_update_norm(tmp_path, 1e4)  # the pull dominates every step after the first
    assert 0 < held < 0.5 * free
