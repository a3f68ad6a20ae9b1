"""Per-round metrics for experiment trackers: a CSV table and TensorBoard events.

``OUT/metrics.csv`` (one row per round, every scalar of metrics.json's rounds)
is rewritten with metrics.json after each round; ``OUT/tensorboard/`` receives
each round's scalars as it is recorded, so ``tensorboard --logdir OUT`` shows a
run while it trains (metric names with ``@`` are written with ``_at_``).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

CSV_FILE = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"


def scalars(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a round's record (per-client dicts left out)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, Real) and not isinstance(v, bool)}


def write_rounds_csv(rounds: Sequence[Mapping[str, Any]], out_dir: Path) -> Path:
    """Atomically write ``out_dir/metrics.csv``: ``round`` first, then every scalar column."""
    rows = [scalars(r) for r in rounds]
    columns = sorted({k for row in rows for k in row} - {"round"})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["round", *columns], restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "round": int(row.get("round", 0))})
    path = Path(out_dir) / CSV_FILE
    tmp = path.with_suffix(".csv.tmp")
    tmp.write_text(buffer.getvalue())
    tmp.replace(path)
    return path


def tensorboard_tag(name: str) -> str:
    """A TensorBoard-safe tag for a metric name (``hr@10_full`` -> ``hr_at_10_full``)."""
    return name.replace("@", "_at_")


class TensorBoardLog:
    """Writes each round's scalars to ``out_dir/tensorboard`` (TensorBoard event files)."""

    def __init__(self, out_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / TENSORBOARD_DIR))

    def log_round(self, values: Mapping[str, Any]) -> None:
        step = int(values["round"])
        for name, value in scalars(values).items():
            if name != "round":
                self.writer.add_scalar(tensorboard_tag(name), value, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
