"""The bundled presets are valid configurations and say what their comments claim."""

import pytest

from fedrec.partition import resolve_num_partitions
from simulations.runner import preset_names, resolve_settings


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_is_a_valid_configuration(name, tmp_path):
    config, federation = resolve_settings(name, {}, tmp_path)
    assert config.federation.num_server_rounds >= 1
    assert float(federation.get("client-resources-num-cpus", 1)) > 0


def test_private_groups_preset_trains_every_group_every_round(tmp_path):
    """The DP plan assumes a client trains in every round; with the group preset that
    is what happens, so each group spends its whole epsilon and no less."""
    config, _ = resolve_settings("private-groups", {}, tmp_path)
    assert config.dp.enabled and config.dp.target_epsilon == 8.0
    assert config.partition.scheme == "grouped"
    groups = resolve_num_partitions(config.partition, num_users=943, num_supernodes=0)
    assert config.federation.fraction_train == 1.0
    assert config.federation.min_train_nodes == groups
    assert config.popularity.enabled
