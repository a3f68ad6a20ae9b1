"""A device's own files: read, validated with errors that name the file and row, indexed like the server."""

import json

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import train
from fedrec import records
from fedrec.config import load_config
from fedrec.deploy.credentials import generate_node_keys, generate_tls
from fedrec.deploy.device_data import (
    DeviceDataError,
    check_catalogue,
    load_catalogue,
    load_device_data,
)
from fedrec.deploy.device_state import load_last_round, save_last_round
from fedrec.deploy.export import export_devices
from fedrec.model.adapters import adapter_state
from fedrec.model.build import build_recommender
from fedrec.prepare import prepare
from tests.conftest import toy_run_config


@pytest.fixture()
def exported(tmp_path):
    config = load_config(toy_run_config(tmp_path))
    prepared = prepare(config.data, config.eval)
    return config, prepared, export_devices(prepared, tmp_path / "export", max_users=2)


def _node(exported, **extra):
    _, _, files = exported
    user_id, path = next(iter(files.user_files.items()))
    return {"data-path": str(path), "items-path": str(files.catalogue), "user-id": user_id, **extra}


def test_exported_device_file_gives_the_same_sequence_as_the_servers_partition(exported):
    config, prepared, _ = exported
    device = load_device_data(config, _node(exported))
    assert device.catalogue.digest == prepared.catalogue_digest
    (sequence,) = device.client.sequences
    np.testing.assert_array_equal(sequence, prepared.train_items_of(np.array([0]))[0])


def test_household_file_and_json_lines_are_read(exported, tmp_path):
    config, _, files = exported
    rows = [
        {"user_id": "a", "item_id": "i1", "timestamp": 1},
        {"user_id": "a", "item_id": "i2", "timestamp": 2},
        {"user_id": "b", "item_id": "i3", "timestamp": 5},
        {"user_id": "b", "item_id": "i4", "timestamp": 3},
    ]
    path = tmp_path / "household.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    device = load_device_data(config, {"data-path": str(path), "items-path": str(files.catalogue)})
    index = device.catalogue.index_of()
    assert [s.tolist() for s in device.client.sequences] == [
        [index["i1"], index["i2"]],
        [index["i4"], index["i3"]],  # time order, not file order
    ]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("item,timestamp\ni1,1\n", r"missing required column\(s\) \['item_id'\]"),
        ("item_id,timestamp\ni1,1\nnope,2\n", "line 3: item 'nope' is not in the catalogue"),
        ("item_id,timestamp\ni1,1\n", "empty history"),
        ("item_id,timestamp\ni1,1\ni2,yesterday\n", "line 3"),
    ],
)
def test_bad_device_data_names_file_and_row(exported, tmp_path, content, message):
    config, _, files = exported
    path = tmp_path / "mine.csv"
    path.write_text(content)
    with pytest.raises(DeviceDataError, match=message) as caught:
        load_device_data(config, {"data-path": str(path), "items-path": str(files.catalogue)})
    assert str(path) in str(caught.value)


def test_missing_node_setting_and_unknown_user_are_explained(exported):
    config, _, files = exported
    with pytest.raises(DeviceDataError, match="--node-config \"data-path="):
        load_device_data(config, {"items-path": str(files.catalogue)})
    with pytest.raises(DeviceDataError, match="no rows for user-id 'ghost'"):
        load_device_data(config, _node(exported, **{"user-id": "ghost"}))


def test_a_different_catalogue_is_refused(exported):
    _, _, files = exported
    catalogue = load_catalogue(str(files.catalogue))
    check_catalogue(catalogue, catalogue.digest, "c.csv")
    check_catalogue(catalogue, None, "c.csv")  # a server that sends none (SecAgg+ workflow)
    with pytest.raises(DeviceDataError, match="differs from the server's"):
        check_catalogue(catalogue, "0000000000000000", "c.csv")


def _train_message(adapters, digest: str) -> Message:
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord(adapters),
            records.CONFIG: ConfigRecord({records.SERVER_ROUND: 1, records.CATALOGUE_DIGEST: digest}),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def _context(run_config, node_config) -> Context:
    return Context(run_id=7, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)


def test_client_app_trains_on_device_files_and_keeps_its_state(exported, tmp_path, task_identity):
    config, prepared, _ = exported
    run_config = {**toy_run_config(tmp_path), "client-data": "device"}
    adapters = adapter_state(build_recommender(config.model, config.lora).encoder)
    state_dir = tmp_path / "device-state"
    reply = train(
        _train_message(adapters, prepared.catalogue_digest),
        _context(run_config, _node(exported, **{"state-dir": str(state_dir)})),
    )
    assert not reply.has_error(), reply.error
    sent = reply.content[records.ARRAYS].to_torch_state_dict()
    kept, info = load_last_round(state_dir)
    assert info == {"server_round": 1, "run_id": 7}
    assert all(kept[k].equal(v) for k, v in sent.items())
    assert any(not sent[k].equal(v) for k, v in adapters.items())  # it trained


def test_client_app_replies_with_the_reason_instead_of_crashing(exported, tmp_path, task_identity):
    config, _, _ = exported
    run_config = {**toy_run_config(tmp_path), "client-data": "device"}
    adapters = adapter_state(build_recommender(config.model, config.lora).encoder)
    reply = train(_train_message(adapters, "ffffffffffffffff"), _context(run_config, _node(exported)))
    assert reply.has_error()
    assert reply.error.code == records.DEVICE_DATA_INVALID
    assert "catalogue fingerprint" in reply.error.reason


def test_last_round_state_is_replaced_atomically(tmp_path):
    import torch

    save_last_round(tmp_path, {"a": torch.ones(2)}, 3, 1)
    save_last_round(tmp_path, {"a": torch.zeros(2)}, 4, 1)
    adapters, info = load_last_round(tmp_path)
    assert info["server_round"] == 4 and adapters["a"].sum() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last-adapters.pt", "last-round.json"]


def test_credentials_are_valid_and_private_keys_are_owner_only(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    tls = generate_tls(tmp_path, ["127.0.0.1", "superlink.example"])
    cert = x509.load_pem_x509_certificate(tls.server_cert.read_bytes())
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink.example" in names.get_values_for_type(x509.DNSName)
    keys = generate_node_keys(tmp_path, "phone")
    load_ssh_public_key(keys.public_key.read_bytes())
    for secret in (tls.ca_key, tls.server_key, keys.private_key):
        assert secret.stat().st_mode & 0o077 == 0
