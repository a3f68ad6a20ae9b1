import numpy as np
import pytest

from fedrec.config import ConfigError, PartitionConfig
from fedrec.partition import assign_users, cached_assignment, resolve_num_partitions

COUNTS = np.array([5, 50, 7, 120, 9, 30, 11, 300, 6, 14, 8, 40])


def test_user_scheme_gives_one_user_per_client():
    assignment = assign_users(PartitionConfig(scheme="user"), COUNTS, 12, seed=0)
    assert sorted(assignment.tolist()) == list(range(12))


@pytest.mark.parametrize("scheme", ["grouped", "iid", "dirichlet"])
def test_every_user_in_exactly_one_nonempty_partition(scheme):
    config = PartitionConfig(scheme=scheme, dirichlet_alpha=0.3)
    assignment = assign_users(config, COUNTS, 4, seed=1)
    assert assignment.shape == (12,) and assignment.min() == 0 and assignment.max() == 3
    assert np.bincount(assignment, minlength=4).min() > 0


def test_grouped_keeps_consecutive_users_together():
    assignment = assign_users(PartitionConfig(scheme="grouped"), COUNTS, 3, seed=0)
    assert np.bincount(assignment).tolist() == [4, 4, 4]
    assert len(set(assignment[:4])) == 1


def test_assignment_is_seeded_and_cached(tmp_path):
    config = PartitionConfig(scheme="iid")
    a = cached_assignment(tmp_path, config, COUNTS, 3, seed=5)
    assert list(tmp_path.glob("partition-iid-3-s5.npy"))
    np.testing.assert_array_equal(a, cached_assignment(tmp_path, config, COUNTS, 3, seed=5))


def test_num_partitions_is_checked():
    assert resolve_num_partitions(PartitionConfig(scheme="user"), 943, 10) == 943
    assert resolve_num_partitions(PartitionConfig(scheme="iid"), 943, 10) == 10
    with pytest.raises(ConfigError, match="partition.num-partitions"):
        resolve_num_partitions(PartitionConfig(scheme="iid", num_partitions=2000), 943, 10)
