"""A client's privacy accountant, kept across rounds, and budget planning.

Opacus accountants describe everything spent so far by their ``history``: a list
of ``(noise_multiplier, sample_rate, num_steps)`` entries. :class:`AccountantState`
holds that history between rounds (in a ClientApp's ``context.state`` or in a
file on a deployed client), so that each round's accountant starts from all
earlier rounds and epsilon accumulates, rather than restarting at 0.

Every epsilon is computed by Opacus' own accountants; nothing here re-derives
an accounting formula.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord
from opacus.accountants import IAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from fedrec.privacy.config import ACCOUNTANTS, PrivacyConfig, default_delta

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, num_steps)`` as Opacus accountants keep it."""

TARGET_TOLERANCE = 1e-6
"""Relative slack on dp.target-epsilon, so a plan that spends it exactly is allowed."""

_FORMAT = 1


def _entry(noise_multiplier: Any, sample_rate: Any, num_steps: Any) -> HistoryEntry:
    entry = (float(noise_multiplier), float(sample_rate), int(num_steps))
    if entry[0] < 0 or not 0 < entry[1] <= 1 or entry[2] < 1 or entry[2] != num_steps:
        raise ValueError(
            f"invalid accountant history entry {(noise_multiplier, sample_rate, num_steps)}"
        )
    return entry


@dataclass
class AccountantState:
    """What one client has spent so far: its accountant's history and rounds trained."""

    mechanism: str = "rdp"
    """The Opacus accountant that produced the history (rdp or prv)."""
    history: list[HistoryEntry] = field(default_factory=list)
    rounds: int = 0
    """Private rounds this client has trained in."""

    def __post_init__(self) -> None:
        if self.mechanism not in ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant '{self.mechanism}', expected one of {ACCOUNTANTS}"
            )
        if self.rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {self.rounds}")
        self.history = [_entry(*entry) for entry in self.history]

    @property
    def steps(self) -> int:
        """DP-SGD steps taken so far."""
        return sum(steps for _, _, steps in self.history)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict."""
        return {
            "format": _FORMAT,
            "mechanism": self.mechanism,
            "history": [list(entry) for entry in self.history],
            "rounds": self.rounds,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AccountantState:
        """Inverse of :meth:`to_dict`."""
        if data.get("format", _FORMAT) != _FORMAT:
            raise ValueError(f"unsupported accountant state format {data.get('format')!r}")
        return cls(
            mechanism=str(data["mechanism"]),
            history=[_entry(*entry) for entry in data["history"]],
            rounds=int(data["rounds"]),
        )

    def to_config_record(self) -> ConfigRecord:
        """A Flower ``ConfigRecord`` (for a ClientApp's ``context.state``)."""
        return ConfigRecord(
            {
                "mechanism": self.mechanism,
                "noise-multipliers": [float(s) for s, _, _ in self.history],
                "sample-rates": [float(q) for _, q, _ in self.history],
                "steps": [int(n) for _, _, n in self.history],
                "rounds": int(self.rounds),
            }
        )

    @classmethod
    def from_config_record(cls, record: ConfigRecord) -> AccountantState:
        """Inverse of :meth:`to_config_record`."""
        sigmas, rates, steps = record["noise-multipliers"], record["sample-rates"], record["steps"]
        if not len(sigmas) == len(rates) == len(steps):
            raise ValueError("accountant record has history lists of different lengths")
        return cls(
            mechanism=str(record["mechanism"]),
            history=[_entry(*entry) for entry in zip(sigmas, rates, steps)],
            rounds=int(record["rounds"]),
        )

    def save(self, path: Path) -> None:
        """Write the state as JSON, atomically (a crash leaves the old file intact)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> AccountantState:
        """Read a state written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text()))


def restore(accountant: IAccountant, state: AccountantState) -> None:
    """Give ``accountant`` the history of ``state`` (a copy: stepping leaves ``state`` as is).

    Raises ValueError when a non-empty history comes from another mechanism.
    """
    if state.history:
        accountant.load_state_dict(
            {"history": list(state.history), "mechanism": state.mechanism}
        )
    else:
        accountant.history = []


def make_accountant(name: str, state: AccountantState) -> IAccountant:
    """An Opacus accountant (``rdp`` or ``prv``) holding ``state``'s history."""
    accountant = create_accountant(mechanism=name)
    restore(accountant, state)
    return accountant


def epsilon(state: AccountantState, delta: float) -> float:
    """Epsilon spent at ``delta`` (0.0 before any step)."""
    if not state.history:
        return 0.0
    return float(make_accountant(state.mechanism, state).get_epsilon(delta=delta))


def delta_for(config: PrivacyConfig, num_examples: int) -> float:
    """``dp.delta``, or 1 / (10 n) for a client with ``n`` examples when it is 0."""
    return default_delta(config.delta, num_examples, "example")


def plan_noise_multiplier(
    config: PrivacyConfig,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    delta: float,
    spent: Sequence[HistoryEntry] = (),
) -> float:
    """The noise multiplier that spends ``dp.target-epsilon`` in ``rounds`` rounds.

    Assumes the client takes ``steps_per_round`` steps at ``sample_rate`` in each
    of ``rounds`` rounds (with client sampling, a client that skips rounds spends
    less). Opacus' binary search returns a multiplier whose epsilon is at most the
    target and within its tolerance of it. ``spent``: releases the client makes
    besides DP-SGD (e.g. its noised item counts); the plan leaves room for them.
    """
    if config.target_epsilon <= 0:
        raise ValueError("plan_noise_multiplier needs dp.target-epsilon > 0")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps_per_round < 1 or rounds < 1:
        raise ValueError(
            f"steps_per_round and rounds must be >= 1, got {steps_per_round}, {rounds}"
        )
    if not spent:
        return float(
            get_noise_multiplier(
                target_epsilon=config.target_epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps_per_round * rounds,
                accountant=config.accountant,
            )
        )
    return _plan_after(config, sample_rate, steps_per_round * rounds, delta, [_entry(*e) for e in spent])


_PLAN_TOLERANCE = 0.01  # Opacus' get_noise_multiplier default epsilon_tolerance
_MAX_SIGMA = 2.0**20


def _plan_after(
    config: PrivacyConfig, sample_rate: float, steps: int, delta: float, spent: list[HistoryEntry]
) -> float:
    """Opacus' binary search for the multiplier, with ``spent`` ahead in the history."""
    accountant = create_accountant(mechanism=config.accountant)

    def spent_with(sigma: float) -> float:
        accountant.history = [*spent, (sigma, sample_rate, steps)]
        return float(accountant.get_epsilon(delta=delta))

    target = config.target_epsilon
    accountant.history = list(spent)
    already = float(accountant.get_epsilon(delta=delta))
    if already >= target:
        raise ValueError(
            f"the releases before training already spend epsilon {already:.4f} >= "
            f"dp.target-epsilon={target}; raise popularity.noise or the target"
        )
    low, high, eps_high = 0.0, 10.0, spent_with(10.0)
    while eps_high > target:
        low, high = high, 2 * high
        if high > _MAX_SIGMA:
            raise ValueError(f"dp.target-epsilon={target} cannot be reached after the earlier releases")
        eps_high = spent_with(high)
    while target - eps_high > _PLAN_TOLERANCE:
        sigma = (low + high) / 2
        eps = spent_with(sigma)
        if eps < target:
            high, eps_high = sigma, eps
        else:
            low = sigma
    return high


def would_exceed(
    state: AccountantState,
    config: PrivacyConfig,
    delta: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
) -> tuple[bool, float]:
    """Whether ``steps`` more steps would go past the budget, and the epsilon after them.

    The budget is ``dp.max-epsilon``, else ``dp.target-epsilon`` (with a relative
    tolerance of :data:`TARGET_TOLERANCE`), else unlimited. ``state`` is not changed.
    """
    accountant = make_accountant(config.accountant, state)
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    after = float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0
    if config.max_epsilon > 0:
        limit = config.max_epsilon
    elif config.target_epsilon > 0:
        limit = config.target_epsilon * (1 + TARGET_TOLERANCE)
    else:
        return False, after
    return (math.isnan(after) or after > limit), after
