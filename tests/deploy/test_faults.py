"""Failures in a real deployment: broken devices, a device killed mid-round, a SuperLink restart.

Every process is real (SuperLink with TLS and node authentication, one SuperNode
process per device, ``flwr run``) and on 127.0.0.1; each wait is bounded and the
``deployment`` fixture stops every process it started.
"""

import shutil
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedrec.checkpoint import latest_checkpoint
from fedrec.deploy.device_state import load_last_round
from tests.deploy.conftest import APP_DIR, device_node_config, read_metrics
from tests.deploy.harness import wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 480
FAULTY_APP = Path(__file__).parent / "faulty_app"


def _start_devices(deployment, device_files, tmp_path, count=3, extra=None):
    """Register and start ``count`` devices; {name: (node id, state dir)} once all are online."""
    devices = {}
    for index in range(count):
        name = f"device{index}"
        keys = deployment.node_keys(name)
        node_id = deployment.register(keys)
        state_dir = tmp_path / f"state-{name}"
        node_config = device_node_config(device_files, index, state_dir)
        node_config.update((extra or {}).get(index, {}))
        deployment.start_supernode(name, keys, node_config)
        devices[name] = (node_id, state_dir, keys, node_config)
    ids = {d[0] for d in devices.values()}
    wait_for(lambda: deployment.online() >= ids, 90, f"{count} devices to come online")
    return devices


def _faulty_app(tmp_path) -> Path:
    """fedrec's app with the test ClientApp that corrupts updates on request."""
    app = tmp_path / "faulty_app"
    shutil.copytree(FAULTY_APP, app)
    pyproject = (APP_DIR / "pyproject.toml").read_text()
    pyproject = pyproject.replace('clientapp = "clients.client_app:app"', 'clientapp = "faulty_client:app"')
    (app / "pyproject.toml").write_text(pyproject)
    return app


def _rounds_done(server_config) -> int:
    try:
        return len(read_metrics(server_config)["rounds"])
    except (FileNotFoundError, ValueError):
        return 0


def test_malformed_updates_and_invalid_data_are_rejected_and_do_not_touch_the_aggregate(
    tmp_path, deployment, server_config, device_files
):
    """Device 0 is honest; 1 sends NaN, 2 an absurd norm, 3 holds an item the catalogue lacks."""
    bad_data = tmp_path / "bad.csv"
    bad_data.write_text("item_id,timestamp\ni1,1\nno-such-item,2\ni3,3\n")
    deployment.start_superlink()
    devices = _start_devices(
        deployment, device_files, tmp_path, count=4,
        extra={1: {"fault": "nan"}, 2: {"fault": "norm"}, 3: {"data-path": str(bad_data), "user-id": ""}},
    )
    server_config["num-server-rounds"] = 1
    run = deployment.start_run(_faulty_app(tmp_path), server_config)
    assert run.wait(timeout=RUN_TIMEOUT) == 0, deployment.log_text("run")[-3000:]

    (record,) = read_metrics(server_config)["rounds"]
    assert record["clients"] == 4
    assert record["rejected_updates"] == 2  # NaN and norm
    assert record["failures"] == 3  # those two plus the error reply of the bad-data device
    log = deployment.log_text("run")
    assert "holds NaN or Inf" in log
    assert "exceeds max-update-norm" in log
    assert f"{bad_data}, line 3: item 'no-such-item' is not in the catalogue" in log
    # The aggregate is the honest device's update alone (FedAvg of one reply).
    honest, _ = load_last_round(devices["device0"][1])
    _, folder = latest_checkpoint(Path(server_config["out-dir"]))
    aggregate = load_file(str(folder / "adapter_model.safetensors"))
    assert set(honest) <= set(aggregate)
    for key, value in honest.items():
        torch.testing.assert_close(aggregate[key], value)


def test_device_killed_mid_round_the_round_completes_and_the_device_rejoins(
    tmp_path, deployment, server_config, device_files
):
    deployment.start_superlink()
    devices = _start_devices(deployment, device_files, tmp_path)
    server_config["num-server-rounds"] = 3
    run = deployment.start_run(APP_DIR, server_config)
    # Kill device 2 (and its ClientApp) once it has received round 1's instruction.
    wait_for(lambda: "Received successfully" in deployment.log_text("device2"), 180, "round 1 to reach device2")
    deployment.stop("device2", sig=signal.SIGKILL)
    wait_for(lambda: _rounds_done(server_config) >= 1, 240, "round 1 to complete without device2")
    node_id, _, keys, node_config = devices["device2"]
    deployment.start_supernode("device2-restarted", keys, node_config)  # the device reboots
    assert run.wait(timeout=RUN_TIMEOUT) == 0, deployment.log_text("run")[-3000:]

    rounds = read_metrics(server_config)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["clients"] == 3 and rounds[0]["failures"] == 1  # the lost node
    assert rounds[2]["clients"] == 3 and rounds[2]["failures"] == 0  # it is back
    assert "Received successfully" in deployment.log_text("device2-restarted")
    assert node_id in deployment.online()


def test_superlink_restarted_mid_run_resumes_from_the_last_checkpoint(
    tmp_path, deployment, server_config, device_files
):
    deployment.start_superlink()
    _start_devices(deployment, device_files, tmp_path)
    server_config["num-server-rounds"] = 3
    first = deployment.start_run(APP_DIR, server_config, name="run-before-crash")
    wait_for(lambda: _rounds_done(server_config) >= 1, 240, "round 1's checkpoint")
    before = read_metrics(server_config)["rounds"][0]
    deployment.stop("superlink", sig=signal.SIGKILL)  # with its ServerApp process
    first.wait(timeout=60)
    assert _rounds_done(server_config) < 3

    deployment.start_superlink()  # same database: registrations survive
    wait_for(lambda: len(deployment.online()) == 3, 120, "the devices to reconnect")
    server_config["resume"] = True
    run = deployment.start_run(APP_DIR, server_config, name="run-resumed")
    assert run.wait(timeout=RUN_TIMEOUT) == 0, deployment.log_text("run-resumed")[-3000:]

    rounds = read_metrics(server_config)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0] == before  # the completed round was kept, not redone
    assert "Resuming from" in deployment.log_text("run-resumed")
    assert latest_checkpoint(Path(server_config["out-dir"]))[0] == 3
