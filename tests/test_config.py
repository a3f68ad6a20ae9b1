import tomllib
from pathlib import Path

import pytest

from fedrec.config import (
    ConfigError,
    FedRecConfig,
    default_run_config,
    load_config,
    to_run_config,
)

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_setting_with_its_default():
    with (ROOT / "pyproject.toml").open("rb") as f:
        app_config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]

    def flatten(d, prefix=""):
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out

    assert flatten(app_config) == default_run_config()


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    missing = [k for k in default_run_config() if f"`{k}`" not in readme]
    assert not missing


def test_round_trip_and_overrides():
    flat = default_run_config()
    flat.update({"lora.r": 16, "train.lr": 1, "resume": "true", "lora.layers": "4,5"})
    config = load_config(flat)
    assert config.lora.r == 16
    assert config.train.lr == 1.0 and isinstance(config.train.lr, float)
    assert config.federation.resume is True
    assert config.lora.layer_list == [4, 5]
    assert load_config(to_run_config(config)) == config


def test_empty_run_config_gives_defaults():
    assert load_config({}) == FedRecConfig()


@pytest.mark.parametrize(
    "key, value, fragment",
    [
        ("lora.r", 0, "lora.r"),
        ("lora.r", "eight", "lora.r"),
        ("train.lr", -1.0, "train.lr"),
        ("partition.scheme", "galaxy", "partition.scheme"),
        ("data.tie-break", "coin", "data.tie-break"),
        ("fraction-train", 1.5, "fraction-train"),
        ("lora.layers", "a,b", "lora.layers"),
    ],
)
def test_bad_values_name_the_setting(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config({key: value})


def test_unknown_setting_is_an_error():
    with pytest.raises(ConfigError, match="lora.rank"):
        load_config({"lora.rank": 4})
