"""fedrec's log handler follows sys.stderr when it is swapped (pytest, notebooks)."""

import io
import logging
import sys

from fedrec.logs import setup_logging


def test_records_go_to_the_stderr_of_the_moment_not_the_one_at_setup(monkeypatch):
    logger = logging.getLogger("fedrec")
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "propagate", logger.propagate)
    monkeypatch.setattr(logger, "level", logger.level)
    at_setup, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", at_setup)
    setup_logging()
    at_setup.close()  # what pytest does to a capture stream at the end of a test
    monkeypatch.setattr(sys, "stderr", later)

    logging.getLogger("fedrec.prepare").info("Preparing %s", "csv")

    assert "INFO fedrec.prepare: Preparing csv" in later.getvalue()
