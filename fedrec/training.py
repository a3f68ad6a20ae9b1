"""Local training: one loop, private or not.

DP-SGD (Opacus) wraps the model, optimizer and data loader before this loop
runs, and returns the same three objects; the loop itself never forks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from fedrec.config import TrainConfig
from fedrec.examples import NextItemDataset
from fedrec.model.adapters import LORA, trained_part
from fedrec.model.item_identity import MODULE_NAME as ITEM_IDENTITY
from fedrec.model.sequence_tower import MODULE_NAME as SEQUENCE_TOWER
from fedrec.proximal import proximal_term

BATCH_KEYS = (
    "user_ids",
    "user_mask",
    "item_ids",
    "item_mask",
    "items",
    "history",
    "history_mask",
    "history_vectors",
)
"""The model's inputs, in the order of its ``forward``."""


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    loss: float
    steps: int
    examples: int


def make_loader(dataset: NextItemDataset, batch_size: int, seed: int) -> DataLoader:
    """A shuffling loader over the client's examples."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)


def round_lr_scale(config: TrainConfig, server_round: int, num_rounds: int) -> float:
    """The factor on the learning rates in federated round ``server_round`` (1-based)
    of ``num_rounds``, by ``train.lr-schedule``: 1 in round 1, ``train.lr-final`` in
    the last round and after it (a resumed run that goes past its plan)."""
    if config.lr_schedule == "constant" or num_rounds <= 1:
        return 1.0
    progress = min(max((server_round - 1) / (num_rounds - 1), 0.0), 1.0)
    if config.lr_schedule == "linear":
        shape = 1.0 - progress
    elif config.lr_schedule == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown train.lr-schedule {config.lr_schedule!r}")
    return config.lr_final + (1.0 - config.lr_final) * shape


def make_optimizer(
    model: nn.Module, config: TrainConfig, lr_scale: float = 1.0
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only: the adapters at ``train.lr``, an
    item-identity table at ``train.id-lr`` and a sequence tower at
    ``train.sequence-lr`` (each when set, else ``train.lr``), all times
    ``lr_scale`` (:func:`round_lr_scale`)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; were the adapters added?")
    part_lr = {LORA: config.lr, ITEM_IDENTITY: config.id_lr or config.lr, SEQUENCE_TOWER: config.sequence_lr or config.lr}
    groups = [
        {"params": [p for n, p in trainable if trained_part(n) == part], "lr": lr * lr_scale}
        for part, lr in part_lr.items()
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=config.lr * lr_scale, weight_decay=config.weight_decay)


def _batches(loader: Iterable[dict[str, torch.Tensor]], epochs: int) -> Iterable[dict[str, torch.Tensor]]:
    for _ in range(epochs):
        yield from loader


def _empty_step(optimizer: torch.optim.Optimizer) -> None:
    """A step on no examples.

    Parameters carrying Opacus' ``grad_sample`` get an empty per-sample gradient,
    so a ``DPOptimizer`` clips nothing, adds its Gaussian noise and steps its
    accountant, as DP-SGD prescribes for an empty Poisson batch. A plain optimizer
    sees no gradients and changes nothing.
    """
    optimizer.zero_grad(set_to_none=True)
    for group in optimizer.param_groups:
        for p in group["params"]:
            if hasattr(p, "grad_sample"):
                p.grad_sample = p.new_zeros((0, *p.shape))
    optimizer.step()


def train_local(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
    precision: torch.dtype | None = None,
    proximal_mu: float = 0.0,
) -> TrainResult:
    """Run ``local_epochs`` epochs (stopping after ``max_steps`` steps if set).

    The loss is a sampled softmax: cross-entropy of the positive (column 0) against
    the example's own negatives, so each example's loss depends on it alone; with
    ``train.in-batch-negatives`` (never under DP-SGD) against every candidate of
    the batch instead.

    An empty batch (Poisson sampling under DP-SGD draws one now and then) is not
    passed through the encoder, which cannot take it; it still counts as a step,
    and a per-sample-gradient optimizer takes it as a noise-only step (see
    :func:`_empty_step`), so every step the accountant counts is a step that ran.

    ``precision`` (e.g. ``torch.bfloat16``, from :func:`fedrec.runtime.autocast_dtype`)
    runs the forward pass under autocast; weights and their updates stay float32.

    ``proximal_mu > 0`` adds FedProx's proximal term towards the parameters'
    values on entry (:func:`fedrec.proximal.proximal_term`).
    """
    with proximal_term(optimizer, proximal_mu):
        return _train_steps(model, loader, optimizer, config, device, precision)


def _train_steps(
    model: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    device: torch.device,
    precision: torch.dtype | None,
) -> TrainResult:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    total_loss, steps, examples = 0.0, 0, 0
    batches = iter(_batches(loader, config.local_epochs))
    while not (config.max_steps and steps >= config.max_steps):
        batch = next(batches, None)  # fetched only when a step will be taken
        if batch is None:
            break
        if batch["user_ids"].shape[0] == 0:
            _empty_step(optimizer)
            steps += 1
            continue
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=precision or torch.float32, enabled=precision is not None):
            inputs = [batch.get(k) for k in BATCH_KEYS]
            if config.in_batch_negatives:
                logits, target = model.in_batch_logits(*inputs, batch.get("user"))
            else:
                logits = model(*inputs)
                target = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += float(loss.detach()) * logits.shape[0]
        examples += logits.shape[0]
        steps += 1
    return TrainResult(loss=total_loss / max(examples, 1), steps=steps, examples=examples)
