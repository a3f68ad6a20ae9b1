"""FedSA-LoRA (``lora.local-b``): lora_A travels and is averaged, each client keeps its lora_B."""

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from clients.client_app import evaluate, train
from clients.local_adapters import load_local_adapters
from fedrec import records
from fedrec.config import ConfigError, load_config
from fedrec.global_model import GlobalModel
from fedrec.model.adapters import local_adapter_state
from fedrec.model.build import cached_recommender
from fedrec.prepare import prepare
from tests.conftest import toy_run_config

PARTITIONS = 4
GROUPS = {"partition.scheme": "grouped", "partition.num-partitions": PARTITIONS}


@pytest.fixture()
def fedsa(tmp_path, task_identity):
    # item identities on, as in the private-groups preset: PEFT then also has a modules_to_save table
    fedsa_settings = {"lora.local-b": True, "fraction-evaluate": 1.0, "model.item-ids": True, **GROUPS}
    run_config = toy_run_config(tmp_path, **fedsa_settings)
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    return run_config, config, prepared, GlobalModel(config, prepared).adapters()


def node(run_config, partition):
    return Context(
        run_id=7,
        node_id=partition + 1,
        node_config={"partition-id": partition, "num-partitions": PARTITIONS},
        state=RecordDict(),
        run_config=run_config,
    )


def message(kind, adapters, server_round=1):
    config = ConfigRecord({records.SERVER_ROUND: server_round})
    content = RecordDict({records.ARRAYS: ArrayRecord(adapters), records.CONFIG: config})
    return Message(content, dst_node_id=1, message_type=kind)


def sent(reply):
    assert not reply.has_error(), reply.error
    return reply.content[records.ARRAYS].to_torch_state_dict()


def kept(context):
    return context.state.array_records[records.LOCAL_ADAPTERS].to_torch_state_dict()


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_only_lora_a_is_sent_and_the_server_model_has_no_b_to_send(fedsa):
    run_config, _, _, global_adapters = fedsa
    assert any("lora_A" in k for k in global_adapters)
    assert not any("lora_B" in k for k in global_adapters)

    context = node(run_config, 0)
    reply = sent(train(message("train", global_adapters), context))
    assert reply.keys() == global_adapters.keys()  # nothing else leaves the client
    own_b = kept(context)
    assert own_b and all("lora_B" in k for k in own_b)
    assert all(v.abs().sum() > 0 for v in own_b.values())  # trained away from PEFT's zeros
    assert any(not torch.equal(reply[k], global_adapters[k]) for k in reply)  # A was trained too


def test_each_client_starts_from_its_own_b_not_the_last_clients(fedsa):
    """One model object serves every client of a process: a client's first round must
    start from lora_B = 0 whoever trained before it, and its later rounds from its own."""
    run_config, _, _, global_adapters = fedsa
    first = node(run_config, 1)
    train(message("train", global_adapters), first)
    other = node(run_config, 0)
    train(message("train", global_adapters), other)
    again = node(run_config, 1)  # partition 1's first round again, after partition 0 trained
    train(message("train", global_adapters), again)
    assert_same(kept(first), kept(again))

    # round 2: continuing from the kept lora_B differs from starting afresh
    round_two = sent(train(message("train", global_adapters, 2), first))
    afresh = sent(train(message("train", global_adapters, 2), node(run_config, 1)))
    assert any(not torch.equal(round_two[k], afresh[k]) for k in round_two)


def test_evaluation_uses_the_clients_own_b(fedsa):
    run_config, config, prepared, global_adapters = fedsa
    context = node(run_config, 2)
    train(message("train", global_adapters), context)
    model = cached_recommender(config.model, config.lora, prepared.num_items)

    reply = evaluate(message("evaluate", global_adapters), context)
    assert not reply.has_error() and 0 <= reply.content[records.METRICS]["hr@10"] <= 1
    assert_same(local_adapter_state(model.encoder), kept(context))

    evaluate(message("evaluate", global_adapters), node(run_config, 3))  # never trained: lora_B = 0
    assert all(v.abs().sum() == 0 for v in local_adapter_state(model.encoder).values())


def test_a_resumed_run_continues_from_the_b_each_client_kept(fedsa, tmp_path):
    run_config, config, _, global_adapters = fedsa
    context = node(run_config, 1)
    train(message("train", global_adapters), context)
    assert (tmp_path / "out" / "client-state" / "local-adapters-1.pt").exists()

    restarted = node({**run_config, "resume": True}, 1)  # empty in-memory state
    assert_same(load_local_adapters(restarted, load_config(restarted.run_config), 1), kept(context))
    assert load_local_adapters(node(run_config, 1), config, 1) is None  # a fresh run starts afresh
    assert load_local_adapters(restarted, load_config(restarted.run_config), 2) is None


def test_local_b_is_refused_with_ffa_lora_and_without_client_evaluation(tmp_path):
    with pytest.raises(ConfigError, match="lora.local-b.*lora.freeze-a"):
        load_config({"lora.local-b": True, "lora.freeze-a": True, "fraction-evaluate": 1.0})
    with pytest.raises(ConfigError, match="lora.local-b.*fraction-evaluate"):
        load_config({"lora.local-b": True})
    with pytest.raises(ConfigError, match="lora.local-b.*client-data=device"):
        load_config({"lora.local-b": True, "fraction-evaluate": 1.0, "client-data": "device"})


def test_clients_own_evaluations_average_to_the_servers_for_the_same_adapters(tmp_path, task_identity):
    """What makes a local-b run's federated_hr@10 comparable with another run's hr@10:
    without local adapters, the user-weighted mean of the clients' evaluations is the
    server's evaluation (HR and NDCG are means over users)."""
    from fedrec.client_data import load_client_data
    from fedrec.local_round import evaluate_local

    # top-3 of 10 candidates: top-10 would always hit
    config = load_config(toy_run_config(tmp_path, **GROUPS, **{"personal.enabled": True, "eval.k": 3}))
    prepared = prepare(config.data, config.eval)
    server = GlobalModel(config, prepared)
    generator = torch.Generator().manual_seed(0)
    server.set_adapters({k: v + 0.3 * torch.randn(v.shape, generator=generator) for k, v in server.adapters().items()})
    central = server.evaluate()

    totals, users = {}, 0
    for partition in range(PARTITIONS):
        data = load_client_data(config, prepared, partition, PARTITIONS)
        metrics = evaluate_local(config, prepared, data, server.adapters())
        for name in ("hr@3", "ndcg@3", "hr@3_full", "ndcg@3_full"):
            totals[name] = totals.get(name, 0.0) + metrics[name] * len(data.users)
        users += len(data.users)
    assert users == prepared.num_users
    for name, total in totals.items():
        assert total / users == pytest.approx(central[name], abs=1e-9), name
    assert 0 < central["hr@3"] < 1 and 0 < central["hr@3_full"] < 1
