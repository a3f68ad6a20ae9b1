"""The bundled presets are valid configurations and say what their comments claim."""

import pytest

from fedrec.partition import resolve_num_partitions
from server.strategy import server_strategy
from server.user_dp import clients_per_round
from simulations.runner import preset_names, resolve_settings


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_configuration(name, tmp_path):
    config, federation = resolve_settings(name, {}, tmp_path)
    assert config.federation.num_server_rounds >= 1
    assert float(federation.get("client-resources-num-cpus", 1)) > 0


@pytest.mark.parametrize("overrides", [{}, {"partition.num-partitions": 5}, {"partition.num-partitions": 20}])
def test_private_groups_preset_trains_every_group_every_round(tmp_path, overrides):
    """The DP plan assumes a client trains in every round; with the group preset that
    is what Flower samples, so each group spends its whole epsilon and no less, and
    no group count makes the server wait for more nodes than there are."""
    config, _ = resolve_settings("private-groups", overrides, tmp_path)
    assert config.dp.enabled and config.dp.target_epsilon == 8.0
    assert config.partition.scheme == "grouped"
    assert config.popularity.enabled
    groups = resolve_num_partitions(config.partition, num_users=943, num_supernodes=0)
    assert groups == overrides.get("partition.num-partitions", 10)
    fed = config.federation
    strategy = server_strategy(
        fed.server_optimizer, fed.server_lr, fed.server_momentum,
        fraction_train=fed.fraction_train, min_train_nodes=fed.min_train_nodes,
    )
    assert clients_per_round(strategy, groups) == groups
    assert fed.min_train_nodes <= groups  # Flower's sample_nodes waits for this many
