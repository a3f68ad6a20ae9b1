"""metrics.json: the settings of a run and what each round measured.

Schema (documented in README.md)::

    {
      "settings": {<every run-config key>: value},
      "dataset": {"name": ..., "num_users": ..., "num_items": ..., "num_train": ...},
      "model": {"adapter_bytes": ..., "model_bytes": ..., "trainable_params": ...},
      "baselines": {"popularity": {<metric>: value, ...}},
      "rounds": [{"round": 1, "train_loss": ..., "hr@10": ..., "ndcg@10": ...,
                  "hr@10_full": ..., "ndcg@10_full": ..., "bytes_up_per_client": ...,
                  "bytes_down_per_client": ..., "clients": ..., "seconds": ...}, ...]
    }

Written atomically after every round, so a crash never leaves a torn file and a
resumed run appends to the rounds it already has.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.tracking import write_rounds_csv

METRICS_FILE = "metrics.json"


@dataclass
class RunRecord:
    """Everything metrics.json holds, updated as the run goes."""

    settings: dict[str, Any]
    dataset: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    rounds: list[dict[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "dataset": self.dataset,
            "model": self.model,
            "baselines": self.baselines,
            "rounds": self.rounds,
        }

    def add_round(self, values: dict[str, float]) -> None:
        """Add (or replace, when resuming) the record of one round."""
        self.rounds = [r for r in self.rounds if r["round"] != values["round"]] + [values]
        self.rounds.sort(key=lambda r: r["round"])

    def write(self, out_dir: Path) -> Path:
        """Atomically write ``out_dir/metrics.json`` (and its rounds as ``metrics.csv``)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / METRICS_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2))
        tmp.replace(path)
        write_rounds_csv(self.rounds, out_dir)
        return path


def read_record(out_dir: Path) -> RunRecord | None:
    """The record of an earlier run in ``out_dir``, if any."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return RunRecord(
        settings=data["settings"],
        dataset=data.get("dataset", {}),
        model=data.get("model", {}),
        baselines=data.get("baselines", {}),
        rounds=data.get("rounds", []),
    )
