"""The server optimizer's state, kept with each checkpoint so that a resumed run
steps as the uninterrupted run would have.

Flower's ``FedAdam`` (and the other ``FedOpt`` strategies) keep per-coordinate
moments ``m_t`` and ``v_t`` between rounds, ``FedAvgM`` a momentum vector, all
in memory. Without them a resumed run would restart those from zero and, for
FedAdam, take a first step of nearly the server learning rate in every
coordinate (``m / sqrt(v)`` of a single update is its sign), whatever the
moments had learned. The state is the server's own: it is computed from the
averaged updates only and never sent to clients.

Names in the saved file: ``m_t/<adapter key>``, ``v_t/<adapter key>``,
``momentum_vector/<index>`` (FedAvgM keeps a list in the adapters' order).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch

from server.strategy import FedRecAvg

log = logging.getLogger("fedrec.server.optimizer_state")

KEYED_MOMENTS = ("m_t", "v_t")
"""``FedOpt`` attributes: a dict of arrays keyed like the adapters."""

MOMENTUM_LIST = "momentum_vector"
"""``FedAvgM`` attribute: a list of arrays in the adapters' order."""


def keeps_state(strategy: object) -> bool:
    """Whether the strategy's server optimizer carries state from round to round."""
    return any(hasattr(strategy, a) for a in KEYED_MOMENTS) or getattr(strategy, "server_momentum", 0.0) > 0


def optimizer_state(strategy: object) -> dict[str, np.ndarray]:
    """The strategy's server optimizer state, flat; empty for a stateless strategy
    (FedAvg, FedProx) or before its first step."""
    state = {}
    for name in KEYED_MOMENTS:
        for key, value in (getattr(strategy, name, None) or {}).items():
            state[f"{name}/{key}"] = np.asarray(value)
    for index, value in enumerate(getattr(strategy, MOMENTUM_LIST, None) or []):
        state[f"{MOMENTUM_LIST}/{index:04d}"] = np.asarray(value)
    return state


def restore_optimizer_state(
    strategy: FedRecAvg,
    state: Mapping[str, np.ndarray],
    adapters: Mapping[str, torch.Tensor],
    rounds_done: int,
) -> bool:
    """Put the state saved after round ``rounds_done`` back into ``strategy``; True if
    it was used. The strategy then counts those rounds in FedAdam's bias correction.

    The state is used only if it fits: the strategy keeps that kind of state and
    every array has the shape of the adapters it belongs to (``adapters``, the
    global adapters the run resumes from). Otherwise the reason is logged and the
    optimizer starts afresh, as it would without a saved state.
    """
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for name, value in state.items():
        attribute, _, key = name.partition("/")
        grouped.setdefault(attribute, {})[key] = value
    unusable = [a for a in grouped if not hasattr(strategy, a)]
    if unusable:
        log.warning(
            "The saved server optimizer state (%s) is not the state of %s; it starts afresh",
            ", ".join(sorted(unusable)),
            type(strategy).__name__,
        )
        return False
    shapes = {k: tuple(v.shape) for k, v in adapters.items()}
    ordered = list(shapes.values())
    for attribute, arrays in grouped.items():
        if attribute == MOMENTUM_LIST:
            fits = [tuple(arrays[k].shape) for k in sorted(arrays)] == ordered
        else:
            fits = {k: tuple(v.shape) for k, v in arrays.items()} == shapes
        if not fits:
            log.warning(
                "The saved server optimizer state (%s) does not fit the adapters "
                "(their keys or shapes changed since the checkpoint); it starts afresh",
                attribute,
            )
            return False
    for attribute, arrays in grouped.items():
        if attribute == MOMENTUM_LIST:
            setattr(strategy, attribute, [arrays[k] for k in sorted(arrays)])
        else:
            setattr(strategy, attribute, dict(arrays))
    strategy.optimizer_rounds_before = rounds_done
    return True
