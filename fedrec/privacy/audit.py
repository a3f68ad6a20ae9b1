"""Empirical privacy audit: a membership-inference attack on a run's final global model.

The guarantee of DP is a bound on what *any* attack can learn; this module runs
one concrete attack and measures how well it does, so a run can be checked
against what its epsilon promises (and a run without DP shows what leaks).

The attack (score-based, black box on the released adapters):

* **Members**: interactions in the training split of users whose client trained
  (taken from ``client_epsilons`` in metrics.json when DP is on; otherwise every
  user, since without DP metrics.json does not say who was sampled). Each is
  scored exactly as it was trained: item ``s_p`` given the history
  ``s_0 .. s_{p-1}`` (at most ``model.history-items`` of them, most recent first).
* **Non-members**: the same users' held-out items, never trained on: the
  validation item given the training history, and the test item given the
  training history plus the validation item. Same users, same kind of input, one
  step later in time.
* **Score**: the model's cosine score of the item for the history, minus the mean
  score of every item the user never interacted with under the same history (a
  per-example reference that removes how "close to everything" a history is).
  ``auc_raw`` is the same attack on the plain cosine score.
* **AUC**: the probability that a random member scores above a random
  non-member (ties count a half), the Mann-Whitney U statistic; 0.5 is chance.

Random items the user never saw are *not* used as non-members: a model that
learned the users' tastes ranks them low whether or not it memorised anything,
so they would measure recommendation quality, not membership.

The same attack runs on the **pretrained** model (the fresh adapters, equal to
the base encoder): what the attack gets without any learning, e.g. because
held-out items come later in time than training items. Leakage is the part of
the trained model's AUC above the pretrained one; ``auc - auc_pretrained`` close
to 0 (within ``auc_stderr``) means the attack found no measurable leakage. It
is one attack, so a low AUC is evidence, not a proof, of privacy.

Run it on a finished run folder: ``python -m fedrec.privacy.audit RUN_DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from fedrec import records
from fedrec.checkpoint import latest_checkpoint
from fedrec.client_data import partition_users
from fedrec.config import FedRecConfig, load_config
from fedrec.evaluation import encode_items, encode_users
from fedrec.model.adapters import load_saved_adapter
from fedrec.model.build import build_recommender, token_table
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.prepare import PreparedData, prepare
from fedrec.results import METRICS_FILE
from fedrec.runtime import select_device
from fedrec.tokens import TokenTable

log = logging.getLogger(__name__)

AUDIT_FILE = "audit.json"
MEMBERS_FROM_CLIENTS = "clients that trained"
MEMBERS_FROM_ALL = "all users"


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """Area under the ROC curve of "score above a threshold means member".

    Equals P(member score > non-member score) + P(tie) / 2, computed as the
    Mann-Whitney U statistic from average ranks, in O(n log n).
    """
    members = np.asarray(member_scores, dtype=np.float64).ravel()
    nonmembers = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if members.size == 0 or nonmembers.size == 0:
        raise ValueError(
            f"AUC needs members and non-members; got {members.size} and {nonmembers.size}"
        )
    scores = np.concatenate([members, nonmembers])
    if not np.isfinite(scores).all():
        raise ValueError("AUC scores hold NaN or Inf")
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct value, averaged over its ties
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse[: members.size]].sum()
    u = rank_sum - members.size * (members.size + 1) / 2.0
    return float(u / (members.size * nonmembers.size))


def auc_stderr(auc: float, num_members: int, num_nonmembers: int) -> float:
    """Standard error of an AUC (Hanley and McNeil, 1982)."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc)
        + (num_members - 1) * (q1 - auc**2)
        + (num_nonmembers - 1) * (q2 - auc**2)
    ) / (num_members * num_nonmembers)
    return math.sqrt(max(variance, 0.0))


@dataclass(frozen=True)
class AuditExamples:
    """The attack's examples: a chronological history, a target item, and the label."""

    users: np.ndarray
    """[n] user index of each example."""
    histories: list[np.ndarray]
    """Chronological items before the target (the model keeps the most recent)."""
    targets: np.ndarray
    """[n] the item scored."""
    member: np.ndarray
    """[n] True: the example was training data; False: held out."""


def audit_examples(
    prepared: PreparedData, users: np.ndarray, members_per_user: int, seed: int
) -> AuditExamples:
    """Members (training examples, up to ``members_per_user`` per user, 0: all) and
    non-members (validation and test items) of the given users."""
    rng = np.random.default_rng(seed)
    train = prepared.all_train_items
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    test = prepared.holdout("test")["item_idx"].to_numpy()
    rows: list[tuple[int, np.ndarray, int, bool]] = []
    for user in users:
        sequence = train[user]
        positions = np.arange(1, len(sequence))  # position 0 has no history: never trained
        if members_per_user and len(positions) > members_per_user:
            positions = np.sort(rng.choice(positions, size=members_per_user, replace=False))
        rows.extend((int(user), sequence[:p], int(sequence[p]), True) for p in positions)
        rows.append((int(user), sequence, int(valid[user]), False))
        rows.append((int(user), np.append(sequence, valid[user]), int(test[user]), False))
    return AuditExamples(
        users=np.array([r[0] for r in rows], dtype=np.int64),
        histories=[r[1] for r in rows],
        targets=np.array([r[2] for r in rows], dtype=np.int64),
        member=np.array([r[3] for r in rows], dtype=bool),
    )


def attack_scores(
    model: TwoTowerRecommender,
    table: TokenTable,
    prepared: PreparedData,
    examples: AuditExamples,
    config: FedRecConfig,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """(calibrated, raw) attack scores of every example under ``model``."""
    items = encode_items(model, table, device)
    users = encode_users(
        model,
        table,
        examples.histories,
        config.model.history_items,
        config.model.max_user_tokens,
        device,
        item_vectors=items,
    )
    scores = (users @ items.T).double().cpu().numpy()  # [n, I]
    raw = scores[np.arange(len(scores)), examples.targets]
    train = prepared.all_train_items
    holdout = {s: prepared.holdout(s)["item_idx"].to_numpy() for s in ("valid", "test")}
    reference = np.empty(len(scores))
    for row, user in enumerate(examples.users):
        unseen = np.ones(scores.shape[1], dtype=bool)
        unseen[train[user]] = False
        unseen[[holdout["valid"][user], holdout["test"][user]]] = False
        reference[row] = scores[row, unseen].mean() if unseen.any() else 0.0
    return raw - reference, raw


@dataclass(frozen=True)
class AuditResult:
    """What the attack achieved on a run's final model and on the pretrained model."""

    round: int
    """The checkpoint's server round (the last one of the run)."""
    auc: float
    """AUC of the calibrated attack on the trained model."""
    auc_pretrained: float
    """The same attack on the pretrained model (fresh adapters): the no-learning baseline."""
    auc_stderr: float
    """Standard error of ``auc`` (Hanley-McNeil); the baseline's is about the same."""
    auc_raw: float
    """AUC of the plain cosine score on the trained model."""
    auc_raw_pretrained: float
    num_users: int
    num_members: int
    num_nonmembers: int
    members_from: str
    """Whose training data the members are: the clients that trained, or all users."""

    @property
    def advantage(self) -> float:
        """AUC above the pretrained model's: what the attack learned from training."""
        return self.auc - self.auc_pretrained

    def to_json(self) -> dict[str, float | int | str]:
        return {**asdict(self), "advantage": self.advantage}


def _trained_users(
    config: FedRecConfig, prepared: PreparedData, rounds: list[dict]
) -> tuple[np.ndarray, str]:
    """Users whose client trained in some round (when metrics.json says), else all users.

    metrics.json names a round's clients in ``trained_partitions`` (since seeded
    sampling) and, under DP-SGD, in ``client_epsilons`` (earlier runs too).
    """
    partitions = {
        int(p)
        for r in rounds
        for p in [*r.get(records.CLIENT_EPSILONS, {}), *r.get(records.TRAINED_PARTITIONS, [])]
    }
    if partitions and (config.partition.scheme == "user" or config.partition.num_partitions):
        num_partitions = config.partition.num_partitions or prepared.num_users
        assignment = partition_users(config, prepared, num_partitions)
        return np.flatnonzero(np.isin(assignment, sorted(partitions))), MEMBERS_FROM_CLIENTS
    return np.arange(prepared.num_users), MEMBERS_FROM_ALL


def audit_run(
    out_dir: Path, max_users: int = 200, members_per_user: int = 8, seed: int = 0
) -> AuditResult:
    """Attack the last checkpoint of the run in ``out_dir``; write ``out_dir/audit.json``.

    ``max_users`` (0: all) caps the users attacked, drawn at random with ``seed``,
    as does ``members_per_user`` their training examples; every user also gives
    two non-members.
    """
    out_dir = Path(out_dir)
    metrics_path = out_dir / METRICS_FILE
    if not metrics_path.exists():
        raise FileNotFoundError(f"no {metrics_path}: run `fedrec simulate --out {out_dir}` first")
    found = latest_checkpoint(out_dir)
    if found is None:
        raise FileNotFoundError(
            f"no complete checkpoint under {out_dir / 'checkpoints'}; the audit attacks the "
            "final global adapters, which the ServerApp saves after each round"
        )
    checkpoint_round, folder = found
    results = json.loads(metrics_path.read_text())
    config = load_config(results["settings"])
    prepared = prepare(config.data, config.eval)
    users, members_from = _trained_users(config, prepared, results.get("rounds", []))
    rng = np.random.default_rng(seed)
    if max_users and len(users) > max_users:
        users = np.sort(rng.choice(users, size=max_users, replace=False))
    examples = audit_examples(prepared, users, members_per_user, seed)
    device = select_device(config.runtime)
    table = token_table(prepared, config.model)
    model = build_recommender(config.model, config.lora, prepared.num_items).to(device)
    pretrained, pretrained_raw = attack_scores(model, table, prepared, examples, config, device)
    load_saved_adapter(model.encoder, folder)
    trained, trained_raw = attack_scores(model, table, prepared, examples, config, device)
    m = examples.member
    auc = roc_auc(trained[m], trained[~m])
    result = AuditResult(
        round=checkpoint_round,
        auc=auc,
        auc_pretrained=roc_auc(pretrained[m], pretrained[~m]),
        auc_stderr=auc_stderr(auc, int(m.sum()), int((~m).sum())),
        auc_raw=roc_auc(trained_raw[m], trained_raw[~m]),
        auc_raw_pretrained=roc_auc(pretrained_raw[m], pretrained_raw[~m]),
        num_users=len(users),
        num_members=int(m.sum()),
        num_nonmembers=int((~m).sum()),
        members_from=members_from,
    )
    path = out_dir / AUDIT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result.to_json(), indent=2))
    tmp.replace(path)
    log.info(
        "audit of %s (round %d): AUC %.4f ± %.4f, pretrained %.4f (%d members, %d non-members, %s)",
        out_dir, checkpoint_round, result.auc, result.auc_stderr, result.auc_pretrained,
        result.num_members, result.num_nonmembers, members_from,
    )
    return result


def read_audit(out_dir: Path) -> dict | None:
    """``out_dir/audit.json`` of an earlier audit, if any."""
    path = Path(out_dir) / AUDIT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> int:
    """``python -m fedrec.privacy.audit RUN_DIR``: audit a finished run, print the result."""
    from fedrec.logs import setup_logging

    parser = argparse.ArgumentParser(prog="python -m fedrec.privacy.audit", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run folder with metrics.json and checkpoints/")
    parser.add_argument("--max-users", type=int, default=200, help="users attacked (0: all; default %(default)s)")
    parser.add_argument("--members-per-user", type=int, default=8, help="training examples per user (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the users' and examples' sampling")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        result = audit_run(Path(args.run_dir), args.max_users, args.members_per_user, args.seed)
    except (ValueError, OSError) as err:
        print(f"audit: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
