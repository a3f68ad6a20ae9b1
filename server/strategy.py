"""FedAvg over the LoRA adapters, with the bookkeeping fedrec reports.

``FedRecAvg`` is Flower's message-based ``FedAvg`` (weighted by
``num-examples``) plus three things:

* replies whose adapters do not match the global ones (keys, shapes, NaN/Inf)
  are rejected and logged before averaging, so one broken client cannot poison
  the aggregate;
* bytes sent down and up per client are counted each round;
* a round offset, so a resumed run continues its round numbers;
* on-client (federated) evaluation metrics kept as ``federated_<metric>``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrec import records
from fedrec.model.adapters import AdapterStateError, check_adapter_state

log = logging.getLogger("fedrec.server.strategy")


class FedRecAvg(FedAvg):
    """FedAvg of adapter state dicts with validation and traffic accounting."""

    def __init__(self, *args, round_offset: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.round_offset = round_offset
        self.last_round: dict[str, float] = {}
        self._global = None

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = list(
            super().configure_train(server_round + self.round_offset, arrays, config, grid)
        )
        self.last_round = {
            records.CLIENTS: float(len(messages)),
            records.BYTES_DOWN_PER_CLIENT: float(arrays.count_bytes()),
        }
        return messages

    def _is_valid(self, message: Message) -> bool:
        if message.has_error():
            return True  # FedAvg logs and drops error replies itself
        try:
            received = message.content[self.arrayrecord_key].to_torch_state_dict()
            check_adapter_state(self._global, received)
        except (AdapterStateError, KeyError, ValueError, TypeError) as err:
            log.warning(
                "Rejected the update of node %s: %s", message.metadata.src_node_id, err
            )
            return False
        return True

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        valid = [m for m in replies if self._is_valid(m)]
        ok = [m for m in valid if not m.has_error()]
        self.last_round[records.BYTES_UP_PER_CLIENT] = (
            sum(m.content[self.arrayrecord_key].count_bytes() for m in ok) / len(ok) if ok else 0.0
        )
        self.last_round[records.FAILURES] = float(len(replies) - len(ok))
        arrays, metrics = super().aggregate_train(server_round, valid)
        if metrics is not None:
            self.last_round.update({k: float(v) for k, v in metrics.items()})
        return arrays, metrics

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Average the clients' own evaluations, recorded as ``federated_<metric>``."""
        metrics = super().aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.last_round.update({f"{records.FEDERATED_PREFIX}{k}": float(v) for k, v in metrics.items()})
        return metrics
