"""FedProx's proximal term (Li et al., MLSys 2020) for local training.

A client adds ``mu / 2 * ||w - w_global||^2`` over its trained parameters to
its local loss, which keeps a round's local steps near the global adapters the
server sent (client drift). Its gradient, ``mu * (w - w_global)``, depends on
the parameters alone, so fedrec adds it to each parameter's gradient just
before the optimizer steps instead of to the loss: the same update without DP,
and under DP-SGD it lands after Opacus has clipped and noised the per-sample
gradients (a data-independent term needs neither, and a loss term would be
dropped: Opacus rebuilds ``.grad`` from the per-sample gradients alone).

The server sends ``mu`` in each round's train config under Flower's
``FedProx`` key (``records.PROXIMAL_MU``); see ``federation.proximal-mu``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose step applies ``.grad``: Opacus' ``DPOptimizer`` wraps one."""
    return getattr(optimizer, "original_optimizer", optimizer)


@contextmanager
def proximal_term(optimizer: torch.optim.Optimizer, mu: float) -> Iterator[None]:
    """While open, every step of ``optimizer`` adds ``mu * (w - w_start)`` to the
    gradient of each of its parameters, ``w_start`` being their values on entry
    (the global adapters, when entered right after loading them). ``mu = 0``: no-op."""
    if mu < 0:
        raise ValueError(f"proximal mu must be >= 0, got {mu}")
    if mu == 0:
        yield
        return
    inner = _inner(optimizer)
    params = [p for group in inner.param_groups for p in group["params"]]
    anchors = [p.detach().clone() for p in params]

    def add_proximal_gradient(*_) -> None:
        with torch.no_grad():
            for p, anchor in zip(params, anchors):
                pull = (p - anchor).mul_(mu)
                if p.grad is None:
                    p.grad = pull
                else:
                    p.grad.add_(pull)

    handle = inner.register_step_pre_hook(add_proximal_gradient)
    try:
        yield
    finally:
        handle.remove()
