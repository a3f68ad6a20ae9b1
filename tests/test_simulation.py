"""A real Flower simulation (`flwr run`, local SuperLink, Ray) end to end."""

import json

import numpy as np
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedrec.checkpoint import latest_checkpoint, load_server_state
from fedrec.cli import main
from fedrec.config import load_config
from fedrec.item_transitions import load_transitions, local_transitions
from fedrec.prepare import prepare
from server.sampling import seeded_draw
from simulations.runner import _local_superlinks, simulate
from tests.conftest import toy_run_config

pytestmark = pytest.mark.slow

ROUND_KEYS = {"round", "train_loss", "hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full",
              "bytes_up_per_client", "seconds"}


@pytest.fixture()
def flwr_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    before = {p.pid for p in _local_superlinks()}  # other runs on this machine may have theirs
    yield
    left = [p for p in _local_superlinks() if p.pid not in before]
    assert not left, "the runner left a SuperLink running"


def test_smoke_simulation_trains_checkpoints_and_resumes(tmp_path, flwr_home, capsys):
    overrides = toy_run_config(tmp_path, **{"fraction-evaluate": 0.5})
    results = simulate("smoke", overrides, stream=False)

    assert results["dataset"]["num_users"] == 20  # smoke preset: max-users=20 -> 20 clients
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    seed = results["settings"]["seed"]
    for record in results["rounds"]:
        assert ROUND_KEYS <= set(record)
        assert record["clients"] == 5  # fraction-train 0.25 of 20
        # seeded sampling: the partitions the seed draws, whatever ids Flower gave the nodes
        assert record["trained_partitions"] == seeded_draw({p: p for p in range(20)}, 5, seed, record["round"])
        assert record["failures"] == 0
        assert record["train_loss"] > 0
        # 10 clients ran the ClientApp's evaluate on their own held-out items
        assert 0 <= record["federated_hr@10"] <= 1 and "federated_ndcg@10_full" in record
        assert record["bytes_up_per_client"] == results["model"]["adapter_wire_bytes"]
    assert results["model"]["adapter_bytes"] < 0.05 * results["model"]["model_bytes"]
    assert set(results["baselines"]["popularity"]) >= {"hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full"}
    out = tmp_path / "out"
    assert latest_checkpoint(out)[0] == 2
    assert json.loads((out / "metrics.json").read_text()) == results

    resumed = simulate("smoke", {**overrides, "num-server-rounds": 3, "resume": True}, stream=False)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["rounds"][:2] == results["rounds"]
    assert resumed["rounds"][2]["trained_partitions"] == seeded_draw({p: p for p in range(20)}, 5, seed, 3)
    assert latest_checkpoint(out)[0] == 3
    # experiment tracking: the same rounds as CSV and TensorBoard events (both runs')
    assert pd.read_csv(out / "metrics.csv")["round"].tolist() == [1, 2, 3]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("hr_at_10")] == [1, 2, 3]

    # serving the run: `fedrec recommend --model DIR --user U --k 10`
    capsys.readouterr()
    assert main(["recommend", "--model", str(out), "--user", "u1", "--k", "10"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()[1:]
    recommended = [line.split()[0] for line in lines]
    scores = [float(line.split()[1]) for line in lines]
    assert len(set(recommended)) == 10 and scores == sorted(scores, reverse=True)
    inter = pd.read_csv(tmp_path / "data" / "interactions.csv")
    assert not set(inter.loc[inter["user_id"] == "u1", "item_id"]) & set(recommended)



def test_item_identities_with_fedadam_through_flwr_run(tmp_path, flwr_home, capsys):
    """The item-identity table travels, is averaged, stepped by FedAdam, checkpointed and
    served; the clients train with FedProx's proximal term, its mu sent in the train config.
    Before round 1 every client sends its transition counts (transitions.*), which the
    server sums, saves, ranks with and keeps for the resumed run."""
    from safetensors.torch import load_file

    overrides = toy_run_config(
        tmp_path,
        **{
            "model.item-ids": True,
            "train.id-lr": 0.05,
            "server-optimizer": "fedadam",
            "server-lr": 0.01,
            "proximal-mu": 0.01,
            "transitions.weight": 0.2,
            "transitions.window": 3,
        },
    )
    results = simulate("smoke", overrides, stream=False)
    num_items = results["dataset"]["num_items"]
    # every client's exact counts, summed: the count over every user's training items
    asked = results["model"]["transitions"]
    assert asked["clients"] == 20 and asked["failures"] == 0
    config = load_config(results["settings"])  # the smoke preset's, with the overrides
    prepared = prepare(config.data, config.eval)
    summed = load_transitions(tmp_path / "out", num_items)
    np.testing.assert_array_equal(summed.toarray(), local_transitions(prepared.all_train_items, num_items, 3).toarray())
    assert asked["total"] == summed.sum() > 0
    table_bytes = num_items * 32 * 4  # the tiny BERT is 32 wide
    for record in results["rounds"]:
        assert record["clients"] == 5 and record["failures"] == 0 and record["rejected_updates"] == 0
        assert record["bytes_up_per_client"] == results["model"]["adapter_wire_bytes"] > table_bytes
        # FedAdam's step keeps the adapters' float32 (NumPy would make them float64)
        assert record["bytes_down_per_client"] == record["bytes_up_per_client"]
    last_round, folder = latest_checkpoint(tmp_path / "out")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    table = next(v for k, v in saved.items() if "item_identity" in k)
    assert table.shape == (num_items, 32) and table.abs().max() > 0
    capsys.readouterr()
    assert main(["recommend", "--model", str(tmp_path / "out"), "--user", "u1", "--k", "5"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6

    # FedAdam's moments are checkpointed with the adapters, one per adapter tensor ...
    moments = load_server_state(folder)
    assert set(moments) == {f"{m}/{k}" for m in ("m_t", "v_t") for k in saved}
    # ... and a resumed run carries them on: v_t = 0.99 v_t-1 + 0.01 delta^2 >= 0.99 v_t-1,
    # where moments restarted from zero would give v_t = 0.01 delta^2
    # (with the server's rate stepped down from the resumed round on, server-lr-step-round:
    # two steps, the later one reached at the resumed round)
    stepped = {"server-lr-step-round": f"{last_round},{last_round + 1}", "server-lr-step-to": "0.005,0.001"}
    after = simulate("smoke", {**overrides, **stepped, "num-server-rounds": last_round + 1, "resume": True}, stream=False)
    assert [r["server_lr"] for r in after["rounds"]] == [0.01] * last_round + [0.001]
    assert after["model"]["transitions"] == asked  # reused, not asked again
    resumed = load_server_state(latest_checkpoint(tmp_path / "out")[1])
    for key, before in moments.items():
        if key.startswith("v_t/"):
            assert np.all(resumed[key] >= 0.99 * before * (1 - 1e-5)), key


def test_private_simulation_accounts_epsilon_across_rounds_and_resume(tmp_path, flwr_home):
    """DP-SGD on every client, after each sent its noised item counts (popularity.*):
    the target, counts' release included, is spent by the last round and never exceeded."""
    overrides = toy_run_config(
        tmp_path,
        **{
            "fraction-train": 1.0,
            "dp.enabled": True,
            "dp.target-epsilon": 2.0,
            "popularity.weight": 0.05,
            "popularity.noise": 4.0,
        },
    )
    results = simulate("smoke", overrides, stream=False)

    first, last = results["rounds"]
    assert 0 < first["epsilon_max"] < last["epsilon_max"] <= 2.0 * (1 + 1e-6)
    assert last["epsilon_max"] == pytest.approx(2.0, rel=0.02)  # every client trained twice
    assert last["epsilon_median"] <= last["epsilon_max"] == last["epsilon_max_run"]
    assert len(last["client_epsilons"]) == 20 and last["budget_refusals"] == 0
    assert "train_loss" not in last  # a private client does not report its loss

    # every client's counts, each noised with std 4, summed and saved
    query = results["model"]["item-counts"]
    assert query["clients"] == 20 and query["failures"] == 0
    counts = np.load(tmp_path / "out" / "item-counts.npy")
    assert counts.shape == (results["dataset"]["num_items"],)
    examples = results["dataset"]["num_train"] - 20  # each user's first item is no example's target
    assert abs(counts.sum() - examples) < 6 * 4.0 * np.sqrt(20 * counts.size)
    assert query["total"] == pytest.approx(counts.sum())

    # A third round would pass the target: each client, whose accountant was kept on
    # disk for the resumed run, refuses; the server counts the refusals and goes on.
    # The resumed run reuses the saved counts: no client releases them again.
    resumed = simulate("smoke", {**overrides, "num-server-rounds": 3, "resume": True}, stream=False)
    third = resumed["rounds"][2]
    assert third["budget_refusals"] == 20 and "epsilon_max" not in third
    assert third["epsilon_max_run"] == last["epsilon_max_run"]
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "item-counts.npy"), counts)


def test_secure_aggregation_through_flwr_run(tmp_path, flwr_home):
    """SecAgg+ via `flwr run`: rounds complete, uploads are masked integers (twice the bytes)."""
    overrides = toy_run_config(tmp_path, **{"secagg.enabled": True})
    results = simulate("smoke", overrides, stream=False)
    plain_bytes = results["model"]["adapter_wire_bytes"]
    for record in results["rounds"]:
        assert record["clients"] == 5 and record["failures"] == 0
        assert record["train_loss"] > 0
        assert 1.8 * plain_bytes < record["bytes_up_per_client"] < 2.2 * plain_bytes
        assert record["secagg_error_bound"] < 1e-3


def test_resume_on_new_interactions_continues_the_run(tmp_path, flwr_home):
    """Incremental learning: new interactions arrive; the run goes on from its checkpoint."""
    overrides = toy_run_config(tmp_path, **{"num-server-rounds": 1})
    first = simulate("smoke", overrides, stream=False)
    inter = pd.read_csv(overrides["data.path"])
    later = inter.groupby("user_id", as_index=False).last()  # one more item per user, later on
    later["item_id"] = [f"i{(int(i[1:]) + 2) % 40}" for i in later["item_id"]]
    later["timestamp"] += 10_000
    grown = pd.concat([inter, later]).drop_duplicates(["user_id", "item_id"])
    new_path = tmp_path / "new-data" / "interactions.csv"
    new_path.parent.mkdir()
    grown.to_csv(new_path, index=False)

    resumed = simulate(
        "smoke", {**overrides, "data.path": str(new_path), "num-server-rounds": 2, "resume": True}, stream=False
    )
    assert [r["round"] for r in resumed["rounds"]] == [1, 2]
    assert resumed["rounds"][0] == first["rounds"][0]
    assert resumed["dataset"]["since_round"] == 2
    assert resumed["dataset"]["num_train"] > first["dataset"]["num_train"]
    assert resumed["dataset"]["before"] == first["dataset"]
    assert latest_checkpoint(tmp_path / "out")[0] == 2


def test_fedsa_lora_through_flwr_run_keeps_each_clients_b_on_the_client(tmp_path, flwr_home):
    """lora.local-b via `flwr run`: lora_A and the item identities travel and are
    averaged, every client keeps its own lora_B, and the clients evaluate with it."""
    import torch
    from safetensors.torch import load_file

    settings = {"lora.local-b": True, "model.item-ids": True, "fraction-train": 1.0, "fraction-evaluate": 1.0,
                "train.lr": 0.05, "train.max-steps": 4}  # enough for each B to move some ranks
    results = simulate("smoke", toy_run_config(tmp_path, **settings, **{"eval.k": 3}), stream=False)

    for record in results["rounds"]:
        assert record["clients"] == 20 and record["failures"] == 0
        assert record["bytes_up_per_client"] == results["model"]["adapter_wire_bytes"]
        assert 0 <= record["federated_ndcg@3"] <= 1
    # the server evaluates lora_B = 0, the clients their own: the figures differ
    last = results["rounds"][-1]
    assert (last["federated_ndcg@3"], last["federated_ndcg@3_full"]) != (last["ndcg@3"], last["ndcg@3_full"])
    saved = load_file(str(latest_checkpoint(tmp_path / "out")[1] / "adapter_model.safetensors"))
    assert all(v.abs().max() == 0 for k, v in saved.items() if "lora_B" in k)  # no B reached the server
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_A" in k)
    kept = [torch.load(tmp_path / "out" / "client-state" / f"local-adapters-{p}.pt") for p in range(20)]
    assert all(all(v.abs().max() > 0 for v in b.values()) for b in kept)
    assert not torch.equal(*(next(iter(b.values())) for b in kept[:2]))  # each client its own
