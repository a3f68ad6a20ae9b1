"""The membership-inference audit: the AUC, the attack's examples, a run end to end."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedrec import records
from fedrec.checkpoint import save_checkpoint
from fedrec.config import to_run_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.model.build import build_recommender, token_table
from fedrec.privacy.audit import (
    MEMBERS_FROM_ALL,
    MEMBERS_FROM_CLIENTS,
    auc_stderr,
    audit_examples,
    audit_run,
    read_audit,
    roc_auc,
)
from fedrec.results import RunRecord
from fedrec.training import make_loader, make_optimizer, train_local

# ---------------------------------------------------------------- the AUC


@pytest.mark.parametrize(
    "members, nonmembers, expected",
    [
        ([3, 4], [1, 2], 1.0),  # separated
        ([1, 2], [3, 4], 0.0),  # separated the other way
        ([5, 5, 5], [5, 5], 0.5),  # all tied
        # 0.9 beats 3; 0.4 ties 0.4 (1/2), beats 0.1; 0.6 beats 3: 7.5 of 9 pairs
        ([0.9, 0.4, 0.6], [0.5, 0.4, 0.1], 7.5 / 9),
        ([1, 3], [2], 0.5),  # one pair won, one lost
    ],
)
def test_auc_of_hand_computed_cases(members, nonmembers, expected):
    assert roc_auc(members, nonmembers) == pytest.approx(expected)


def test_auc_equals_the_pairwise_definition_with_ties():
    rng = np.random.default_rng(0)
    members, nonmembers = rng.integers(0, 6, 40), rng.integers(0, 6, 25)  # many ties
    diff = members[:, None] - nonmembers[None, :]
    pairwise = ((diff > 0) + 0.5 * (diff == 0)).mean()
    assert roc_auc(members, nonmembers) == pytest.approx(pairwise)
    assert roc_auc(nonmembers, members) == pytest.approx(1 - pairwise)


def test_auc_refuses_empty_or_nan():
    with pytest.raises(ValueError, match="members and non-members"):
        roc_auc([], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([float("nan")], [1.0])


def test_auc_stderr_hanley_mcneil():
    # A = 0.5: Q1 = Q2 = 1/3; (1/4 + 9/12 + 9/12) / 100
    assert auc_stderr(0.5, 10, 10) == pytest.approx(math.sqrt(1.75 / 100))
    assert auc_stderr(0.5, 1000, 1000) < auc_stderr(0.5, 10, 10)


# ------------------------------------------------------- the attack's data


def test_members_are_training_examples_and_nonmembers_held_out(toy_prepared):
    _, prepared = toy_prepared
    users = np.array([0, 5, 7])
    examples = audit_examples(prepared, users, members_per_user=3, seed=0)
    train = prepared.all_train_items
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    test = prepared.holdout("test")["item_idx"].to_numpy()
    trained = {
        (tuple(e.history[::-1]), e.positive)
        for e in build_examples([train[u] for u in users], history_items=10_000)
    }
    assert examples.member.sum() == 9 and (~examples.member).sum() == 6
    for user, history, target, member in zip(
        examples.users, examples.histories, examples.targets, examples.member, strict=True
    ):
        if member:  # exactly what the client trained on: item p after items 0..p-1
            assert (tuple(history), int(target)) in trained
        else:
            assert target in (valid[user], test[user])
            assert target not in set(train[user])
            expected = train[user] if target == valid[user] else np.append(train[user], valid[user])
            assert history.tolist() == expected.tolist()
    every = audit_examples(prepared, users, members_per_user=0, seed=0)
    assert every.member.sum() == sum(len(train[u]) - 1 for u in users)


# ------------------------------------------------------------- end to end


def write_run(config, prepared, model, rounds):
    out = Path(config.federation.out_dir)
    save_checkpoint(model.encoder, out, len(rounds))
    RunRecord(settings=to_run_config(config), rounds=rounds).write(out)
    return out


@pytest.mark.parametrize("freeze_a", [False, True], ids=["lora", "ffa"])
def test_audit_of_untrained_adapters_equals_the_pretrained_baseline(toy_prepared, freeze_a):
    config, prepared = toy_prepared
    config = dataclasses.replace(config, lora=dataclasses.replace(config.lora, freeze_a=freeze_a))
    out = write_run(config, prepared, build_recommender(config.model, config.lora), [{records.ROUND: 1}])
    result = audit_run(out, max_users=0, members_per_user=4)
    assert result.auc == result.auc_pretrained and result.auc_raw == result.auc_raw_pretrained
    assert result.advantage == 0.0
    assert result.members_from == MEMBERS_FROM_ALL and result.num_users == 24
    assert result.num_nonmembers == 48
    assert result.num_members == sum(min(len(items) - 1, 4) for items in prepared.all_train_items)
    assert read_audit(out)["auc"] == result.auc


def test_audit_of_a_trained_run_attacks_only_the_clients_that_trained(toy_prepared):
    config, prepared = toy_prepared
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.01))
    model = build_recommender(config.model, config.lora)
    table = token_table(prepared, config.model)
    users = [0, 3, 4, 9, 11, 17]
    examples = build_examples([prepared.all_train_items[u] for u in users], config.model.history_items)
    dataset = NextItemDataset(examples, table, 4, config.model.max_user_tokens, seed=0)
    torch.manual_seed(0)
    train_cfg = dataclasses.replace(config.train, max_steps=5, local_epochs=100)
    train_local(model, make_loader(dataset, 8, 0), make_optimizer(model, train_cfg), train_cfg, torch.device("cpu"))
    # with the user partitioning, partition id u holds user u
    rounds = [
        {records.ROUND: 1, records.CLIENT_EPSILONS: {str(u): 1.0 for u in users[:3]}},
        {records.ROUND: 2, records.TRAINED_PARTITIONS: users[2:]},  # how a run without DP names them
    ]
    out = write_run(config, prepared, model, rounds)

    result = audit_run(out, max_users=0, members_per_user=0)
    assert result.round == 2
    assert result.members_from == MEMBERS_FROM_CLIENTS and result.num_users == len(users)
    assert result.num_members == len(examples) and result.num_nonmembers == 2 * len(users)
    assert 0 <= result.auc <= 1 and result.auc != result.auc_pretrained  # the adapters moved
    assert 0 < result.auc_stderr < 0.2
    saved = json.loads((out / "audit.json").read_text())
    assert saved["advantage"] == pytest.approx(result.auc - result.auc_pretrained)

    capped = audit_run(out, max_users=2, members_per_user=1)
    assert capped.num_users == 2 and capped.num_members == 2 and capped.num_nonmembers == 4


def test_audit_without_a_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="fedrec simulate"):
        audit_run(tmp_path)
    RunRecord(settings={}, rounds=[]).write(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        audit_run(tmp_path)
