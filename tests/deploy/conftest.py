"""Fixtures of the deployment tests: toy device files, a server run config, a live deployment."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedrec.config import load_config
from fedrec.deploy.export import export_devices
from fedrec.prepare import prepare
from tests.conftest import toy_run_config
from tests.deploy.harness import Deployment

APP_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture()
def server_config(tmp_path) -> dict:
    """Run config of the ServerApp: the toy dataset (for its evaluation), device clients."""
    config = toy_run_config(tmp_path / "server")
    config.update(
        {
            "client-data": "device",
            "num-server-rounds": 2,
            "fraction-train": 1.0,
            "min-train-nodes": 2,
            "eval.max-users": 0,
            "round-timeout": 240.0,
        }
    )
    return config


@pytest.fixture()
def device_files(tmp_path, server_config) -> dict:
    """The catalogue and four users' files, exported from the server's dataset."""
    config = load_config(server_config)
    exported = export_devices(prepare(config.data, config.eval), tmp_path / "devices", max_users=4)
    return {"catalogue": exported.catalogue, "users": list(exported.user_files.items())}


def device_node_config(device_files: dict, index: int, state_dir: Path) -> dict:
    user_id, path = device_files["users"][index]
    return {
        "data-path": str(path),
        "items-path": str(device_files["catalogue"]),
        "user-id": user_id,
        "state-dir": str(state_dir),
    }


@pytest.fixture()
def deployment(tmp_path):
    deploy = Deployment(tmp_path / "deploy")
    try:
        yield deploy
    finally:
        deploy.close()
        for name in deploy.procs:  # on failure, show what each process said
            print(f"----- {name} -----\n{deploy.log_text(name)[-4000:]}")
    assert not deploy.leftovers(), f"processes left running: {deploy.leftovers()}"


def read_metrics(server_config: dict) -> dict:
    return json.loads((Path(server_config["out-dir"]) / "metrics.json").read_text())
