"""DP-SGD with Opacus: wrap model, optimizer and loader before the one training loop.

:func:`make_private` returns the usual Opacus triple (a ``GradSampleModule`` in
hooks mode, a ``DPOptimizer`` and a Poisson-sampling ``DPDataLoader``) plus the
``PrivacyEngine``, whose accountant starts from the client's earlier rounds.
After the round, :func:`state_after` reads the accountant back and
:func:`detach_private` removes every Opacus hook and attribute so that the same
recommender object serves the next client in the process.

The recommender calls its shared encoder once per tower per candidate column,
each call with the example dimension as batch dimension; Opacus' hooks sum the
per-sample gradients of those calls, one row per example
(``tests/privacy/test_per_sample_gradients.py`` checks this against one backward
pass per example).
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedrec.model.adapters import WHOLE_MODULES, trained_part
from fedrec.privacy.accounting import AccountantState, restore
from fedrec.privacy.config import PrivacyConfig

log = logging.getLogger(__name__)

# Opacus warns that secure_mode is off; fedrec seeds its sampling and noise from
# OS entropy instead (see make_private), so the warning would only mislead. The
# backward-hook warning fires because the frozen encoder's inputs need no grad.
warnings.filterwarnings("ignore", message="Secure RNG turned off", module="opacus")
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")

# Attributes Opacus sets on parameters (GradSampleModule, DPOptimizer) and on
# hooked submodules; detach_private removes any left over.
_PARAM_ATTRS = (
    "grad_sample",
    "_forward_counter",
    "_current_grad_sample",
    "_norm_sample",
    "summed_grad",
)
_MODULE_ATTRS = (
    "activations",
    "max_batch_len",
    "ft_compute_sample_grad",
    "autograd_grad_sample_hooks",
)


def check_trainable_adapters(model: nn.Module) -> None:
    """Raise ValueError unless the trainable parameters are what travels: LoRA
    adapters, (``model.item-ids``) the item-identity table and
    (``model.sequence-layers``) the sequence tower."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters; were the adapters added?")
    for name in trainable:
        if "lora_" not in name and not any(f"{m}.modules_to_save" in name for m in WHOLE_MODULES):
            raise ValueError(
                f"parameter '{name}' is trainable but is not a LoRA adapter; "
                "DP-SGD here trains (and accounts for) the adapters only"
            )


def clipping_norms(
    model: nn.Module, optimizer: torch.optim.Optimizer, config: PrivacyConfig
) -> float | list[float]:
    """``dp.max-grad-norm`` C for flat clipping; for ``per-part`` one norm per tensor
    the optimizer trains, in its order (Opacus' per-layer clipping): each of the P
    trained parts gets C^2 / P, split equally among its n tensors, C / sqrt(P n) each,
    so that the norms' root sum of squares, one example's sensitivity, is C."""
    if config.clipping == "flat":
        return config.max_grad_norm
    names = {id(p): name for name, p in model.named_parameters()}
    parts = [
        trained_part(names[id(p)]) for group in optimizer.param_groups for p in group["params"] if p.requires_grad
    ]
    sizes = {part: parts.count(part) for part in parts}
    return [config.max_grad_norm / math.sqrt(len(sizes) * sizes[part]) for part in parts]


def _empty_like_batch(batch: Any) -> Any:
    if torch.is_tensor(batch):
        return batch[:0].clone()
    if isinstance(batch, Mapping):
        return {k: _empty_like_batch(v) for k, v in batch.items()}
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        return type(batch)(_empty_like_batch(v) for v in batch)
    raise TypeError(f"cannot make an empty batch of {type(batch).__name__}")


class EmptySafeCollate:
    """Collates like the wrapped function; no samples give a zero-length batch of the same keys.

    Opacus' own wrapper (``CollateFnWithEmpty``) learns the batch structure from
    the first non-empty batch; when the very first Poisson batch is empty it
    returns a list built from ``dataset[0]`` iterated as a sequence, which for a
    dataset of dicts fails (``torch.zeros(..., dtype=str)``). Here the structure
    comes from the first non-empty batch, or from ``dataset[0]`` when the first
    batch is empty, so every empty batch is a dict with ``user_ids.shape[0] == 0``,
    which the training loop skips.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], dataset: Dataset) -> None:
        self.collate_fn = collate_fn
        self.dataset = dataset
        self.empty: Any = None

    def __call__(self, samples: list[Any]) -> Any:
        if samples:
            batch = self.collate_fn(samples)
            if self.empty is None:
                self.empty = _empty_like_batch(batch)
            return batch
        if self.empty is None:
            self.empty = _empty_like_batch(self.collate_fn([self.dataset[0]]))
        return _empty_like_batch(self.empty)


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator on ``device``, seeded from OS entropy unless ``seed`` is given."""
    if seed is None:
        seed = secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def poisson_sample_rate(loader: DataLoader) -> float:
    """The sample rate Opacus' ``make_private`` will use for ``loader``: 1 / len(loader)."""
    return 1.0 / len(loader)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    config: PrivacyConfig,
    noise_multiplier: float,
    state: AccountantState,
    seed: int | None = None,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader, PrivacyEngine]:
    """Wrap the training objects for DP-SGD, continuing the client's accountant.

    The Poisson sampling of batches and the Gaussian noise draw from generators
    seeded from the operating system's entropy (``seed=None``, the default), so
    that nobody who knows the run's seeds (the server does) can predict which
    examples were sampled or subtract the noise; both would void the guarantee.
    An integer ``seed`` makes them reproducible: for tests only.

    ``noise_multiplier`` is ``config.noise_multiplier`` or a planned one (see
    :func:`fedrec.privacy.accounting.plan_noise_multiplier`). The loss must be a
    mean over the batch (as in :func:`fedrec.training.train_local`). Call
    :func:`detach_private` on the returned module when the round is over.
    """
    if isinstance(model, GradSampleModule) or hasattr(model, "autograd_grad_sample_hooks"):
        raise ValueError("the model still carries Opacus hooks; call detach_private first")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier}")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"the model is not compatible with Opacus: {errors}")
    check_trainable_adapters(model)

    device = next(p for p in model.parameters() if p.requires_grad).device
    loader.generator = _generator(torch.device("cpu"), seed)
    engine = PrivacyEngine(accountant=config.accountant)
    restore(engine.accountant, state)
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_generator=_generator(device, None if seed is None else seed + 1),
        noise_multiplier=noise_multiplier,
        max_grad_norm=clipping_norms(model, optimizer, config),
        clipping="per_layer" if config.clipping == "per-part" else "flat",
        poisson_sampling=True,
        grad_sample_mode="hooks",
    )
    private_loader.collate_fn = EmptySafeCollate(loader.collate_fn, loader.dataset)
    log.debug(
        "DP-SGD: noise multiplier %.4f, clip %.3g (%s), sample rate %.4f, %d earlier steps (%s)",
        noise_multiplier,
        config.max_grad_norm,
        config.clipping,
        private_loader.sample_rate,
        state.steps,
        config.accountant,
    )
    return private_model, private_optimizer, private_loader, engine


def state_after(engine: PrivacyEngine, state: AccountantState) -> AccountantState:
    """The client's state after a round trained through ``engine`` (one more round)."""
    saved = engine.accountant.state_dict()
    return AccountantState(
        mechanism=saved["mechanism"], history=list(saved["history"]), rounds=state.rounds + 1
    )


def detach_private(model: nn.Module) -> nn.Module:
    """Remove Opacus' hooks and per-sample attributes; return the plain module.

    Accepts the ``GradSampleModule`` from :func:`make_private` (or the module it
    wrapped) and leaves no hook, ``grad_sample`` or other Opacus attribute behind,
    so the module can be trained again, privately or not.
    """
    module = model.to_standard_module() if isinstance(model, GradSampleModule) else model
    handles = module.__dict__.get("autograd_grad_sample_hooks", [])
    while handles:  # the wrapped module of a GradSampleModule that was never closed
        handles.pop().remove()
    for p in module.parameters():
        for attr in _PARAM_ATTRS:
            if hasattr(p, attr):
                delattr(p, attr)
    for sub in module.modules():
        for attr in _MODULE_ATTRS:
            if attr in sub.__dict__:
                delattr(sub, attr)
    return module
