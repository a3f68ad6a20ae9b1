"""FedAvg over the LoRA adapters, with the bookkeeping fedrec reports.

``FedRecAvg`` is Flower's message-based ``FedAvg`` (weighted by
``num-examples``) plus three things:

* replies whose adapters do not match the global ones (keys, shapes, NaN/Inf) or
  moved implausibly far (``max-update-norm``) are rejected and logged before
  averaging, so one broken client cannot poison the aggregate; error replies
  (a device's data refused, a spent budget, a lost node) are logged with their reason;
* bytes sent down and up per client are counted each round;
* a round offset, so a resumed run continues its round numbers;
* optionally, a step decay of the server learning rate (``server-lr-step-round``,
  one or more steps) for the strategies that have one, by the run's round;
* optionally, seeded client sampling (:class:`server.sampling.SeededSampling`):
  the same seed trains the same clients in every run; the partition ids whose
  updates were averaged are recorded per round;
* on-client (federated) evaluation metrics kept as ``federated_<metric>``;
* the record-level epsilon of private clients (maximum, median, run maximum)
  and budget refusals, per round (:class:`server.privacy_report.EpsilonLedger`);
* server optimizers: :class:`FedRecAvgM` and :class:`FedRecAdam` are the same
  strategy on top of Flower's ``FedAvgM`` and ``FedAdam``, which take a server
  step from the validated weighted mean (``federation.server-optimizer``; their
  state is checkpointed and restored on resume, :mod:`server.optimizer_state`), and
  :class:`FedRecProx` on top of Flower's ``FedProx``;
* under user-level DP (:meth:`FedRecAvg.use_user_dp`, called by
  ``server.user_dp.wrap_strategy``), equal weights and a fixed denominator, so
  that the noise Flower's DP wrappers add matches one client's true influence.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedrec import records
from fedrec.model.adapters import AdapterStateError, check_adapter_state
from fedrec.model.wire import decode_update
from server.privacy_report import EpsilonLedger
from server.replies import reply_partition_id
from server.sampling import EVALUATE_STREAM, TRAIN_STREAM, SeededSampling

log = logging.getLogger("fedrec.server.strategy")

NOT_AVERAGED = (records.EPSILON, records.DELTA, records.NOISE_MULTIPLIER, records.PARTITION_ID)
"""Client metrics whose average means nothing; epsilons are summarised by EpsilonLedger."""

CLIP_TOLERANCE = 1e-3
"""Relative slack on the clipping norm when checking clipped client updates (float32)."""


class FedRecAvg(FedAvg):
    """FedAvg of adapter state dicts with validation and traffic accounting."""

    server_lr_attribute: str | None = None
    """The Flower strategy's attribute that holds its server learning rate (None: it has none)."""

    def __init__(
        self,
        *args,
        round_offset: int = 0,
        max_update_norm: float = 0.0,
        wire_dtype: str = "float32",
        sampling: SeededSampling | None = None,
        server_lr_steps: Sequence[tuple[int, float]] = (),
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if server_lr_steps and self.server_lr_attribute is None:
            raise ValueError(f"{type(self).__name__} has no server learning rate to step")
        self.server_lr_steps = sorted(server_lr_steps)
        """(first round of the run, rate) pairs: each rate holds from its round to the next step's."""
        self.sampling = sampling
        """Which nodes a round takes: Flower's unseeded draw if None."""
        self.wire_dtype = wire_dtype
        """How clients encode their updates (fedrec.model.wire); decoded before validation."""
        self.round_offset = round_offset
        self.optimizer_rounds_before = 0
        """Rounds the server optimizer's restored state has already stepped
        (:mod:`server.optimizer_state`): FedAdam's bias correction counts them."""
        self.max_update_norm = max_update_norm
        """Reject updates farther (L2) than this from the global adapters (0: no bound)."""
        self.last_round: dict[str, float] = {}
        self.user_dp_clients = 0
        """0, or the clients per round that user-level DP noise is calibrated for."""
        self._global = None
        self.epsilons = EpsilonLedger()
        self._clipping_norm_sent: float | None = None

    def use_user_dp(self, num_sampled_clients: int) -> None:
        """Aggregate as user-level DP (DP-FedAvg) needs, from now on.

        Flower's DP wrappers add noise of std ``z * C / m`` to the average of the
        m sampled clients' clipped updates: calibrated for one client moving that
        average by at most ``C / m``. So that this holds:

        * every update weighs the same (weighted by num-examples, one client
          could move the average by up to ``C * w_i / sum(w)``);
        * rejected or missing replies count as zero updates and the sum of the
          updates is divided by m, not by the replies received;
        * when the wrapper sends clients a clipping norm (client-side modes), an
          update longer than it is rejected (counted as zero).
        """
        if num_sampled_clients < 1:
            raise ValueError(f"num_sampled_clients must be >= 1, got {num_sampled_clients}")
        self.user_dp_clients = num_sampled_clients
        self.weighted_by_key = records.EQUAL_WEIGHT

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        clipping_norm = config.get(KEY_CLIPPING_NORM) if self.user_dp_clients else None
        self._clipping_norm_sent = None if clipping_norm is None else float(clipping_norm)
        messages = list(
            super().configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        if self.sampling is not None:
            messages = self.sampling.readdress(
                messages, grid, server_round + self.round_offset, TRAIN_STREAM
            )
        if self.user_dp_clients and len(messages) != self.user_dp_clients:
            log.warning(
                "Sampled %d clients, but user-level DP is calibrated and accounted for %d",
                len(messages),
                self.user_dp_clients,
            )
        self.last_round = {
            records.CLIENTS: float(len(messages)),
            records.BYTES_DOWN_PER_CLIENT: float(arrays.count_bytes()),
        }
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = super().configure_evaluate(server_round, arrays, config, grid)
        if self.sampling is None:
            return messages
        return self.sampling.readdress(messages, grid, server_round + self.round_offset, EVALUATE_STREAM)

    def _is_valid(self, message: Message) -> bool:
        if message.has_error():  # FedAvg drops error replies; say why each failed
            log.warning(
                "Node %s replied with error %d: %s",
                message.metadata.src_node_id,
                message.error.code,
                message.error.reason,
            )
            return True
        try:
            payload = message.content[self.arrayrecord_key].to_torch_state_dict()
            received = decode_update(payload, self._global, self.wire_dtype)
            if self.wire_dtype != "float32":  # FedAvg averages the restored float32 adapters
                message.content[self.arrayrecord_key] = ArrayRecord(received)
            check_adapter_state(self._global, received)
            if self.max_update_norm:
                self._check_norm(received)
            if self._clipping_norm_sent is not None:
                self._check_clipped(received)
        except (AdapterStateError, KeyError, ValueError, TypeError) as err:
            log.warning(
                "Rejected the update of node %s: %s", message.metadata.src_node_id, err
            )
            return False
        return True

    def _update_norm(self, received: dict) -> float:
        return math.sqrt(
            sum(
                float((received[k].double() - g.double()).square().sum())
                for k, g in self._global.items()
            )
        )

    def _check_norm(self, received: dict) -> None:
        """Raise ValueError for an update implausibly far from the global adapters."""
        norm = self._update_norm(received)
        if norm > self.max_update_norm:
            raise ValueError(
                f"update norm {norm:.6g} exceeds max-update-norm {self.max_update_norm:g}"
            )

    def _check_clipped(self, received: dict) -> None:
        """Raise ValueError unless the update is within the clipping norm sent to clients."""
        norm = self._update_norm(received)
        if norm > self._clipping_norm_sent * (1 + CLIP_TOLERANCE):
            raise ValueError(
                f"update norm {norm:.6g} exceeds the clipping norm "
                f"{self._clipping_norm_sent:.6g} sent to clients; is "
                "clients.mods.user_dp_clipping_mod among the ClientApp's train mods?"
            )

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        wire_bytes = {  # as sent, before any decoding
            id(m): m.content[self.arrayrecord_key].count_bytes()
            for m in replies
            if not m.has_error() and self.arrayrecord_key in m.content
        }
        valid = [m for m in replies if self._is_valid(m)]
        ok = [m for m in valid if not m.has_error()]
        self.last_round[records.BYTES_UP_PER_CLIENT] = (
            sum(wire_bytes[id(m)] for m in ok) / len(ok) if ok else 0.0
        )
        self.last_round[records.FAILURES] = float(len(replies) - len(ok))
        self.last_round[records.TRAINED_PARTITIONS] = _partition_ids(ok)
        self.last_round[records.REJECTED_UPDATES] = float(len(replies) - len(valid))
        self.last_round.update(self.epsilons.round_report(replies))
        if self.user_dp_clients:
            for message in ok:
                for record in message.content.metric_records.values():
                    record[records.EQUAL_WEIGHT] = 1
        self._step_server_lr(server_round + self.round_offset)
        if self.server_lr_attribute is not None:
            self.last_round[records.SERVER_LR] = float(getattr(self, self.server_lr_attribute))
        arrays, metrics = super().aggregate_train(server_round + self.optimizer_rounds_before, valid)
        if arrays is not None:
            arrays = self._in_global_dtypes(arrays)
        if arrays is not None and self.user_dp_clients:
            arrays = self._divide_by_sampled(arrays, len(ok))
        if metrics is not None:
            self.last_round.update(
                {k: float(v) for k, v in metrics.items() if k not in NOT_AVERAGED}
            )
        return arrays, metrics

    def _step_server_lr(self, run_round: int) -> None:
        """Switch to the rate of the latest step whose round ``run_round`` has reached."""
        reached = [rate for first_round, rate in self.server_lr_steps if run_round >= first_round]
        if not reached:
            return
        current, stepped = getattr(self, self.server_lr_attribute), reached[-1]
        if current != stepped:
            log.info("Round %d: server learning rate %g -> %g (server-lr-step-round)", run_round, current, stepped)
            setattr(self, self.server_lr_attribute, stepped)

    def _in_global_dtypes(self, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregate in the global adapters' dtypes: FedAdam's NumPy arithmetic
        returns float64, which would double every later download."""
        state = arrays.to_torch_state_dict()
        if all(state[k].dtype == g.dtype for k, g in self._global.items()):
            return arrays
        return ArrayRecord(OrderedDict((k, state[k].to(g.dtype)) for k, g in self._global.items()))

    def _divide_by_sampled(self, mean: ArrayRecord, count: int) -> ArrayRecord:
        """The global adapters plus the sum of ``count`` updates over max(m, count)."""
        scale = count / max(self.user_dp_clients, count)
        if scale == 1:
            return mean
        averaged = mean.to_torch_state_dict()
        return ArrayRecord(
            OrderedDict((k, g + (averaged[k] - g) * scale) for k, g in self._global.items())
        )

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the clients' own evaluations, recorded as ``federated_<metric>``."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.last_round.update({f"{records.FEDERATED_PREFIX}{k}": float(v) for k, v in metrics.items()})
        return metrics


def _partition_ids(replies: Iterable[Message]) -> list[int]:
    """The sorted partition ids the replies' metrics name (replies without one skipped)."""
    return sorted(p for p in map(reply_partition_id, replies) if p is not None)


class FedRecAvgM(FedRecAvg, FedAvgM):
    """:class:`FedRecAvg` whose server applies the mean update with a learning rate
    and momentum (Flower's ``FedAvgM``, Hsu et al. 2019)."""

    server_lr_attribute = "server_learning_rate"

    def _step_server_lr(self, run_round: int) -> None:
        super()._step_server_lr(run_round)
        if not self.server_opt and self.server_learning_rate != 1.0:
            # Built with rate 1 and no momentum, FedAvgM skipped its server step and
            # never moved the arrays it steps from past round 1's: start from this round's.
            self.server_opt = True
            self.current_arrays = ArrayRecord(self._global)


class FedRecAdam(FedRecAvg, FedAdam):
    """:class:`FedRecAvg` whose server takes per-coordinate adaptive steps along the
    mean update (Flower's ``FedAdam``, Reddi et al. 2021). Rarely updated coordinates
    (e.g. the item-identity rows of niche items, which few clients touch) get steps
    of the same size as frequent ones instead of being diluted by the mean."""

    server_lr_attribute = "eta"


class FedRecProx(FedRecAvg, FedProx):
    """:class:`FedRecAvg` that sends clients FedProx's ``proximal-mu`` in every round's
    train config (Flower's ``FedProx``, Li et al. 2020); the clients' proximal term
    is :mod:`fedrec.proximal`, the server side is FedAvg."""


def server_strategy(
    name: str, server_lr: float, server_momentum: float, proximal_mu: float = 0.0, **kwargs
) -> FedRecAvg:
    """The strategy of ``federation.server-optimizer`` with its server step settings."""
    if name == "fedprox":
        return FedRecProx(proximal_mu=proximal_mu, **kwargs)
    if name == "fedavg":
        return FedRecAvg(**kwargs)
    if name == "fedavgm":
        return FedRecAvgM(server_learning_rate=server_lr, server_momentum=server_momentum, **kwargs)
    if name == "fedadam":
        return FedRecAdam(eta=server_lr, beta_1=server_momentum, **kwargs)
    raise ValueError(f"unknown server optimizer {name!r}")
