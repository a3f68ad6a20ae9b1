"""User-level (epsilon, delta) of DP-FedAvg over server rounds, from Opacus' accountants.

One round of DP-FedAvg (Flower's DifferentialPrivacy*Clipping wrappers, see
server/user_dp.py) is a Gaussian mechanism on the sum of the m sampled clients'
clipped adapter updates: each client's update is clipped to L2 norm C, and the
mean over the m clients gets noise of std ``z * C / m`` (the sum: ``z * C``).
With equal weights and the fixed denominator m that FedRecAvg uses under
user-level DP, one client changes that sum by at most C, so the round is a
Gaussian mechanism with noise multiplier z for one client's whole contribution.

Over T rounds with a fraction ``q = m / N`` of the N clients sampled in each,
the history ``(z, q, T)`` goes to an Opacus accountant (RDP by default, PRV
optionally), exactly as Opacus accounts DP-SGD steps. Nothing here re-derives an
accounting formula.

Assumptions, stated because the number depends on them:

* Neighbouring datasets differ by one client's whole contribution (its update
  present or replaced by nothing / zero), the add/remove relation that Opacus'
  accountants and DP-FedAvg (McMahan et al. 2018) use.
* Amplification by sampling: Opacus' accountants analyse *Poisson* sampling
  (each client joins a round independently with probability q). Flower samples
  exactly m clients uniformly *without replacement*. The amplified epsilon is
  therefore the usual approximation, not a proof for Flower's sampler (Flower's
  own accountant accepts these wrappers only without amplification). The
  unamplified epsilon (``amplified=False``: q = 1, every client treated as
  present in every round) holds whatever the sampler; it is reported next to it.
* The server is trusted: it sees every update and adds the noise. In the
  client-side modes clients clip, and the server rejects longer updates, so the
  bound on one client's influence does not rest on the clients.
* Only the global adapters are covered: training metrics (loss, examples, the
  clipped fraction) and evaluation results are released without noise.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.supercore.differential_privacy import compute_adaptive_noise_params
from opacus.accountants import create_accountant

from fedrec.errors import check_setting
from fedrec.privacy.config import ACCOUNTANTS, UserLevelDPConfig, default_delta

ADAPTIVE_MODES = ("server-adaptive", "client-adaptive")


def user_delta(config: UserLevelDPConfig, num_clients: int) -> float:
    """``user-dp.delta``, or 1 / (10 N) for N clients when it is 0."""
    return default_delta(config.delta, num_clients, "client")


def adaptive_noise(noise_multiplier: float, num_sampled_clients: float) -> tuple[float, float]:
    """``(update noise multiplier, clipped-count noise std)`` Flower's adaptive wrappers use.

    Flower reads ``user-dp.noise-multiplier`` z as the combined multiplier of
    Andrew et al. (2021) and derives the update multiplier
    ``z_update = (z**-2 - (2 * s)**-2) ** -0.5`` with a clipped-count std
    ``s = m / 20``. Raises :class:`fedrec.errors.ConfigError` when z is too large
    for m (Flower needs ``z < 2 s = m / 10``).
    """
    check_setting(
        noise_multiplier < num_sampled_clients / 10,
        "user-dp.noise-multiplier",
        f"{noise_multiplier} is too large for the adaptive modes with "
        f"{num_sampled_clients:g} clients per round: Flower's clipped-count noise is "
        f"clients/20, which needs noise-multiplier < clients/10 = "
        f"{num_sampled_clients / 10:g}; sample more clients per round or lower it",
    )
    count_std, update_multiplier = compute_adaptive_noise_params(
        noise_multiplier, num_sampled_clients, None
    )
    return float(update_multiplier), float(count_std)


def accounted_noise_multiplier(config: UserLevelDPConfig, num_sampled_clients: float) -> float:
    """The noise multiplier one round is accounted with.

    Fixed clipping: ``user-dp.noise-multiplier`` itself. Adaptive clipping: each
    round releases two Gaussian queries on the same sampled clients, the summed
    updates (multiplier ``z_update``) and the count of clipped updates (std ``s``),
    together one Gaussian mechanism with multiplier
    ``(z_update**-2 + (count sensitivity / s)**2) ** -0.5`` (Andrew et al. 2021,
    Theorem 1). Andrew et al. count ``b - 1/2`` against a fixed denominator, which
    halves the count's sensitivity; Flower counts ``b`` in {0, 1} and divides by
    the replies received, so its count has sensitivity 1, and we account with 1.
    This is smaller than the z Flower reads from the setting (which assumes 1/2).
    """
    z = config.noise_multiplier
    if config.mode not in ADAPTIVE_MODES or z == 0:
        return z
    update_multiplier, count_std = adaptive_noise(z, num_sampled_clients)
    return (update_multiplier**-2 + count_std**-2) ** -0.5


def user_level_epsilon(
    config: UserLevelDPConfig,
    sample_rate: float,
    rounds: int,
    num_clients: int,
    *,
    amplified: bool = True,
    accountant: str = "rdp",
) -> tuple[float, float]:
    """``(epsilon, delta)`` of one client's contribution after ``rounds`` DP-FedAvg rounds.

    ``sample_rate`` is the clients sampled per round over ``num_clients`` (q = m/N).
    ``amplified``: account q as Poisson sampling (the usual approximation for
    Flower's fixed-size sampling); False: as if every client took part in every
    round (q = 1), a bound that holds for any sampler. ``delta`` is
    ``user-dp.delta`` or 1/(10 N). Epsilon is infinite when user-level DP is off
    or the noise multiplier is 0, and 0 before any round.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if rounds < 0:
        raise ValueError(f"rounds must be >= 0, got {rounds}")
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got '{accountant}'")
    delta = user_delta(config, num_clients)
    if rounds == 0:
        return 0.0, delta
    if not config.enabled:
        return math.inf, delta
    z = accounted_noise_multiplier(config, sample_rate * num_clients)
    if z == 0:
        return math.inf, delta
    opacus_accountant = create_accountant(mechanism=accountant)
    opacus_accountant.history = [(z, sample_rate if amplified else 1.0, rounds)]
    with np.errstate(divide="ignore"):  # Opacus' PRV takes log(1 - q), -inf at q = 1
        return float(opacus_accountant.get_epsilon(delta=delta)), delta
