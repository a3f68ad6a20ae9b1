"""What a device keeps between rounds and across restarts, besides its accountant.

After each round it trained in, a device writes the adapters it sent and the
round number into its state folder (atomically: a crash leaves the previous
pair intact). They let a device serve recommendations from its latest model
while offline, and show which round it last took part in after a reboot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

LAST_ADAPTERS = "last-adapters.pt"
LAST_ROUND = "last-round.json"


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and move the result onto ``path`` (a crash leaves the old file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def save_last_round(
    state_dir: Path, adapters: dict[str, torch.Tensor], server_round: int, run_id: int
) -> None:
    """Keep the adapters this device sent in ``server_round`` of run ``run_id``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(state_dir / LAST_ADAPTERS, lambda p: torch.save(dict(adapters), p))
    atomic_write(
        state_dir / LAST_ROUND,
        lambda p: p.write_text(json.dumps({"server_round": server_round, "run_id": run_id})),
    )


def load_last_round(state_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(adapters, {"server_round", "run_id"}) of the last round trained, or None."""
    if not (state_dir / LAST_ROUND).exists():
        return None
    info = json.loads((state_dir / LAST_ROUND).read_text())
    return torch.load(state_dir / LAST_ADAPTERS, weights_only=True), info
