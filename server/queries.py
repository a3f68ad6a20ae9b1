"""Ask every connected node one question before the first round (a Flower ``query``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrec import records

log = logging.getLogger("fedrec.server")

Saved = TypeVar("Saved")


@dataclass(frozen=True)
class Replies:
    """The replies without an error, and how many nodes sent none."""

    ok: list[Message]
    failures: int
    first_error: str = ""
    """The reason of the first error reply, if any."""


def ask_every_node(grid: Grid, catalogue_digest: str, timeout: float, action: str = "") -> Replies:
    """Send ``query`` (``query.ACTION`` with an action) to every connected node, with
    the catalogue's digest; collect the replies."""
    node_ids = list(grid.get_node_ids())
    message_type = f"{MessageType.QUERY}.{action}" if action else MessageType.QUERY
    messages = [
        Message(
            content=RecordDict({records.CONFIG: ConfigRecord({records.CATALOGUE_DIGEST: catalogue_digest})}),
            dst_node_id=node_id,
            message_type=message_type,
        )
        for node_id in node_ids
    ]
    ok, first_error = [], ""
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if reply.has_error():
            log.warning("node %s replied to %s with an error: %s", reply.metadata.src_node_id, message_type, reply.error.reason)
            first_error = first_error or reply.error.reason
            continue
        ok.append(reply)
    return Replies(ok, len(node_ids) - len(ok), first_error)


def saved_for_resume(load: Callable[[], Saved | None], what: str, out_dir: Path) -> Saved | None:
    """What an earlier run of this folder saved from its clients, for a resumed run
    (clients release once per run); None when there is nothing to reuse, or when
    ``load`` raises ValueError because it no longer fits (e.g. the catalogue grew,
    incremental learning): the clients are asked again."""
    try:
        saved = load()
    except ValueError as err:
        log.info("Not reusing the saved %s: %s", what, err)
        return None
    if saved is not None:
        log.info("Reusing the %s of %s", what, out_dir)
    return saved
