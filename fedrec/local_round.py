"""One client's round, independent of Flower: set adapters, train, return adapters."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedrec.client_data import ClientData
from fedrec.config import FedRecConfig
from fedrec.evaluation import encode_items, evaluate_scorer, histories_for, model_scorer
from fedrec.examples import NextItemDataset, build_examples
from fedrec.hard_negatives import cached_text_neighbours
from fedrec.item_counts import planned_releases, popularity_prior
from fedrec.model.adapters import (
    adapter_state,
    load_adapter_state,
    load_local_adapter_state,
    local_adapter_state,
)
from fedrec.model.build import (
    cached_item_states,
    cached_recommender,
    token_table,
    training_recency,
)
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.prepare import PreparedData
from fedrec.privacy.accounting import AccountantState, delta_for, epsilon
from fedrec.privacy.budget import check_budget, noise_for, planned_steps
from fedrec.privacy.dp_sgd import (
    detach_private,
    make_private,
    poisson_sample_rate,
    state_after,
)
from fedrec.runtime import autocast, autocast_dtype, configure_threads, select_device
from fedrec.tokens import TokenTable
from fedrec.training import (
    TrainResult,
    make_loader,
    make_optimizer,
    round_lr_scale,
    train_local,
)


@dataclass(frozen=True)
class PrivacyReport:
    """What one private round spent, and the client's total so far."""

    epsilon: float
    """Total epsilon over every round this client trained in, at ``delta``."""
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    state: AccountantState
    """The accountant after this round: keep it for the next one."""


@dataclass(frozen=True)
class RoundOutput:
    """The adapters after local training and what the training did."""

    adapters: OrderedDict[str, torch.Tensor]
    """What the client sends."""
    result: TrainResult
    num_examples: int
    privacy: PrivacyReport | None = None
    local_adapters: OrderedDict[str, torch.Tensor] = field(default_factory=OrderedDict)
    """What the client keeps for its next round (FedSA-LoRA's lora_B; empty otherwise)."""


def round_seed(config: FedRecConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each client and round."""
    return (config.federation.seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


def run_local_round(
    config: FedRecConfig,
    data: ClientData,
    table: TokenTable,
    global_adapters: dict[str, torch.Tensor],
    server_round: int,
    accountant: AccountantState | None = None,
    proximal_mu: float = 0.0,
    local_adapters: dict[str, torch.Tensor] | None = None,
) -> RoundOutput:
    """Train the received adapters on this client's examples for one round.

    With ``dp.enabled`` the round runs under DP-SGD and continues ``accountant``
    (the client's state from earlier rounds; None on its first). It raises
    :class:`~fedrec.privacy.budget.BudgetExhausted`, before training, when the
    round would take the client past its budget. ``proximal_mu``: FedProx's term
    towards ``global_adapters`` (sent by the server; 0: none). ``local_adapters``:
    what this client kept from its last round under ``lora.local-b`` (None: its first).
    """
    configure_threads(config.runtime)
    device = select_device(config.runtime)
    model = cached_recommender(config.model, config.lora, len(table.item_ids)).to(device)
    model.train()  # the process's evaluations share this model and leave it in eval mode
    load_adapter_state(model.encoder, global_adapters)
    load_local_adapter_state(model.encoder, local_adapters)
    model.item_states = (
        cached_item_states(config.model, config.lora, table) if config.model.cache_frozen_items else None
    )
    model.recency = training_recency(config)  # set every round: the model is shared by the actor's clients
    seed = round_seed(config, server_round, data.partition_id)
    examples = build_examples(data.sequences, config.model.history_items)
    if not examples:
        raise ValueError(f"partition {data.partition_id} has no training examples")
    neighbours = (
        cached_text_neighbours(config.model, config.lora, table, config.train.hard_negative_pool)
        if config.train.hard_negatives
        else None
    )
    dataset = NextItemDataset(
        examples,
        table,
        config.train.num_negatives,
        config.model.max_user_tokens,
        seed,
        neighbours,
        config.train.hard_negatives,
        _own_item_vectors(model, table, data, device),
        data.unlisted,
    )
    torch.manual_seed(seed)
    loader = make_loader(dataset, config.train.batch_size, seed)
    lr_scale = round_lr_scale(config.train, server_round, config.federation.num_server_rounds)
    optimizer = make_optimizer(model, config.train, lr_scale)
    precision = autocast_dtype(config.runtime, device)
    if not config.dp.enabled:
        result = train_local(model, loader, optimizer, config.train, device, precision, proximal_mu)
        report = None
    else:
        state = accountant or AccountantState(config.dp.accountant)
        result, report = _train_privately(
            config, model, loader, optimizer, state, device, precision, proximal_mu
        )
    return RoundOutput(
        adapter_state(model.encoder), result, len(examples), report, local_adapter_state(model.encoder)
    )


def _own_item_vectors(
    model: TwoTowerRecommender, table: TokenTable, data: ClientData, device: torch.device
) -> torch.Tensor | None:
    """The embeddings [I, D] of this client's own items under the received model
    (other rows zero), which a sequence tower reads as its histories; None without one.

    Computed once a round, not differentiated: the tower learns on top of the item
    space it received (:mod:`fedrec.model.sequence_tower`).
    """
    if model.sequence_tower is None:
        return None
    own = np.unique(np.concatenate([np.asarray(s, dtype=np.int64) for s in data.sequences]))
    vectors = encode_items(model, table, device, only=own)
    model.train()  # encode_items leaves the model in evaluation mode
    return vectors


def _train_privately(
    config: FedRecConfig,
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    state: AccountantState,
    device: torch.device,
    precision: torch.dtype | None = None,
    proximal_mu: float = 0.0,
) -> tuple[TrainResult, PrivacyReport]:
    """The same training loop under DP-SGD, refused up front if over budget."""
    dp = config.dp
    num_examples = len(loader.dataset)
    delta = delta_for(dp, num_examples)
    rate = poisson_sample_rate(loader)
    steps = planned_steps(config.train, rate)
    noise = noise_for(
        dp, rate, steps, config.federation.num_server_rounds, delta, planned_releases(config)
    )
    check_budget(state, dp, delta, noise, rate, steps)
    private_model, private_optimizer, private_loader, engine = make_private(
        model, optimizer, loader, dp, noise, state
    )
    try:
        result = train_local(
            private_model, private_loader, private_optimizer, config.train, device, precision, proximal_mu
        )
    finally:
        detach_private(private_model)
    new_state = state_after(engine, state)
    if new_state.steps - state.steps != steps:  # the pre-check assumed exactly these steps
        raise RuntimeError(f"planned {steps} private steps, the accountant saw {new_state.steps - state.steps}")
    report = PrivacyReport(epsilon(new_state, delta), delta, noise, rate, steps, new_state)
    return result, report


def evaluate_local(
    config: FedRecConfig,
    prepared: PreparedData,
    data: ClientData,
    global_adapters: dict[str, torch.Tensor],
    item_counts: np.ndarray | None = None,
    local_adapters: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Metrics of the global adapters on this client's own held-out (test) items
    (``item_counts``: the run's summed counts, for ``popularity.*``; ``local_adapters``:
    the client's own lora_B under ``lora.local-b``, None before it has trained)."""
    configure_threads(config.runtime)
    device = select_device(config.runtime)
    table = token_table(prepared, config.model)
    model = cached_recommender(config.model, config.lora, len(table.item_ids)).to(device)
    load_adapter_state(model.encoder, global_adapters)
    load_local_adapter_state(model.encoder, local_adapters)
    with autocast(config.runtime, device):
        scorer = model_scorer(
            model,
            table,
            histories_for(prepared, "test"),
            config.model.history_items,
            config.model.max_user_tokens,
            device,
            config.personal,
            popularity_prior(item_counts, config.popularity),
        )
        return evaluate_scorer(scorer, prepared, "test", config.eval.k, users=data.users)
