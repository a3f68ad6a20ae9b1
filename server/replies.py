"""Reading what clients put in their replies."""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import Message

from fedrec import records


def reply_metrics(reply: Message) -> Mapping[str, float | int]:
    """The metrics of a (non-error) client reply: its first MetricRecord, else empty."""
    return next(iter(reply.content.metric_records.values()), {})


def reply_partition_id(reply: Message) -> int | None:
    """The partition id a (non-error) client reply names in its metrics, if any."""
    metrics = reply_metrics(reply)
    return int(metrics[records.PARTITION_ID]) if records.PARTITION_ID in metrics else None
