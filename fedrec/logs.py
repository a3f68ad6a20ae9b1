"""Logging for fedrec's own messages, without turning on every library's INFO logs."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """Send ``fedrec.*`` records at ``level`` to stderr (once per process)."""
    logger = logging.getLogger("fedrec")
    logger.setLevel(level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
