"""Logging for fedrec's own messages, without turning on every library's INFO logs."""

from __future__ import annotations

import logging
import sys


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to ``sys.stderr`` as it is when each record is emitted.

    ``logging.StreamHandler()`` keeps the stream it was created with; test runners and
    notebooks swap ``sys.stderr`` and close the old one, after which every record would
    fail with "I/O operation on closed file".
    """

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # the base class assigns it; the current stderr wins
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``fedrec.*`` records at ``level`` to stderr (once per process)."""
    logger = logging.getLogger("fedrec")
    logger.setLevel(level)
    if not logger.handlers:
        handler = CurrentStderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
