"""What a deployed device trains on: its own interactions file and the item catalogue.

A SuperNode on a device points at local files through its node config::

    flower-supernode ... --node-config "data-path='/data/me.csv' items-path='/data/catalogue.csv' state-dir='/var/lib/fedrec'"

* ``data-path``: the device's interactions, CSV/TSV/JSON lines/Parquet with columns
  ``item_id``, ``timestamp`` and optionally ``rating`` and ``user_id``;
* ``user-id`` (optional): keep only this user's rows (a household file holds several);
* ``items-path``: the item catalogue (``item_id``, ``text``, optional ``title``),
  the same one the server uses: items are indexed in catalogue order, and the
  server's catalogue fingerprint is checked before training;
* ``state-dir``: where the device keeps what must survive a restart (the privacy
  accountant, the last adapters and round, the tokenized catalogue).

Everything the device trains on is its own data: all of its interactions, in time
order, become next-item examples; nothing is held out (evaluation is the
server's job, on its own data, or the clients' with ``fraction-evaluate``).
"""

from __future__ import annotations

import functools
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedrec.client_data import ClientData
from fedrec.config import FedRecConfig
from fedrec.data.interactions import DataError
from fedrec.data.tabular import items_from_table, read_any_table
from fedrec.data.validation import Table, parse_interactions, require_columns
from fedrec.model.build import stored_token_table, token_settings_key
from fedrec.prepare import catalogue_digest, order_catalogue
from fedrec.split import implicit_feedback
from fedrec.tokens import TokenTable

log = logging.getLogger(__name__)

DATA_PATH = "data-path"
ITEMS_PATH = "items-path"
USER_ID = "user-id"
STATE_DIR = "state-dir"
PARTITION_ID = "partition-id"


class DeviceDataError(DataError):
    """The device's data cannot be trained on; the message names the file and row."""


@dataclass(frozen=True)
class Catalogue:
    """The item catalogue in index order, and its fingerprint."""

    items: pd.DataFrame
    digest: str

    def index_of(self) -> dict[str, int]:
        return dict(zip(self.items["item_id"], self.items["item_idx"]))


@dataclass(frozen=True)
class DeviceData:
    """A device's training sequences, in the same form a simulated client has."""

    client: ClientData
    catalogue: Catalogue


def node_setting(node_config: dict, key: str) -> str:
    """A required node-config value, or a DeviceDataError naming the flag to set."""
    value = str(node_config.get(key, "") or "").strip()
    if not value:
        raise DeviceDataError(
            f"node config has no '{key}': start the SuperNode with "
            f"--node-config \"{key}='...'\" (see docs/deploy.md)"
        )
    return value


@functools.lru_cache(maxsize=2)
def load_catalogue(path: str) -> Catalogue:
    """Read and index the catalogue file once per process."""
    items = order_catalogue(items_from_table(read_any_table(Path(path).expanduser())))
    return Catalogue(items, catalogue_digest(items))


def _interactions(table: Table, user_id: str | None) -> pd.DataFrame:
    """The typed interactions of the device's user(s)."""
    require_columns(table, ["item_id", "timestamp"])
    if "user_id" not in table.frame.columns:
        table = Table(table.path, table.frame.assign(user_id=user_id or "device"), table.unit)
    rating = "rating" if "rating" in table.frame.columns else None
    frame = parse_interactions(table, rating=rating)
    frame.index = table.frame.index  # keep file locations for errors below
    if user_id is not None:
        frame = frame[frame["user_id"] == user_id]
        if frame.empty:
            raise DeviceDataError(
                f"{table.path}: no rows for user-id {user_id!r}; check the node config "
                "'user-id' or the file's user_id column"
            )
    return frame


def load_device_data(config: FedRecConfig, node_config: dict) -> DeviceData:
    """The device's users' chronological training items, indexed by the catalogue.

    Raises DeviceDataError (file and row named) for a missing or unreadable file,
    missing columns, items not in the catalogue, or a history too short to train on.
    """
    data_path = Path(node_setting(node_config, DATA_PATH)).expanduser()
    catalogue = load_catalogue(node_setting(node_config, ITEMS_PATH))
    user_id = str(node_config[USER_ID]) if node_config.get(USER_ID) else None
    try:
        table = read_any_table(data_path)
        frame = _interactions(table, user_id)
    except DeviceDataError:
        raise
    except DataError as err:
        raise DeviceDataError(str(err)) from err
    index = catalogue.index_of()
    unknown = ~frame["item_id"].isin(index)
    if unknown.any():
        location = frame.index[unknown.to_numpy().argmax()]
        raise DeviceDataError(
            f"{table.where(int(location))}: item {frame.loc[location, 'item_id']!r} is not in the "
            f"catalogue {node_config[ITEMS_PATH]} ({int(unknown.sum())} rows with unknown items); "
            "update the catalogue or drop those rows"
        )
    frame = implicit_feedback(frame.reset_index(drop=True), config.data.min_rating or None)
    frame = frame.assign(item_idx=frame["item_id"].map(index))
    frame = frame.sort_values(["user_id", "timestamp"], kind="stable")
    users = sorted(frame["user_id"].unique())
    sequences = [
        frame.loc[frame["user_id"] == u, "item_idx"].to_numpy(dtype=np.int64) for u in users
    ]
    if not any(len(s) >= 2 for s in sequences):
        raise DeviceDataError(
            f"{data_path}: empty history: no user has 2 or more interactions"
            + (f" with rating >= {config.data.min_rating}" if config.data.min_rating else "")
            + "; a next-item example needs at least one earlier item"
        )
    client = ClientData(device_partition_id(node_config), np.arange(len(users)), sequences)
    log.info("%s: %d users, %d interactions", data_path, len(users), client.num_interactions)
    return DeviceData(client, catalogue)


def device_partition_id(node_config: dict) -> int:
    """The device's id in seeds and state files: ``partition-id`` if set, else from its user."""
    if PARTITION_ID in node_config:
        return int(node_config[PARTITION_ID])
    key = str(node_config.get(USER_ID) or node_config.get(DATA_PATH, ""))
    return zlib.crc32(key.encode()) % 2**31


def device_token_table(catalogue: Catalogue, config: FedRecConfig, state_dir: Path) -> TokenTable:
    """The catalogue tokenized once and kept in the device's state folder."""
    path = state_dir / f"tokens-{catalogue.digest}-{token_settings_key(config.model)}.npz"
    return stored_token_table(path, catalogue.items, config.model)


DEFAULT_STATE_DIR = "~/.local/state/fedrec"


def device_state_dir(node_config: dict) -> Path:
    """The device's state folder: node config ``state-dir``, else ~/.local/state/fedrec."""
    return Path(str(node_config.get(STATE_DIR) or DEFAULT_STATE_DIR)).expanduser()


def check_catalogue(catalogue: Catalogue, server_digest: str | None, path: str) -> None:
    """Refuse to train when the server indexes a different catalogue than the device."""
    if server_digest and server_digest != catalogue.digest:
        raise DeviceDataError(
            f"{path}: catalogue fingerprint {catalogue.digest} differs from the server's "
            f"{server_digest} (other items, order or text); install the run's catalogue "
            "(fedrec deploy export writes it) and point items-path at it"
        )
