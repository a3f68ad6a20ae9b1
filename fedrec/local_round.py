"""One client's round, independent of Flower: set adapters, train, return adapters."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fedrec.client_data import ClientData
from fedrec.config import FedRecConfig
from fedrec.examples import NextItemDataset, build_examples
from fedrec.model.adapters import adapter_state, load_adapter_state
from fedrec.evaluation import evaluate_scorer, histories_for, model_scorer
from fedrec.model.build import cached_recommender, token_table
from fedrec.prepare import PreparedData
from fedrec.runtime import configure_threads, select_device
from fedrec.tokens import TokenTable
from fedrec.training import TrainResult, make_loader, make_optimizer, train_local



@dataclass(frozen=True)
class RoundOutput:
    """The adapters after local training and what the training did."""

    adapters: "OrderedDict[str, torch.Tensor]"
    result: TrainResult
    num_examples: int


def round_seed(config: FedRecConfig, server_round: int, partition_id: int) -> int:
    """A distinct, reproducible seed for each client and round."""
    return (config.federation.seed * 1_000_003 + server_round * 10_007 + partition_id) % 2**31


def run_local_round(
    config: FedRecConfig,
    data: ClientData,
    table: TokenTable,
    global_adapters: dict[str, torch.Tensor],
    server_round: int,
) -> RoundOutput:
    """Train the received adapters on this client's examples for one round."""
    configure_threads(config.runtime)
    device = select_device(config.runtime)
    model = cached_recommender(config.model, config.lora).to(device)
    load_adapter_state(model.encoder, global_adapters)
    seed = round_seed(config, server_round, data.partition_id)
    examples = build_examples(data.sequences, config.model.history_items)
    if not examples:
        raise ValueError(f"partition {data.partition_id} has no training examples")
    dataset = NextItemDataset(
        examples, table, config.train.num_negatives, config.model.max_user_tokens, seed
    )
    torch.manual_seed(seed)
    loader = make_loader(dataset, config.train.batch_size, seed)
    optimizer = make_optimizer(model, config.train)
    result = train_local(model, loader, optimizer, config.train, device)
    return RoundOutput(adapter_state(model.encoder), result, num_examples=len(examples))


def evaluate_local(
    config: FedRecConfig,
    prepared: PreparedData,
    data: ClientData,
    global_adapters: dict[str, torch.Tensor],
) -> dict[str, float]:
    """Metrics of the global adapters on this client's own held-out (test) items."""
    configure_threads(config.runtime)
    device = select_device(config.runtime)
    model = cached_recommender(config.model, config.lora).to(device)
    load_adapter_state(model.encoder, global_adapters)
    scorer = model_scorer(
        model,
        token_table(prepared, config.model),
        histories_for(prepared, "test"),
        config.model.history_items,
        config.model.max_user_tokens,
        device,
    )
    return evaluate_scorer(scorer, prepared, "test", config.eval.k, users=data.users)
