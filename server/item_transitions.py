"""Before the first round: ask every client for its transition counts and sum them.

See :mod:`fedrec.item_transitions` for what the counts are and what they reveal.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from flwr.serverapp import Grid

from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.item_transitions import (
    check_catalogue_size,
    load_transitions,
    save_transitions,
    saved_window,
    sum_counts,
)
from server.queries import ask_every_node, saved_for_resume

log = logging.getLogger("fedrec.server")


def query_transitions(
    grid: Grid, catalogue_digest: str, num_items: int, timeout: float
) -> tuple[sp.csr_matrix, dict[str, float]]:
    """Ask every connected node for its counts; their sum and a summary for metrics.json."""
    log.info("Asking every client for its item-to-item transition counts ...")
    replies = ask_every_node(grid, catalogue_digest, timeout, records.TRANSITIONS_ACTION)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for reply in replies.ok:
        arrays = reply.content[records.ARRAYS]
        rows, cols, counts = (
            arrays[key].numpy()
            for key in (records.TRANSITION_ROWS, records.TRANSITION_COLS, records.TRANSITION_COUNTS)
        )
        valid = (
            rows.shape == cols.shape == counts.shape
            and (not len(rows) or min(rows.min(), cols.min()) >= 0 and max(rows.max(), cols.max()) < num_items)
            and np.all(np.isfinite(counts))
        )
        if not valid:
            log.warning("node %s sent invalid transition counts", reply.metadata.src_node_id)
            continue
        parts.append((rows, cols, counts))
    clients = len(parts)
    total = sum_counts(parts, num_items)
    summary = {
        records.ITEM_COUNT_CLIENTS: clients,
        records.ITEM_COUNT_FAILURES: replies.failures + len(replies.ok) - clients,
        "total": float(total.sum()),
        "nonzero": int(total.nnz),
    }
    if clients == 0:
        raise RuntimeError(
            f"no client returned transition counts (first reply: {replies.first_error or 'none'}); "
            "transitions.weight > 0 needs them"
        )
    return total, summary


def run_item_transitions(
    grid: Grid, config: FedRecConfig, catalogue_digest: str, num_items: int, out_dir: Path, timeout: float
) -> tuple[sp.csr_matrix, dict[str, float] | None]:
    """The run's summed counts: those saved in ``out_dir`` when resuming with the same
    catalogue, else a fresh query, saved. Returns them and the query's summary (None when reused)."""
    check_catalogue_size(num_items)
    window = config.transitions.window
    if config.federation.resume:

        def load() -> sp.csr_matrix | None:
            saved = load_transitions(out_dir, num_items)
            if saved is not None and saved_window(out_dir) != window:
                raise ValueError(f"counted with another transitions.window than {window}")
            return saved

        saved = saved_for_resume(load, "transition counts", out_dir)
        if saved is not None:
            return saved, None
    total, summary = query_transitions(grid, catalogue_digest, num_items, timeout)
    save_transitions(out_dir, total, window)
    log.info(
        "Transition counts from %d clients (%d failed): %d item pairs",
        summary[records.ITEM_COUNT_CLIENTS],
        summary[records.ITEM_COUNT_FAILURES],
        summary["nonzero"],
    )
    return total, summary
