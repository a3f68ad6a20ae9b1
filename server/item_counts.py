"""Before the first round: ask every client for its noised item counts and sum them.

See :mod:`fedrec.item_counts` for what the counts are, how the devices noise
them and what the release costs in ε.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from flwr.serverapp import Grid

from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.item_counts import load_item_counts, save_item_counts
from server.queries import ask_every_node, saved_for_resume

log = logging.getLogger("fedrec.server")


@dataclass(frozen=True)
class ItemCounts:
    """The summed counts and how they were obtained."""

    counts: np.ndarray
    clients: int
    """Clients whose counts are in the sum."""
    failures: int
    """Clients that replied with an error (e.g. a spent budget) or not at all."""
    first_error: str = ""
    """The reason of the first error reply, if any."""

    def summary(self, noise: float) -> dict[str, float]:
        """What metrics.json records of the query."""
        return {
            records.ITEM_COUNT_CLIENTS: self.clients,
            records.ITEM_COUNT_FAILURES: self.failures,
            "noise_per_client": noise,
            "noise_std_of_sum": noise * math.sqrt(self.clients),
            "total": float(self.counts.sum()),
        }


def query_item_counts(grid: Grid, catalogue_digest: str, num_items: int, timeout: float) -> ItemCounts:
    """Send a ``query`` message to every connected node; sum the counts they return."""
    log.info("Asking every client for its noised item counts ...")
    replies = ask_every_node(grid, catalogue_digest, timeout)
    total = np.zeros(num_items, dtype=np.float64)
    clients = 0
    for reply in replies.ok:
        counts = reply.content[records.ARRAYS][records.ITEM_COUNTS].numpy()
        if counts.shape != (num_items,) or not np.all(np.isfinite(counts)):
            log.warning("node %s sent invalid item counts (shape %s)", reply.metadata.src_node_id, counts.shape)
            continue
        total += counts
        clients += 1
    return ItemCounts(total, clients, replies.failures + len(replies.ok) - clients, replies.first_error)


def run_item_counts(
    grid: Grid, config: FedRecConfig, catalogue_digest: str, num_items: int, out_dir: Path, timeout: float
) -> tuple[np.ndarray, dict[str, float] | None]:
    """The run's counts: those saved in ``out_dir`` when resuming (clients release once
    per run) and the catalogue is the same, else a fresh query, saved. Returns them
    and the query's summary (None when reused)."""
    if config.federation.resume:
        saved = saved_for_resume(lambda: load_item_counts(out_dir, num_items), "item counts", out_dir)
        if saved is not None:
            return saved, None
    found = query_item_counts(grid, catalogue_digest, num_items, timeout)
    if found.clients == 0:
        raise RuntimeError(
            f"no client returned item counts (first reply: {found.first_error or 'none'}); "
            "popularity.weight > 0 needs them. If the budget refused them, the release "
            f"(popularity.noise={config.popularity.noise}) costs more than dp.target-epsilon="
            f"{config.dp.target_epsilon} allows: raise popularity.noise or set popularity.weight=0"
        )
    save_item_counts(out_dir, found.counts)
    summary = found.summary(config.popularity.noise)
    log.info(
        "Item counts from %d clients (%d failed), noise std of the sum %.1f",
        found.clients,
        found.failures,
        summary["noise_std_of_sum"],
    )
    return found.counts, summary
