"""Per-round checkpoints of the global adapters, so a run can resume.

``OUT/checkpoints/round-0007/`` holds the adapters in PEFT ``save_pretrained``
format (loadable with ``PeftModel.from_pretrained``). A checkpoint folder is
written under a temporary name and renamed when complete; ``latest_checkpoint``
ignores anything incomplete.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from peft import PeftModel

from fedrec.model.adapters import save_adapter

_PATTERN = re.compile(r"^round-(\d{4,})$")


def checkpoint_dir(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round-{server_round:04d}"


def save_checkpoint(model: PeftModel, out_dir: Path, server_round: int, keep: int = 3) -> Path:
    """Save the adapters of ``server_round``; keep only the newest ``keep`` rounds."""
    final = checkpoint_dir(out_dir, server_round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp)
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
