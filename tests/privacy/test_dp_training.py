"""train_local through make_private: adapters train, epsilon accumulates, hooks go away."""

import pytest
import torch
from opacus.data_loader import DPDataLoader
from torch.utils.data._utils.collate import default_collate

from fedrec.config import TrainConfig
from fedrec.examples import NextItemDataset, build_examples
from fedrec.model.adapters import adapter_state
from fedrec.privacy.accounting import AccountantState, delta_for, epsilon
from fedrec.privacy.config import PrivacyConfig
from fedrec.privacy.dp_sgd import (
    EmptySafeCollate,
    detach_private,
    make_private,
    poisson_sample_rate,
    state_after,
)
from fedrec.training import make_loader, make_optimizer, train_local

CPU = torch.device("cpu")
TRAIN = TrainConfig(max_steps=3, batch_size=4, lr=1e-2)
CONFIG = PrivacyConfig(enabled=True)
PARAM_ATTRS = (
    "grad_sample", "_forward_counter", "_current_grad_sample", "_norm_sample", "summed_grad"
)
MODULE_ATTRS = ("activations", "max_batch_len", "autograd_grad_sample_hooks")


def dataset(table, sequences, seed=0):
    return NextItemDataset(build_examples(sequences, 5), table, 3, 24, seed=seed)


def hook_counts(model):
    return sum(
        len(hooks)
        for m in model.modules()
        for hooks in (
            m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks
        )
    )


def private_round(model, data, config, state, seed, train=TRAIN):
    """One private round as a client runs it; returns the new state and the result."""
    loader = make_loader(data, train.batch_size, seed)
    optimizer = make_optimizer(model, train)
    private_model, private_optimizer, private_loader, engine = make_private(
        model, optimizer, loader, config, config.noise_multiplier, state
    )
    try:
        result = train_local(private_model, private_loader, private_optimizer, train, CPU)
    finally:
        detach_private(private_model)
    return state_after(engine, state), result


def assert_clean(model):
    for name, p in model.named_parameters():
        leftover = [a for a in PARAM_ATTRS if hasattr(p, a)]
        assert not leftover, f"{name} keeps {leftover}"
    for name, m in model.named_modules():
        leftover = [a for a in MODULE_ATTRS if a in m.__dict__]
        assert not leftover, f"{name} keeps {leftover}"


def test_private_rounds_train_adapters_and_accumulate_epsilon(recommender, table, sequences):
    data = dataset(table, sequences)
    config = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    delta = delta_for(config, len(data))
    hooks_before = hook_counts(recommender)
    base = {n: p.detach().clone() for n, p in recommender.named_parameters() if not p.requires_grad}
    adapters = adapter_state(recommender.encoder)

    first, result = private_round(recommender, data, config, AccountantState("rdp"), seed=0)

    assert result.steps == 3 and first.steps == 3 and first.rounds == 1
    rate = poisson_sample_rate(make_loader(data, TRAIN.batch_size, 0))
    assert first.history == [(1.0, rate, 3)]
    changed = adapter_state(recommender.encoder)
    assert all(not torch.equal(changed[k], adapters[k]) for k in adapters)
    assert all(torch.equal(p, base[n]) for n, p in recommender.named_parameters() if n in base)
    one = epsilon(first, delta)
    assert one > 0

    second, _ = private_round(recommender, data, config, first, seed=1)
    assert second.rounds == 2 and second.steps == 6
    assert epsilon(second, delta) > one

    # the same object trains again without DP: no hooks or per-sample attributes left
    assert hook_counts(recommender) == hooks_before
    assert_clean(recommender)
    before = adapter_state(recommender.encoder)
    optimizer = make_optimizer(recommender, TRAIN)
    plain = train_local(recommender, make_loader(data, 4, 2), optimizer, TRAIN, CPU)
    assert plain.steps == 3
    assert any(not torch.equal(adapter_state(recommender.encoder)[k], before[k]) for k in before)
    assert_clean(recommender)


def test_empty_poisson_batches_are_accounted_noise_only_steps(recommender, table, sequences):
    data = dataset(table, sequences)
    train = TrainConfig(max_steps=0, batch_size=1, lr=1e-2)  # sample rate 1/12: many empty batches

    def first_batch_is_empty(seed):
        probe = DPDataLoader.from_data_loader(make_loader(data, 1, seed))
        probe.collate_fn = EmptySafeCollate(default_collate, data)
        return next(iter(probe))["user_ids"].shape[0] == 0

    seed = next(s for s in range(200) if first_batch_is_empty(s))
    loader = make_loader(data, 1, seed)
    model, optimizer, private_loader, engine = make_private(
        recommender, make_optimizer(recommender, train), loader, CONFIG, 1.0, AccountantState(),
        seed=seed,
    )
    batches = list(private_loader)
    assert batches[0]["user_ids"].shape[0] == 0
    keys = {"user_ids", "user_mask", "item_ids", "item_mask", "items", "history", "history_mask", "user"}
    assert all(set(b) == keys for b in batches)
    assert all(b["item_ids"].shape[1:] == (4, 12) and b["items"].shape[1:] == (4,) for b in batches)

    before = adapter_state(recommender.encoder)
    first_only = TrainConfig(max_steps=1, batch_size=1, lr=1e-2)
    assert train_local(model, private_loader, optimizer, first_only, CPU).examples == 0
    noised = adapter_state(recommender.encoder)
    assert any(not torch.equal(noised[k], before[k]) for k in before)  # noise, no examples

    result = train_local(model, private_loader, optimizer, train, CPU)
    detach_private(model)
    assert result.steps == len(private_loader)  # empty batches count as steps
    assert state_after(engine, AccountantState()).steps == 1 + result.steps


def test_empty_safe_collate_before_any_batch(table, sequences):
    data = dataset(table, sequences)
    empty = EmptySafeCollate(default_collate, data)([])
    assert {k: tuple(v.shape) for k, v in empty.items()} == {
        "user_ids": (0, 24),
        "user_mask": (0, 24),
        "item_ids": (0, 4, 12),
        "item_mask": (0, 4, 12),
        "items": (0, 4),
        "history": (0, 5),
        "history_mask": (0, 5),
        "user": (0,),
    }
    assert all(v.dtype == torch.int64 for v in empty.values())


def test_only_lora_parameters_may_be_trainable(recommender, table, sequences):
    name, param = next((n, p) for n, p in recommender.named_parameters() if "LayerNorm" in n)
    param.requires_grad = True
    optimizer = torch.optim.SGD([p for p in recommender.parameters() if p.requires_grad], lr=0.1)
    loader = make_loader(dataset(table, sequences), 4, 0)
    with pytest.raises(ValueError, match=name):
        make_private(recommender, optimizer, loader, CONFIG, 1.0, AccountantState())


def test_a_wrapped_model_is_not_wrapped_twice(recommender, table, sequences):
    loader = make_loader(dataset(table, sequences), 4, 0)
    optimizer = make_optimizer(recommender, TRAIN)
    model, *_ = make_private(recommender, optimizer, loader, CONFIG, 1.0, AccountantState())
    with pytest.raises(ValueError, match="detach_private"):
        make_private(model, make_optimizer(model, TRAIN), loader, CONFIG, 1.0, AccountantState())
    detach_private(model)
    assert_clean(recommender)


def test_detach_also_clears_what_opacus_own_unwrapping_leaves(recommender, table, sequences):
    """``to_standard_module`` keeps ``summed_grad`` and activations of an unfinished forward."""
    data = dataset(table, sequences)
    loader = make_loader(data, 4, 0)
    optimizer = make_optimizer(recommender, TRAIN)
    model, optimizer, private_loader, _ = make_private(
        recommender, optimizer, loader, CONFIG, 1.0, AccountantState()
    )
    train_local(model, private_loader, optimizer, TrainConfig(max_steps=1, batch_size=4), CPU)
    batch = next(b for b in private_loader if b["user_ids"].shape[0])
    model(batch["user_ids"], batch["user_mask"], batch["item_ids"], batch["item_mask"])
    assert detach_private(model) is recommender
    assert_clean(recommender)


def test_sampling_and_noise_are_unpredictable_from_the_run_seed(recommender, table, sequences):
    """Without a test seed, the same loader seed gives different batches and noise."""
    data = dataset(table, sequences)
    train = TrainConfig(max_steps=1, batch_size=4, lr=1e-2)
    drawn, noised = [], []
    for _ in range(2):
        start = adapter_state(recommender.encoder)
        model, optimizer, private_loader, _ = make_private(
            recommender, make_optimizer(recommender, train), make_loader(data, 4, 0),
            CONFIG, 1.0, AccountantState(),
        )
        drawn.append([b["user_ids"].sum().item() for b in private_loader])
        train_local(model, private_loader, optimizer, train, CPU)
        detach_private(model)
        after = adapter_state(recommender.encoder)
        noised.append(torch.cat([(after[k] - start[k]).flatten() for k in start]))
    assert drawn[0] != drawn[1]
    assert not torch.allclose(noised[0], noised[1])
