"""Opacus' per-sample gradients of the LoRA two-tower recommender are exact.

Opacus issue #820: with some opacus/peft versions LoRA adapters received silently
wrong DP updates. These tests compare Opacus' ``grad_sample`` of every trainable
LoRA parameter, on the real recommender (shared encoder called 1 + C times per
forward), with gradients computed independently, one backward pass per example.
"""

import copy

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

from fedrec.config import TrainConfig
from fedrec.examples import NextItemDataset, build_examples
from fedrec.privacy.accounting import AccountantState
from fedrec.privacy.config import PrivacyConfig
from fedrec.privacy.dp_sgd import detach_private, make_private
from fedrec.training import train_local

KEYS = ("user_ids", "user_mask", "item_ids", "item_mask")
NEGATIVES = 3


def fixed_examples(table, sequences, size):
    """The first ``size`` examples, drawn once (their negatives are then fixed)."""
    dataset = NextItemDataset(build_examples(sequences, 5), table, NEGATIVES, 24, seed=0)
    assert len(dataset) >= size
    return [dataset[i] for i in range(size)]


def prepare(model):
    """Dropout off (one example's gradient is then the same alone or in a batch) and
    lora_B non-zero (PEFT starts it at 0, which would make every lora_A gradient 0)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=generator))
    model.train()
    return model


def inputs(batch, keys, rows=slice(None)):
    """The model's positional inputs ``keys`` of ``batch`` (rows ``rows``); None where
    the batch has no such key (e.g. ``history_vectors`` without a sequence tower)."""
    return [batch[k][rows] if k in batch else None for k in keys]


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def per_example_gradients(model, batch, keys=KEYS):
    """Gradients of each example's own loss, one backward pass per example."""
    grads = {name: [] for name in trainable(model)}
    for i in range(batch["user_ids"].shape[0]):
        model.zero_grad(set_to_none=True)
        logits = model(*inputs(batch, keys, slice(i, i + 1)))
        nn.functional.cross_entropy(logits, torch.zeros(1, dtype=torch.long)).backward()
        for name, p in trainable(model).items():
            grads[name].append(p.grad.detach().clone())
    return {name: torch.stack(g) for name, g in grads.items()}


def opacus_gradients(model, batch, mode, keys=KEYS):
    """``p.grad_sample`` after one backward through a hooks-mode GradSampleModule."""
    size = batch["user_ids"].shape[0]
    if mode == "sum":
        wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        reduction = "sum"
    else:  # the production wrapping: make_private with train_local's mean loss
        optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.1)
        examples = [{k: batch[k][i] for k in keys if k in batch} for i in range(size)]
        wrapped, *_ = make_private(
            model,
            optimizer,
            DataLoader(examples, batch_size=size),
            PrivacyConfig(enabled=True),
            noise_multiplier=1.0,
            state=AccountantState(),
        )
        reduction = "mean"
    logits = wrapped(*inputs(batch, keys))
    target = torch.zeros(size, dtype=torch.long)
    nn.functional.cross_entropy(logits, target, reduction=reduction).backward()
    samples = {name: p.grad_sample.detach().clone() for name, p in trainable(model).items()}
    detach_private(wrapped)
    return samples


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_grad_sample_equals_per_example_backward(recommender, table, sequences, mode):
    model = prepare(recommender)
    batch = default_collate(fixed_examples(table, sequences, 6))
    expected = per_example_gradients(copy.deepcopy(model), batch)
    actual = opacus_gradients(model, batch, mode)

    assert set(actual) == set(expected) and len(actual) == 8  # A and B of query, value in 2 layers
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape == (6, *trainable(model)[name].shape), name
        scale = want.abs().max()
        assert scale > 1e-4, f"{name}: gradients vanish, the comparison would be vacuous"
        max_diff = (got - want).abs().max()
        assert max_diff <= 1e-6 * max(1.0, float(scale)), f"{name}: max |diff| {max_diff:.3g}"
        # examples differ, so rows must too (a broadcast mean would pass allclose on a sum)
        assert not torch.allclose(want[0], want[1])
    assert all(actual[n].abs().max() > 0 for n in actual if "lora_B" in n)


def test_grad_sample_has_one_row_per_example_not_per_tower(recommender, table, sequences):
    model = prepare(recommender)
    size = 3
    batch = default_collate(fixed_examples(table, sequences, size))
    candidates = batch["item_ids"].shape[1]
    calls = []
    model.encoder.register_forward_hook(lambda *_: calls.append(1))

    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    logits = wrapped(*(batch[k] for k in KEYS))
    target = torch.zeros(size, dtype=torch.long)
    nn.functional.cross_entropy(logits, target, reduction="sum").backward()

    assert len(calls) == 1 + candidates == 1 + 1 + NEGATIVES
    for name, p in trainable(model).items():
        assert isinstance(p.grad_sample, torch.Tensor), name
        assert p.grad_sample.shape == (size, *p.shape), name
    detach_private(wrapped)


def test_noiseless_unclipped_private_step_equals_plain_step(recommender, table, sequences):
    model = prepare(recommender)
    examples = fixed_examples(table, sequences, 6)
    plain = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}
    train = TrainConfig(max_steps=1, batch_size=len(examples))
    cpu = torch.device("cpu")

    optimizer = torch.optim.SGD(list(trainable(model).values()), lr=0.5)
    private_model, private_optimizer, loader, _ = make_private(
        model,
        optimizer,
        DataLoader(examples, batch_size=len(examples)),
        PrivacyConfig(enabled=True, max_grad_norm=1e6),
        noise_multiplier=0.0,
        state=AccountantState(),
    )
    assert loader.sample_rate == 1.0  # Poisson sampling at rate 1: the whole fixed batch
    private = train_local(private_model, loader, private_optimizer, train, cpu)
    detach_private(private_model)

    plain_optimizer = torch.optim.SGD(list(trainable(plain).values()), lr=0.5)
    plain_loader = DataLoader(examples, batch_size=len(examples))
    reference = train_local(plain, plain_loader, plain_optimizer, train, cpu)

    assert private.steps == reference.steps == 1 and private.examples == len(examples)
    assert private.loss == pytest.approx(reference.loss, rel=1e-6)
    after_plain = trainable(plain)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.detach(), after_plain[name].detach(), rtol=1e-5, atol=1e-7)
        assert (p.detach() - before[name]).abs().max() > 1e-4, f"{name} did not change"
