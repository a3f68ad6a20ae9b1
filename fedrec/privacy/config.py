"""Settings of differentially private local training (DP-SGD), run-config ``dp.*``."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedrec.errors import check_setting as _check

ACCOUNTANTS = ("rdp", "prv")
CLIPPINGS = ("flat", "per-part")
USER_DP_MODES = ("off", "server-fixed", "client-fixed", "server-adaptive", "client-adaptive")


def default_delta(configured: float, count: int, unit: str) -> float:
    """``configured`` when set (> 0), else 1 / (10 count): the rule of dp.delta and user-dp.delta."""
    if configured > 0:
        return configured
    if count < 1:
        raise ValueError(f"delta = 1/(10 n) needs at least one {unit}, got {count}")
    return 1.0 / (10 * count)


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
    clipping: str = "flat"
    """``dp.clipping``: ``flat`` clips each example's whole gradient to
    ``dp.max-grad-norm``; ``per-part`` gives each trained part (LoRA adapters, item
    identities, sequence tower) an equal share of ``dp.max-grad-norm`` squared,
    split equally among its tensors (Opacus' per-layer clipping), so that a part
    with large gradients cannot take the clipping budget of the others. Either
    way one example moves the sum by at most ``dp.max-grad-norm``, so the noise and
    the ε accounting are the same."""
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
        _check(self.clipping in CLIPPINGS, "dp.clipping", f"must be one of {', '.join(CLIPPINGS)}")
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


@dataclass(frozen=True)
class UserLevelDPConfig:
    """User-level DP on the server (DP-FedAvg): clip each client's update, noise the sum.

    The guarantee covers everything one client contributes in a round (with the
    default partitioning, one user); it is accounted over rounds with the
    clients' sampling rate (see docs/privacy.md).
    """

    mode: str = "off"
    """``user-dp.mode``: off, server-fixed, client-fixed, server-adaptive, client-adaptive
    (Flower's DifferentialPrivacy{Server,Client}Side{Fixed,Adaptive}Clipping)."""
    noise_multiplier: float = 1.0
    """``user-dp.noise-multiplier``: noise std / clipping norm on the summed updates."""
    clipping_norm: float = 0.1
    """``user-dp.clipping-norm``: L2 bound on one client's adapter update (initial value
    for the adaptive modes)."""
    delta: float = 0.0
    """``user-dp.delta``: 0 means 1 / (10 N) for N clients."""

    def __post_init__(self) -> None:
        _check(
            self.mode in USER_DP_MODES,
            "user-dp.mode",
            f"'{self.mode}' is not one of {', '.join(USER_DP_MODES)}",
        )
        _check(
            _finite(self.noise_multiplier) and self.noise_multiplier >= 0,
            "user-dp.noise-multiplier",
            "must be a finite number >= 0",
        )
        _check(
            _finite(self.clipping_norm) and self.clipping_norm > 0,
            "user-dp.clipping-norm",
            "must be a finite number > 0",
        )
        _check(
            _finite(self.delta) and 0 <= self.delta < 1,
            "user-dp.delta",
            "must be in [0, 1) (0: 1/(10 N) for N clients)",
        )

    @property
    def enabled(self) -> bool:
        return self.mode != "off"


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation (Flower's SecAgg+): the server learns only the sum of updates."""

    enabled: bool = False
    """``secagg.enabled``: aggregate the adapters with SecAgg+."""
    num_shares: float = 3.0
    """``secagg.num-shares``: shares of each client's key (a number >= 3, or a fraction
    in (0, 1] of the round's clients)."""
    reconstruction_threshold: float = 2.0
    """``secagg.reconstruction-threshold``: shares needed to recover a dropped client's
    mask (a number, or a fraction of num-shares); more tolerates fewer dropouts."""
    clipping_range: float = 8.0
    """``secagg.clipping-range``: adapter values are clipped to +-this before quantization."""
    quantization_range: int = 4194304
    """``secagg.quantization-range``: integer levels of the quantized values (2**22)."""
    max_weight: float = 1000.0
    """``secagg.max-weight``: the largest num-examples weight one client may carry."""
    timeout: float = 0.0
    """``secagg.timeout``: seconds to wait for each stage's replies (0: no limit)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.enabled, bool), "secagg.enabled", "expected true/false")
        _check(
            _finite(self.num_shares)
            and (self.num_shares >= 3 or 0 < self.num_shares <= 1),
            "secagg.num-shares",
            "must be >= 3 shares (Flower's SecAgg+ needs more than 2) or a fraction in (0, 1]",
        )
        _check(
            _finite(self.reconstruction_threshold) and self.reconstruction_threshold > 0,
            "secagg.reconstruction-threshold",
            "must be > 0",
        )
        if self.num_shares >= 3 and self.reconstruction_threshold >= 1:
            _check(
                self.reconstruction_threshold <= self.num_shares,
                "secagg.reconstruction-threshold",
                f"{self.reconstruction_threshold} exceeds secagg.num-shares={self.num_shares}",
            )
        _check(
            _finite(self.clipping_range) and self.clipping_range > 0,
            "secagg.clipping-range",
            "must be > 0",
        )
        _check(self.quantization_range >= 2, "secagg.quantization-range", "must be >= 2")
        _check(_finite(self.max_weight) and self.max_weight > 0, "secagg.max-weight", "must be > 0")
        _check(_finite(self.timeout) and self.timeout >= 0, "secagg.timeout", "must be >= 0")
