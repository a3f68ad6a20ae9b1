"""What the server learns of its clients' record-level privacy each round."""

from __future__ import annotations

import logging
import statistics
from collections.abc import Iterable

from flwr.app import Message

from fedrec import records
from server.replies import reply_metrics

log = logging.getLogger("fedrec.server.privacy")


class EpsilonLedger:
    """Per-round maximum and median epsilon, and the highest seen in the run so far.

    A client's epsilon is cumulative over every round it trained in, so the last
    value a client reported is its total; the run's maximum is kept across rounds
    (clients are sampled and may not report every round).
    """

    def __init__(self) -> None:
        self.latest: dict[int, float] = {}

    def round_report(self, replies: Iterable[Message]) -> dict[str, object]:
        """Summarise this round's replies: epsilons of trained clients, refusals."""
        epsilons: dict[int, float] = {}
        refusals = 0
        for reply in replies:
            if reply.has_error():
                if reply.error.code == records.BUDGET_EXHAUSTED:
                    refusals += 1
                    log.warning(
                        "node %s refused to train: %s", reply.metadata.src_node_id, reply.error.reason
                    )
                continue
            metrics = reply_metrics(reply)
            if records.EPSILON in metrics:
                epsilons[int(metrics[records.PARTITION_ID])] = float(metrics[records.EPSILON])
        self.latest.update(epsilons)
        report: dict[str, object] = {records.BUDGET_REFUSALS: float(refusals)}
        if epsilons:
            values = list(epsilons.values())
            report[records.EPSILON_MAX] = max(values)
            report[records.EPSILON_MEDIAN] = statistics.median(values)
            report[records.CLIENT_EPSILONS] = {str(k): v for k, v in sorted(epsilons.items())}
        if self.latest:
            report[records.EPSILON_MAX_RUN] = max(self.latest.values())
        return report
