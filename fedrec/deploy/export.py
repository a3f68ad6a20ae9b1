"""Write a dataset out as device files, to rehearse a deployment on one machine.

``fedrec deploy export`` prepares the run's dataset as the server does, then
writes the item catalogue (``catalogue.csv``) and one interactions file per user
(``devices/<user_id>.csv``: that user's *training* interactions, in order; the
held-out items stay with the server, which evaluates on them). Each SuperNode is
then pointed at one user file and the catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrec.deploy.device_data import load_catalogue
from fedrec.prepare import PreparedData

CATALOGUE_FILE = "catalogue.csv"
DEVICES_DIR = "devices"


@dataclass(frozen=True)
class ExportedDevices:
    """Where the catalogue and the per-user files went."""

    catalogue: Path
    user_files: dict[str, Path]
    catalogue_digest: str


def export_devices(prepared: PreparedData, out_dir: Path, max_users: int = 0) -> ExportedDevices:
    """Write ``catalogue.csv`` and ``devices/<user_id>.csv`` for the first ``max_users`` users (0: all)."""
    out_dir = Path(out_dir)
    (out_dir / DEVICES_DIR).mkdir(parents=True, exist_ok=True)
    catalogue = out_dir / CATALOGUE_FILE
    prepared.items[["item_id", "title", "text"]].to_csv(catalogue, index=False)
    written = load_catalogue.__wrapped__(str(catalogue))
    if written.digest != prepared.catalogue_digest:
        raise ValueError(
            f"{catalogue}: the catalogue does not read back as the server's "
            f"({written.digest} != {prepared.catalogue_digest}); report this as a bug"
        )
    users = prepared.users if not max_users else prepared.users.head(max_users)
    item_ids = prepared.items["item_id"].to_numpy()
    files: dict[str, Path] = {}
    for user_idx, user_id, items in zip(
        users["user_idx"], users["user_id"], prepared.train_items_of(users["user_idx"].to_numpy())
    ):
        path = out_dir / DEVICES_DIR / f"{user_id}.csv"
        pd.DataFrame(
            {
                "user_id": str(user_id),
                "item_id": item_ids[items],
                # Only the order is kept: the position stands in for the time.
                "timestamp": range(len(items)),
            }
        ).to_csv(path, index=False)
        files[str(user_id)] = path
    return ExportedDevices(catalogue, files, prepared.catalogue_digest)
