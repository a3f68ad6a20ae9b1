"""FedAvg of the LoRA adapters under secure aggregation (Flower's SecAgg+).

With ``secagg.enabled`` the server never sees one client's adapters: each client
quantizes its weighted adapters to integers, adds pairwise masks shared with its
neighbours plus a private mask, and the masks cancel only in the sum. The server
unmasks the sum and divides it by the summed weights: the same weighted FedAvg
as ``FedRecAvg``, to within the quantization error.

Flower 1.41 implements SecAgg+ only in its legacy workflow API
(``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` over a legacy
``Strategy`` and a ``LegacyContext``). :class:`SecAggFedRec` is that legacy
``FedAvg``, with the same ``start(grid, initial_arrays, num_rounds, evaluate_fn)``
and ``last_round`` as :class:`server.strategy.FedRecAvg`, so the ServerApp picks
one or the other and keeps its evaluation, checkpoints and metrics.json.

Each round takes four exchanges with the sampled clients (setup: public keys;
share keys: encrypted key shares; collect masked vectors: the clients train and
upload masked adapters; unmask: shares that remove the masks, including those
of clients that dropped out after sharing their keys).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, Context, Error, MetricRecord, RecordDict
from flwr.common import (
    FitIns,
    FitRes,
    NDArrays,
    Parameters,
    Scalar,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.errors import ConfigError, check_setting
from fedrec.model.adapter_arrays import (
    adapter_keys,
    from_ndarrays,
    join_keys,
    to_ndarrays,
)
from fedrec.privacy.config import SecAggConfig
from server.privacy_report import EpsilonLedger
from server.sampling import SeededSampling
from server.strategy import NOT_AVERAGED
from server.traffic import TrafficGrid

log = logging.getLogger("fedrec.server.secagg")

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]

# A client's weight is worse resolved than it could be by this factor before we warn.
WEIGHT_HEADROOM_WARNING = 10.0


def _count_or_fraction(value: float, key: str) -> int | float:
    """A count (an int, for Flower) when > 1, else a fraction (a float)."""
    if value <= 1:
        return float(value)
    check_setting(float(value).is_integer(), key, f"{value} is neither a whole count nor a fraction in (0, 1]")
    return int(value)


def secaggplus_workflow(settings: SecAggConfig) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ workflow for the ``secagg.*`` settings.

    Flower reads a Python float as a fraction of the round's clients (num-shares)
    or of the shares (reconstruction-threshold) and an int as a count, so counts
    are converted to int here.
    """
    num_shares = _count_or_fraction(settings.num_shares, "secagg.num-shares")
    threshold = _count_or_fraction(
        settings.reconstruction_threshold, "secagg.reconstruction-threshold"
    )
    check_setting(
        not isinstance(num_shares, int) or num_shares >= 3,
        "secagg.num-shares",
        f"{num_shares} shares: Flower's SecAgg+ needs at least 3 (or a fraction in (0, 1])",
    )
    if isinstance(num_shares, int) and isinstance(threshold, int):
        check_setting(
            threshold < num_shares,
            "secagg.reconstruction-threshold",
            f"{threshold} must be below secagg.num-shares={num_shares} "
            "(otherwise no client may drop out)",
        )
    try:
        return SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=settings.max_weight,
            clipping_range=settings.clipping_range,
            quantization_range=settings.quantization_range,
            timeout=settings.timeout or None,
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"settings 'secagg.*': {err}") from err


def quantization_error_bound(num_examples: list[int], settings: SecAggConfig) -> float:
    """Largest error of one aggregated adapter value caused by SecAgg+'s quantization.

    Client i sends round(q (n_i / max_weight) theta_i) with stochastic rounding
    (error < 1 step of 2 clipping_range / quantization_range); the server divides
    the sum by the summed weights, so the n steps of error shrink by those weights.
    """
    target = settings.quantization_range
    weights = sum(round(n / settings.max_weight * target) for n in num_examples)
    if weights == 0:
        return math.inf
    return len(num_examples) * 2 * settings.clipping_range / weights


def _weighted_metrics(results: list[tuple[ClientProxy, FitRes]]) -> dict[str, Scalar]:
    """The clients' numeric metrics averaged with their num-examples as weights.

    Each metric over the clients that report it; NOT_AVERAGED ones are left out.
    """
    keys = {
        k
        for _, res in results
        for k, v in res.metrics.items()
        if isinstance(v, (int, float)) and k not in NOT_AVERAGED
    }
    averages = {}
    for key in sorted(keys):
        pairs = [(res.num_examples, float(res.metrics[key])) for _, res in results if key in res.metrics]
        total = sum(n for n, _ in pairs)
        if total:
            averages[key] = sum(n * v for n, v in pairs) / total
    return averages


@dataclass
class _LegacyReply:
    """The parts of a reply EpsilonLedger reads, from a legacy FitRes's metrics."""

    metrics: dict[str, Scalar]

    def has_error(self) -> bool:
        return False

    @property
    def content(self) -> RecordDict:
        return RecordDict({records.METRICS: MetricRecord(self.metrics)})


def _refusals(failures: list) -> int:
    """Clients that refused to train (DP-SGD budget spent), among the round's failures.

    SecAggPlusWorkflow keeps each error reply as ``Exception(error)``, some twice.
    """
    errors = {id(f.args[0]): f.args[0] for f in failures if isinstance(f, Exception) and f.args}
    return sum(
        1 for e in errors.values() if isinstance(e, Error) and e.code == records.BUDGET_EXHAUSTED
    )


class SecAggFedRec(LegacyFedAvg):
    """FedAvg of adapter state dicts through SecAgg+, with fedrec's bookkeeping.

    ``last_round`` holds this round's clients, failures (sampled clients whose
    masked adapters did not arrive), bytes down/up per client (every SecAgg+
    stage counted), the seconds of the round's four exchanges, the clients'
    averaged training metrics and the bound on the quantization error.
    """

    def __init__(
        self,
        config: FedRecConfig,
        context: Context,
        round_offset: int = 0,
        sampling: SeededSampling | None = None,
    ) -> None:
        federation = config.federation
        check_setting(
            federation.min_train_nodes >= 2,
            "min-train-nodes",
            "must be >= 2 with secagg.enabled (SecAgg+ sums at least two clients' updates)",
        )
        check_setting(
            not config.user_dp.enabled,
            "user-dp.mode",
            f"'{config.user_dp.mode}' cannot be combined with secagg.enabled: fedrec's user-level "
            "DP clips or weighs each client's update on the server, which SecAgg+ hides; "
            "use one or the other (dp.enabled, DP-SGD on the clients, works with secagg)",
        )
        if federation.fraction_evaluate > 0:
            log.warning(
                "fraction-evaluate=%s is ignored with secagg.enabled: federated evaluation "
                "is not run; the server evaluates the aggregate each round",
                federation.fraction_evaluate,
            )
        super().__init__(
            fraction_fit=federation.fraction_train,
            fraction_evaluate=0.0,
            min_fit_clients=federation.min_train_nodes,
            min_evaluate_clients=0,
            min_available_clients=federation.min_train_nodes,
            on_fit_config_fn=self._fit_config,
            accept_failures=True,
        )
        self.settings = config.secagg
        self.workflow = secaggplus_workflow(config.secagg)
        self.context = context
        self.round_offset = round_offset
        self.sampling = sampling
        """Which nodes a round takes: the legacy client manager's unseeded draw if None."""
        self._grid: Grid | None = None
        self.last_round: dict[str, float] = {}
        self.rounds: list[dict[str, float]] = []
        self._keys: list[str] = []
        self._dtypes: dict[str, torch.dtype] = {}
        self._evaluate_fn: EvaluateFn | None = None
        self._traffic: TrafficGrid | None = None
        self._round = 0
        self._survivors = 0
        self._warned_weight = False
        self.epsilons = EpsilonLedger()
        """Record-level (DP-SGD) epsilons the clients report, as FedRecAvg keeps them."""

    # -- what the legacy workflow calls ---------------------------------------

    def _fit_config(self, server_round: int) -> dict[str, Scalar]:
        return {
            records.SERVER_ROUND: server_round + self.round_offset,
            records.ADAPTER_KEYS: join_keys(self._keys),
        }

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Flower's legacy FedAvg decides how many nodes train; seeded sampling, which."""
        instructions = super().configure_fit(server_round, parameters, client_manager)
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        if self.sampling is None or self._grid is None or not instructions or len(instructions) >= len(proxies):
            return instructions
        chosen = self.sampling.choose(
            self._grid, sorted(proxies), len(instructions), server_round + self.round_offset
        )
        fit_ins = instructions[0][1]
        return [(proxies[node], fit_ins) for node in chosen]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list,
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Take the unmasked aggregate as it is (SecAgg+ has already averaged it)."""
        if not results:
            return None, {}
        # SecAggPlusWorkflow sets every result's parameters to the weighted average.
        aggregate = parameters_to_ndarrays(results[0][1].parameters)
        # Dequantized values are float64: back to the adapters' own dtype for the wire.
        aggregate = to_ndarrays(from_ndarrays(self._keys, aggregate, self._dtypes), self._keys)
        examples = [res.num_examples for _, res in results]
        metrics = _weighted_metrics(results)
        self._survivors = len(results)
        self.last_round.update({k: float(v) for k, v in metrics.items()})
        self.last_round.update(
            self.epsilons.round_report(_LegacyReply(dict(res.metrics)) for _, res in results)
        )
        refusals = _refusals(failures)
        if refusals:
            log.warning("%d client(s) refused to train: their DP-SGD budget is spent", refusals)
            self.last_round[records.BUDGET_REFUSALS] = float(refusals)
        self.last_round[records.TRAINED_PARTITIONS] = sorted(
            int(res.metrics[records.PARTITION_ID]) for _, res in results if records.PARTITION_ID in res.metrics
        )
        self.last_round[records.SECAGG_ERROR_BOUND] = quantization_error_bound(examples, self.settings)
        self._check_weights(examples)
        return ndarrays_to_parameters(aggregate), metrics

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        if self._evaluate_fn is None:
            return None
        arrays = self._arrays(parameters_to_ndarrays(parameters))
        metrics = self._evaluate_fn(server_round, arrays)
        if metrics is None:
            return None
        return math.nan, {k: v for k, v in metrics.items() if isinstance(v, (int, float))}

    def _fit_round(self, grid: Grid, context: Context) -> None:
        """One round of SecAgg+ (the workflow's four stages), timed and metered."""
        assert self._traffic is not None
        self._traffic.reset()
        self._survivors = 0
        self._round += 1
        self.last_round = {}
        start = time.monotonic()
        self.workflow(grid, context)
        seconds = time.monotonic() - start
        down, up = self._traffic.per_node()
        clients = len(self._traffic.sent)
        if not self._survivors:
            log.warning(
                "SecAgg+ round %d halted (too few clients or shares, see Flower's log); "
                "the global adapters stay as they were",
                self._round + self.round_offset,
            )
        self.last_round.update(
            {
                records.CLIENTS: float(clients),
                records.FAILURES: float(clients - self._survivors),
                records.BYTES_DOWN_PER_CLIENT: down,
                records.BYTES_UP_PER_CLIENT: up,
                records.FIT_SECONDS: seconds,
            }
        )
        self.rounds.append({records.ROUND: self._round + self.round_offset, **self.last_round})

    # -- the API shared with FedRecAvg ----------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        evaluate_fn: EvaluateFn | None = None,
    ) -> list[dict[str, float]]:
        """Run ``num_rounds`` rounds; ``evaluate_fn(round, arrays)`` after each (and round 0).

        Returns each round's ``last_round`` figures, with its round number.
        """
        state = initial_arrays.to_torch_state_dict()
        self._keys = adapter_keys(state)
        self._dtypes = {k: t.dtype for k, t in state.items()}
        self._evaluate_fn = evaluate_fn
        self._grid = grid  # seeded sampling's identify queries: not metered as round traffic
        self.initial_parameters = ndarrays_to_parameters(to_ndarrays(state, self._keys))
        self._traffic = TrafficGrid(grid)
        legacy = LegacyContext(
            context=self.context, config=ServerConfig(num_rounds=num_rounds), strategy=self
        )
        DefaultWorkflow(fit_workflow=self._fit_round)(self._traffic, legacy)
        return self.rounds

    # -- helpers ----------------------------------------------------------------

    def _arrays(self, ndarrays: NDArrays) -> ArrayRecord:
        return ArrayRecord(from_ndarrays(self._keys, ndarrays, self._dtypes))

    def _check_weights(self, examples: list[int]) -> None:
        largest = max(examples)
        max_weight = self.settings.max_weight
        if largest == 0:
            return
        if largest > max_weight:
            log.warning(
                "a client reported num-examples=%d > secagg.max-weight=%s: its scaled adapters "
                "may exceed secagg.clipping-range and be clipped; raise secagg.max-weight",
                largest,
                max_weight,
            )
        elif not self._warned_weight and max_weight > WEIGHT_HEADROOM_WARNING * largest:
            self._warned_weight = True
            log.warning(
                "secagg.max-weight=%s is %.0fx the largest num-examples this round (%d): the "
                "aggregate's quantization error (bound %.2g per value) is that much larger than "
                "needed; set secagg.max-weight near the largest num-examples a client reports",
                max_weight,
                max_weight / largest,
                largest,
                quantization_error_bound(examples, self.settings),
            )
