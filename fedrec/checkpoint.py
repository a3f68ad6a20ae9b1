"""Per-round checkpoints of the global adapters, so a run can resume.

``OUT/checkpoints/round-0007/`` holds the adapters in PEFT ``save_pretrained``
format (loadable with ``PeftModel.from_pretrained``), and beside them the
server optimizer's state (``server_optimizer.safetensors``: FedAdam's moments,
FedAvgM's momentum) when the server keeps one. A checkpoint folder is written
under a temporary name and renamed when complete, so adapters and server state
always belong to the same round; ``latest_checkpoint`` ignores anything
incomplete.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from peft import PeftModel

from fedrec.model.adapters import save_adapter

_PATTERN = re.compile(r"^round-(\d{4,})$")

SERVER_STATE_FILE = "server_optimizer.safetensors"


def checkpoint_dir(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round-{server_round:04d}"


def save_checkpoint(
    model: PeftModel,
    out_dir: Path,
    server_round: int,
    keep: int = 3,
    server_state: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Save the adapters of ``server_round`` (and the server optimizer's state, if
    any); keep only the newest ``keep`` rounds."""
    from safetensors.numpy import save_file

    final = checkpoint_dir(out_dir, server_round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
    if server_state:
        save_file({k: np.ascontiguousarray(v) for k, v in server_state.items()}, str(tmp / SERVER_STATE_FILE))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    rounds = sorted(r for r, _ in _checkpoints(out_dir))
    for old in rounds[:-keep] if keep else []:
        shutil.rmtree(checkpoint_dir(out_dir, old), ignore_errors=True)
    return final


def _checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _PATTERN.match(child.name)
        if match and (child / "adapter_model.safetensors").exists():
            found.append((int(match.group(1)), child))
    return found


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """(round, folder) of the newest complete checkpoint, or None."""
    found = _checkpoints(out_dir)
    return max(found) if found else None


def load_server_state(folder: Path) -> dict[str, np.ndarray] | None:
    """The server optimizer's state saved with a checkpoint, or None if it has none
    (a stateless server optimizer, or a checkpoint written before fedrec saved it)."""
    from safetensors.numpy import load_file

    path = Path(folder) / SERVER_STATE_FILE
    return load_file(str(path)) if path.exists() else None
