"""User-level DP (DP-FedAvg): FedRecAvg inside one of Flower's DP strategy wrappers.

``user-dp.mode`` picks the wrapper from ``flwr.serverapp.strategy``:

==================  ===============================================  ====================
mode                wrapper                                          clipping done by
==================  ===============================================  ====================
server-fixed        DifferentialPrivacyServerSideFixedClipping       the server
client-fixed        DifferentialPrivacyClientSideFixedClipping       each client's mod
server-adaptive     DifferentialPrivacyServerSideAdaptiveClipping    the server
client-adaptive     DifferentialPrivacyClientSideAdaptiveClipping    each client's mod
==================  ===============================================  ====================

Each round the wrapper clips every sampled client's adapter update
(``reply - global``) to L2 norm C, lets FedRecAvg average them, and adds Gaussian
noise of std ``z * C / m`` to every adapter entry of the average, m being
``num_sampled_clients`` (``flwr.supercore.differential_privacy.compute_stdv``).
The client-side modes need ``clients.mods.user_dp_clipping_mod`` in the
ClientApp's train mods.

Two things make the released adapters as private as fedrec.privacy.user_level
accounts for:

* :meth:`server.strategy.FedRecAvg.use_user_dp`: Flower's noise assumes one
  client moves the average by at most C/m, true only with equal weights and the
  sum divided by m; FedRecAvg otherwise weights by num-examples.
* Flower 1.41's adaptive wrappers update the clipping norm from this round's
  clipped count *before* noising this round's average, so the noise follows the
  next round's norm while the updates were clipped to this round's: about 10%
  too little noise whenever more than the target quantile were clipped (learning
  rate 0.2; more when the noisy count overshoots). The two subclasses below
  noise at the round's own norm, as Andrew et al. (2021) and TensorFlow Privacy do.

The wrappers do not forward attribute access to the strategy they wrap: keep a
reference to the FedRecAvg you built and read ``last_round`` from it.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    Strategy,
)

from fedrec import records
from fedrec.privacy.config import UserLevelDPConfig
from fedrec.privacy.user_level import ADAPTIVE_MODES, adaptive_noise, user_level_epsilon
from server.strategy import FedRecAvg


class _NoiseAtRoundNorm:
    """Adaptive wrapper that noises a round's average at the norm its updates were clipped to."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.round_clipping_norm: float = self.clipping_norm
        """The clipping norm of the current (or last) round's updates."""

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.round_clipping_norm = self.clipping_norm
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        # Flower's adaptive wrappers iterate the replies twice: hand them a list
        return super().aggregate_train(server_round, list(replies))

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        adapted, self.clipping_norm = self.clipping_norm, self.round_clipping_norm
        try:
            return super()._add_noise_to_aggregated_arrays(aggregated)
        finally:
            self.clipping_norm = adapted


class ServerSideAdaptiveClipping(_NoiseAtRoundNorm, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noised at the round's clipping norm."""


class ClientSideAdaptiveClipping(_NoiseAtRoundNorm, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, noised at the round's clipping norm."""


def clients_per_round(strategy: FedAvg, num_nodes: int) -> int:
    """How many clients ``FedAvg.configure_train`` samples per round from ``num_nodes``."""
    return max(int(num_nodes * strategy.fraction_train), strategy.min_train_nodes)


def wrap_strategy(
    strategy: FedRecAvg, config: UserLevelDPConfig, num_sampled_clients: int
) -> Strategy:
    """``strategy`` inside the DP wrapper ``user-dp.mode`` names; ``strategy`` itself when off.

    When on, ``strategy`` is switched to equal weights and a fixed denominator of
    ``num_sampled_clients`` (:meth:`FedRecAvg.use_user_dp`). The adaptive modes
    start from ``user-dp.clipping-norm`` with Flower's defaults (target quantile
    0.5, learning rate 0.2, clipped-count std m/20).
    """
    if not config.enabled:
        return strategy
    z, norm, m = config.noise_multiplier, config.clipping_norm, num_sampled_clients
    if config.mode in ADAPTIVE_MODES:
        adaptive_noise(z, m)  # a ConfigError naming the setting where Flower would refuse z
    strategy.use_user_dp(m)
    if config.mode == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, z, norm, m)
    if config.mode == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, z, norm, m)
    if config.mode == "server-adaptive":
        return ServerSideAdaptiveClipping(strategy, z, m, initial_clipping_norm=norm)
    return ClientSideAdaptiveClipping(strategy, z, m, initial_clipping_norm=norm)


def user_dp_metrics(
    strategy: Strategy, config: UserLevelDPConfig, rounds: int, num_clients: int
) -> dict[str, float]:
    """The metrics.json entries of user-level DP after ``rounds`` rounds ({} when off).

    ``strategy`` is what :func:`wrap_strategy` returned, ``num_clients`` the N
    clients sampled from; epsilon is accounted with q = m / N (see
    fedrec.privacy.user_level for what the amplified and unamplified numbers assume).
    """
    if not config.enabled:
        return {}
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    sample_rate = min(1.0, strategy.num_sampled_clients / num_clients)
    epsilon, delta = user_level_epsilon(config, sample_rate, rounds, num_clients)
    unamplified, _ = user_level_epsilon(
        config, sample_rate, rounds, num_clients, amplified=False
    )
    return {
        records.USER_EPSILON: epsilon,
        records.USER_EPSILON_UNAMPLIFIED: unamplified,
        records.USER_DELTA: delta,
        records.USER_CLIPPING_NORM: float(
            getattr(strategy, "round_clipping_norm", strategy.clipping_norm)
        ),
    }
