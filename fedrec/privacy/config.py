"""Settings of differentially private local training (DP-SGD), run-config ``dp.*``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedrec.config import ConfigError

ACCOUNTANTS = ("rdp", "prv")


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"setting '{key}': {message}")


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD on each client, with the client's privacy spent accounted across rounds.

    Privacy is per client (example-level): each client accounts for the steps it
    took on its own examples, over every round it trained in.
    """

    enabled: bool = False
    """``dp.enabled``: train with DP-SGD."""
    noise_multiplier: float = 1.0
    """``dp.noise-multiplier``: noise std / clipping norm; used when target-epsilon is 0."""
    max_grad_norm: float = 1.0
    """``dp.max-grad-norm``: per-example gradient clipping norm."""
    target_epsilon: float = 0.0
    """``dp.target-epsilon``: > 0 plans the noise multiplier so that a client training
    in every round has spent exactly this epsilon after the last round."""
    delta: float = 0.0
    """``dp.delta``: 0 means 1 / (10 n) for a client with n examples."""
    accountant: str = "rdp"
    """``dp.accountant``: rdp or prv (Opacus accountants)."""
    max_epsilon: float = 0.0
    """``dp.max-epsilon``: hard budget; a client refuses a round that would exceed it.
    0 means target-epsilon when that is set, otherwise no limit."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "dp.enabled", "expected true/false")
        _check(
            _finite(self.noise_multiplier) and self.noise_multiplier >= 0,
            "dp.noise-multiplier",
            "must be a finite number >= 0",
        )
        if self.enabled and self.target_epsilon == 0:
            _check(
                self.noise_multiplier > 0,
                "dp.noise-multiplier",
                "must be > 0 when dp.enabled is true and dp.target-epsilon is 0",
            )
        _check(
            _finite(self.max_grad_norm) and self.max_grad_norm > 0,
            "dp.max-grad-norm",
            "must be a finite number > 0",
        )
        _check(
            _finite(self.target_epsilon) and self.target_epsilon >= 0,
            "dp.target-epsilon",
            "must be a finite number >= 0 (0: use dp.noise-multiplier)",
        )
        _check(
            _finite(self.delta) and 0 <= self.delta < 1,
            "dp.delta",
            "must be in [0, 1) (0: 1/(10 n) for a client with n examples)",
        )
        _check(
            self.accountant in ACCOUNTANTS,
            "dp.accountant",
            f"'{self.accountant}' is not one of {', '.join(ACCOUNTANTS)}",
        )
        _check(
            _finite(self.max_epsilon) and self.max_epsilon >= 0,
            "dp.max-epsilon",
            "must be a finite number >= 0 (0: dp.target-epsilon, or no limit)",
        )
        if self.max_epsilon > 0 and self.target_epsilon > 0:
            _check(
                self.max_epsilon >= self.target_epsilon,
                "dp.max-epsilon",
                f"{self.max_epsilon} is below dp.target-epsilon={self.target_epsilon}; "
                "the planned rounds could never all run",
            )

    @property
    def budget(self) -> float:
        """The epsilon a client may not exceed (0: unlimited)."""
        return self.max_epsilon if self.max_epsilon > 0 else self.target_epsilon
