"""Bytes a ServerApp sends and receives through its Grid, counted per node.

``TrafficGrid`` wraps a Flower ``Grid`` and measures every message that passes
through ``send_and_receive``: the size of its content serialized as Flower puts
it on the wire (the ``RecordDict`` protobuf; message headers and transport
framing are not counted). It works for any protocol, so plain FedAvg (one
exchange per round) and SecAgg+ (four) are measured the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from flwr.app import Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid


def content_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content."""
    return recorddict_to_proto(content).ByteSize()


class TrafficGrid:
    """A Grid that counts the bytes sent to and received from each node.

    Every other attribute is the wrapped grid's, so Flower's strategies and
    workflows use it as they would the grid itself. Call :meth:`reset` at the
    start of a round and read :meth:`per_node` at its end.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.sent: Counter[int] = Counter()
        self.received: Counter[int] = Counter()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def reset(self) -> None:
        self.sent.clear()
        self.received.clear()

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        for message in messages:
            self.sent[message.metadata.dst_node_id] += content_bytes(message.content)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            if reply.has_content():
                self.received[reply.metadata.src_node_id] += content_bytes(reply.content)
        return replies

    def per_node(self) -> tuple[float, float]:
        """(bytes down, bytes up) per node that was sent anything since :meth:`reset`."""
        nodes = len(self.sent)
        if not nodes:
            return 0.0, 0.0
        return sum(self.sent.values()) / nodes, sum(self.received.values()) / nodes
