"""A real SuperLink (TLS, SuperNode authentication) and three real SuperNodes train 2 rounds.

Two intruders try to join: one whose key was never registered and one that
trusts another CA. Both are refused; the run completes with the three devices.
"""

import pytest

from fedrec.deploy.credentials import generate_tls
from fedrec.deploy.device_state import load_last_round
from tests.deploy.conftest import APP_DIR, device_node_config, read_metrics
from tests.deploy.harness import wait_for

pytestmark = pytest.mark.slow

RUN_TIMEOUT = 420  # seconds; the run takes about a minute on 2 cores


def test_tls_authenticated_devices_train_and_intruders_are_refused(
    tmp_path, deployment, server_config, device_files
):
    deployment.start_superlink()
    devices = {}
    for index in range(3):
        keys = deployment.node_keys(f"device{index}")
        node_id = deployment.register(keys)
        state_dir = tmp_path / f"state{index}"
        deployment.start_supernode(
            f"device{index}", keys, device_node_config(device_files, index, state_dir)
        )
        devices[node_id] = state_dir
    unregistered = deployment.start_supernode(
        "unregistered", deployment.node_keys("intruder"),
        device_node_config(device_files, 0, tmp_path / "intruder"), max_retries=1,
    )
    other_ca = generate_tls(tmp_path / "other-ca", ["127.0.0.1"])
    wrong_ca_keys = deployment.node_keys("wrong-ca")
    deployment.register(wrong_ca_keys)  # registered, but it does not trust our CA
    wrong_ca = deployment.start_supernode(
        "wrong-ca", wrong_ca_keys, device_node_config(device_files, 1, tmp_path / "wrong"),
        ca_cert=other_ca.ca_cert, max_retries=1,
    )
    wait_for(lambda: deployment.online() >= set(devices), 90, "the 3 devices to come online")

    run = deployment.start_run(APP_DIR, server_config)
    assert run.wait(timeout=RUN_TIMEOUT) == 0, deployment.log_text("run")[-3000:]

    # Both intruders gave up without ever being online.
    assert unregistered.wait(timeout=60) != 0
    assert wrong_ca.wait(timeout=60) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in deployment.log_text("wrong-ca")
    assert "Failed to activate SuperNode" in deployment.log_text("unregistered")
    assert deployment.online() == set(devices)

    metrics = read_metrics(server_config)
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for record in metrics["rounds"]:
        assert record["clients"] == 3
        assert record["failures"] == 0
        assert record["train_loss"] > 0
        assert 0 <= record["hr@10"] <= 1
    for state_dir in devices.values():  # each device kept its last adapters and round
        adapters, info = load_last_round(state_dir)
        assert info["server_round"] == 2
        assert adapters and all(t.isfinite().all() for t in adapters.values())
