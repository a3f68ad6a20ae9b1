"""Spreading users over clients with flwr-datasets partitioners.

Every scheme partitions *users*, never single interactions: a device holds whole
users (one person, or a household), which is also the unit of user-level DP.

* ``user``: ``NaturalIdPartitioner`` on ``user_idx``; one user per client.
* ``grouped``: ``GroupedNaturalIdPartitioner``; consecutive users grouped into
  ``num_partitions`` clients of near-equal size.
* ``iid``: ``IidPartitioner`` over the user table; users shuffled uniformly.
* ``dirichlet``: ``DirichletPartitioner`` over the user table, with the user's
  activity quartile (light ... heavy) as the label, so clients differ in how
  active their users are (label skew with concentration ``dirichlet_alpha``).

The assignment is computed once per prepared dataset and cached on disk.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from datasets import Dataset
from flwr_datasets.partitioner import (
    DirichletPartitioner,
    GroupedNaturalIdPartitioner,
    IidPartitioner,
    NaturalIdPartitioner,
    Partitioner,
)

from fedrec.config import ConfigError, PartitionConfig

USER_COLUMN = "user_idx"
ACTIVITY_COLUMN = "activity_quartile"


def resolve_num_partitions(config: PartitionConfig, num_users: int, num_supernodes: int) -> int:
    """How many clients the scheme yields for this dataset and federation."""
    if config.scheme == "user":
        return num_users
    n = config.num_partitions or num_supernodes
    if not 1 <= n <= num_users:
        raise ConfigError(
            f"setting 'partition.num-partitions': {n} clients for {num_users} users; "
            f"choose between 1 and {num_users}"
        )
    return n


def _user_table(interactions_per_user: np.ndarray) -> Dataset:
    quartiles = np.quantile(interactions_per_user, [0.25, 0.5, 0.75])
    return Dataset.from_dict(
        {
            USER_COLUMN: np.arange(len(interactions_per_user)),
            ACTIVITY_COLUMN: np.searchsorted(quartiles, interactions_per_user, side="right"),
        }
    )


def make_partitioner(config: PartitionConfig, num_users: int, num_partitions: int, seed: int) -> Partitioner:
    """The flwr-datasets partitioner for the scheme."""
    if config.scheme == "user":
        return NaturalIdPartitioner(partition_by=USER_COLUMN)
    if config.scheme == "grouped":
        return GroupedNaturalIdPartitioner(
            partition_by=USER_COLUMN, group_size=math.ceil(num_users / num_partitions)
        )
    if config.scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by=ACTIVITY_COLUMN,
        alpha=config.dirichlet_alpha,
        min_partition_size=1,
        self_balancing=False,
        seed=seed,
    )


def assign_users(
    config: PartitionConfig, interactions_per_user: np.ndarray, num_partitions: int, seed: int
) -> np.ndarray:
    """Partition id of every user, shape [num_users]; each partition is non-empty."""
    num_users = len(interactions_per_user)
    partitioner = make_partitioner(config, num_users, num_partitions, seed)
    partitioner.dataset = _user_table(interactions_per_user)
    assignment = np.full(num_users, -1, dtype=np.int64)
    for pid in range(partitioner.num_partitions):
        users = np.asarray(partitioner.load_partition(pid)[USER_COLUMN], dtype=np.int64)
        assignment[users] = pid
    if partitioner.num_partitions != num_partitions or (assignment < 0).any():
        raise ConfigError(
            f"setting 'partition.scheme={config.scheme}': made {partitioner.num_partitions} "
            f"partitions for {num_partitions} clients, {(assignment < 0).sum()} users unassigned"
        )
    return assignment


def partition_file(root: Path, config: PartitionConfig, num_partitions: int, seed: int) -> Path:
    """Where the assignment for these settings is cached."""
    alpha = f"-a{config.dirichlet_alpha:g}" if config.scheme == "dirichlet" else ""
    return root / f"partition-{config.scheme}-{num_partitions}{alpha}-s{seed}.npy"


def cached_assignment(
    root: Path, config: PartitionConfig, interactions_per_user: np.ndarray, num_partitions: int, seed: int
) -> np.ndarray:
    """Load the user->partition assignment, computing and caching it on first use."""
    path = partition_file(root, config, num_partitions, seed)
    if path.exists():
        return np.load(path)
    assignment = assign_users(config, interactions_per_user, num_partitions, seed)
    # Several client actors may compute it at once (the first round of a simulation):
    # each writes its own file, and the atomic rename makes one of them the cache.
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, assignment)
    tmp.replace(path)
    return assignment
