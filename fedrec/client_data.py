"""What one client holds: its users' training sequences and held-out items."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.config import FedRecConfig
from fedrec.partition import cached_assignment, resolve_num_partitions
from fedrec.prepare import PreparedData


class PartitionError(ValueError):
    """The federation does not match the partitioning (a setting to fix is named)."""


@dataclass(frozen=True)
class ClientData:
    """The users of one partition and their chronological training items."""

    partition_id: int
    users: np.ndarray
    sequences: list[np.ndarray]
    unlisted: frozenset[int] = frozenset()
    """Items not in the catalogue while training (never drawn as negatives):
    ``eval.cold-items-join = "after-training"`` in a simulation, none on a device."""

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))


def num_partitions_for(config: FedRecConfig, prepared: PreparedData, num_supernodes: int) -> int:
    """Partitions of this run, checked against the federation's supernode count."""
    n = resolve_num_partitions(config.partition, prepared.num_users, num_supernodes)
    if n != num_supernodes:
        raise PartitionError(
            f"partition.scheme={config.partition.scheme} makes {n} clients but the federation "
            f"has {num_supernodes} supernodes; run with --federation-config "
            f"\"num-supernodes={n}\" (or set partition.num-partitions / data.max-users)"
        )
    return n


def partition_users(config: FedRecConfig, prepared: PreparedData, num_partitions: int) -> np.ndarray:
    """Partition id of every user (cached on disk)."""
    counts = prepared.users["num_train"].to_numpy()
    return cached_assignment(
        prepared.root, config.partition, counts, num_partitions, config.federation.seed
    )


def load_client_data(
    config: FedRecConfig, prepared: PreparedData, partition_id: int, num_partitions: int
) -> ClientData:
    """Read only this partition's users' rows from the prepared dataset."""
    num_partitions_for(config, prepared, num_partitions)
    if not 0 <= partition_id < num_partitions:
        raise PartitionError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    assignment = partition_users(config, prepared, num_partitions)
    users = np.flatnonzero(assignment == partition_id)
    unlisted = prepared.unlisted_in_training(config.eval)
    sequences = prepared.train_items_of(users)
    if config.train.include_valid_item:
        valid = prepared.holdout("valid")["item_idx"].to_numpy()
        sequences = [np.append(items, valid[u]) for u, items in zip(users, sequences)]
    return ClientData(partition_id, users, sequences, unlisted)
