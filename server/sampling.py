"""Seeded client sampling: the same seed trains the same clients in every run.

Flower's strategies draw each round's nodes with the unseeded ``random.sample``
over node ids, and a simulation gives its nodes new random ids in every run; so
two runs with the same ``seed`` train different clients, and a comparison of two
settings carries client-sampling noise on top of the difference it measures.

:class:`SeededSampling` keeps Flower's decision of *how many* nodes a round
takes (``fraction-train``, ``min-train-nodes``) and replaces *which*: before a node
is first sampled the server asks it for its partition id (a ``query.identify``
message, :func:`clients.client_app.identify`), orders the connected nodes by it and
draws the round's nodes with a generator seeded by (run seed, round, train or
evaluate). A resumed run draws what the uninterrupted run would have drawn.
The SecAgg+ path (:class:`server.secure_aggregation.SecAggFedRec`, on Flower's
legacy client manager) picks its nodes with :meth:`SeededSampling.choose` too.

Not under user-level DP: its amplified ε assumes a draw that nobody can predict,
and the run's seed is no secret (``server.server_app`` leaves Flower's draw there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec import records
from server.replies import reply_partition_id

log = logging.getLogger("fedrec.server.sampling")

TRAIN_STREAM = 0
EVALUATE_STREAM = 1
"""Separate generators for the train and the evaluate draw of one round."""


def seeded_draw(
    node_keys: dict[int, int | None], count: int, seed: int, server_round: int, stream: int = TRAIN_STREAM
) -> list[int]:
    """``count`` node ids of ``node_keys`` (node id -> partition id, None if unknown).

    Nodes are ordered by partition id (unknown ones last, by node id), and the
    positions drawn depend only on (seed, round, stream, number of nodes): the same
    partitions are drawn whatever ids the nodes got in this run.
    """
    if not 0 <= count <= len(node_keys):
        raise ValueError(f"cannot draw {count} of {len(node_keys)} nodes")
    order = sorted(node_keys, key=lambda n: (node_keys[n] is None, node_keys[n] or 0, n))
    rng = np.random.default_rng([seed, server_round, stream])
    positions = rng.choice(len(order), size=count, replace=False)
    return [order[i] for i in sorted(positions)]


class SeededSampling:
    """Re-address a round's messages to the nodes :func:`seeded_draw` picks."""

    def __init__(self, seed: int, timeout: float) -> None:
        self.seed = seed
        self.timeout = timeout
        """Seconds to wait for nodes' ``query.identify`` replies."""
        self.node_keys: dict[int, int | None] = {}
        """Node id -> partition id of every node identified so far (None: no reply)."""

    def readdress(
        self, messages: Iterable[Message], grid: Grid, server_round: int, stream: int = TRAIN_STREAM
    ) -> list[Message]:
        """The same messages (as many, same content) sent to this round's seeded draw.

        ``server_round`` is the run's round (a resumed run's offset included). When
        every connected node is sampled anyway, the messages are returned as they are.
        """
        messages = list(messages)
        node_ids = list(grid.get_node_ids())
        if not messages or len(messages) >= len(node_ids):
            return messages
        chosen = self.choose(grid, node_ids, len(messages), server_round, stream)
        template = messages[0]
        return [
            Message(content=template.content, message_type=template.metadata.message_type, dst_node_id=node)
            for node in chosen
        ]

    def choose(
        self, grid: Grid, node_ids: Sequence[int], count: int, server_round: int, stream: int = TRAIN_STREAM
    ) -> list[int]:
        """``count`` of ``node_ids`` by :func:`seeded_draw`, asking new nodes their partition ids."""
        self._identify(grid, [n for n in node_ids if n not in self.node_keys])
        keys = {n: self.node_keys[n] for n in node_ids}
        chosen = seeded_draw(keys, count, self.seed, server_round, stream)
        log.debug("round %d: partitions %s", server_round, sorted(str(keys[n]) for n in chosen))
        return chosen

    def _identify(self, grid: Grid, node_ids: Sequence[int]) -> None:
        """Ask nodes not seen before for their partition ids."""
        if not node_ids:
            return
        log.info("Asking %d nodes for their partition ids (seeded sampling) ...", len(node_ids))
        start = time.monotonic()
        queries = [
            Message(
                content=RecordDict(),
                dst_node_id=node,
                message_type=f"{MessageType.QUERY}.{records.IDENTIFY_ACTION}",
            )
            for node in node_ids
        ]
        self.node_keys.update(dict.fromkeys(node_ids))
        for reply in grid.send_and_receive(queries, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("node %s did not say its partition id: %s", node, reply.error.reason)
                continue
            partition_id = reply_partition_id(reply)
            if partition_id is None:
                log.warning("node %s replied without a partition id", node)
                continue
            self.node_keys[node] = partition_id
        known = sum(self.node_keys[n] is not None for n in node_ids)
        log.info("%d of %d nodes identified in %.1f s", known, len(node_ids), time.monotonic() - start)
        self._warn_duplicates()

    def _warn_duplicates(self) -> None:
        seen: dict[int, int] = {}
        for node, key in self.node_keys.items():
            if key is not None and seen.setdefault(key, node) != node:
                log.warning(
                    "nodes %s and %s both have partition id %d; their draws follow their "
                    "node ids, which change between runs",
                    seen[key],
                    node,
                    key,
                )
