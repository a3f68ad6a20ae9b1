"""Choose the transition prior's settings (``transitions.*``) for a finished run on its validation items.

The prior changes no training, so it can be tuned on any checkpoint: this script
scores the run's checkpoint once per split, then adds the prior of each setting.
The counts are what the run's clients would send (their exact counts, summed,
:mod:`fedrec.item_transitions`): each partition's ``local_transitions`` over the
data that client holds. The setting with the best validation NDCG@k is then
scored on the test items; everything tried is written as JSON.

    python simulations/transition_sweep.py --model RUN [--save] [--run-config "personal.recent-items=2"]

``--run-config`` sets evaluation settings as ``fedrec evaluate``'s does (e.g. the
device's recency term of a preset that differs from the run's); the output file's
name then carries them, ``round-NNNN-transition-sweep_KEY=VALUE.json``.

``--save`` writes the chosen window's counts as ``RUN/item-transitions.npz``
(never over an existing file), so that ``fedrec evaluate`` and ``fedrec recommend``
can use the prior with ``--run-config "transitions.weight=..."``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from fedrec.client_data import load_client_data
from fedrec.config import TransitionConfig
from fedrec.errors import check_setting
from fedrec.evaluation import evaluate_scorer, histories_for, model_scorer
from fedrec.global_model import GlobalModel
from fedrec.item_transitions import (
    TRANSITIONS_FILE,
    local_transitions,
    save_transitions,
    sum_counts,
    transition_prior,
)
from fedrec.partition import resolve_num_partitions
from fedrec.reevaluate import load_run, overrides_tag
from fedrec.runtime import autocast
from fedrec.serving.trained import checkpoint_name
from simulations.runner import parse_overrides

log = logging.getLogger("fedrec.transition_sweep")

WEIGHTS = (0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
WINDOWS = (5, 10, 20, 50)
LAST_ITEMS = (20, 50)
DECAYS = (0.6, 0.7, 0.8, 0.9)


def client_sequences(model: GlobalModel) -> list[list[np.ndarray]]:
    """Each partition's training sequences: what each of the run's clients holds."""
    config, prepared = model.config, model.prepared
    partitions = resolve_num_partitions(config.partition, prepared.num_users, config.partition.num_partitions)
    return [load_client_data(config, prepared, p, partitions).sequences for p in range(partitions)]


def summed_counts(clients: list[list[np.ndarray]], num_items: int, window: int) -> sp.csr_matrix:
    """The sum of every client's exact counts: what the run's query would return."""
    each = (local_transitions(sequences, num_items, window) for sequences in clients)
    return sum_counts(((c.row, c.col, c.data) for c in each), num_items)


def score_matrix(model: GlobalModel, split: str) -> np.ndarray:
    """[users, items] scores of the run's model (personal settings and popularity prior included)."""
    config = model.config
    with autocast(config.runtime, model.device):
        scorer = model_scorer(
            model.model,
            model.table,
            histories_for(model.prepared, split),
            config.model.history_items,
            config.model.max_user_tokens,
            model.device,
            config.personal,
            model.item_prior,
        )
        return scorer(np.arange(model.prepared.num_users))


def sweep(
    model: GlobalModel,
    weights: Sequence[float] = WEIGHTS,
    windows: Sequence[int] = WINDOWS,
    last_items: Sequence[int] = LAST_ITEMS,
    decays: Sequence[float] = DECAYS,
) -> dict:
    """Every setting's validation figures, the best one's (by NDCG@k) test figures, the
    model's own (weight 0) on both splits, and the prior alone (no model: a counting
    baseline on the same counts), its window, last items and decay chosen the same way."""
    check_setting(
        not model.config.train.include_valid_item,
        "train.include-valid-item",
        "the run trained on the validation items, so the prior cannot be tuned on them",
    )
    k, prepared = model.config.eval.k, model.prepared
    scores = {split: score_matrix(model, split) for split in ("valid", "test")}
    histories = {split: histories_for(prepared, split) for split in scores}

    def metrics(split: str, prior: np.ndarray | None, alone: bool = False) -> dict[str, float]:
        matrix = scores[split] if prior is None else prior if alone else scores[split] + prior
        return evaluate_scorer(lambda users: matrix[users], prepared, split, k, beyond=True)

    result = {"k": k, "without": {split: metrics(split, None) for split in scores}, "tried": [], "alone": []}
    counts = {}
    clients = client_sequences(model)
    for window in windows:
        counts[window] = summed_counts(clients, prepared.num_items, window)
        for last, decay in itertools.product(last_items, decays):
            unit = transition_prior(counts[window], TransitionConfig(1.0, window, last, decay))
            prior = unit(histories["valid"]).numpy()
            alone = {"window": window, "last_items": last, "decay": decay}
            result["alone"].append({**alone, "valid": metrics("valid", prior, alone=True)})
            for weight in weights:
                found = metrics("valid", weight * prior)
                setting = {"weight": weight, "window": window, "last_items": last, "decay": decay}
                result["tried"].append({**setting, "valid": found})
                log.info("%s: valid hr@%d %.4f ndcg@%d %.4f", setting, k, found[f"hr@{k}"], k, found[f"ndcg@{k}"])
    best = max(result["tried"], key=lambda t: t["valid"][f"ndcg@{k}"])
    chosen = TransitionConfig(best["weight"], best["window"], best["last_items"], best["decay"])
    test_prior = transition_prior(counts[chosen.window], chosen)(histories["test"]).numpy()
    result["chosen"] = {**{key: best[key] for key in ("weight", "window", "last_items", "decay")}, "exponent": chosen.exponent}
    result["test"] = metrics("test", test_prior)
    alone = max(result["alone"], key=lambda t: t["valid"][f"ndcg@{k}"])
    unit = TransitionConfig(1.0, alone["window"], alone["last_items"], alone["decay"])
    result["alone_chosen"] = {key: alone[key] for key in ("window", "last_items", "decay")}
    result["alone_test"] = metrics("test", transition_prior(counts[unit.window], unit)(histories["test"]).numpy(), alone=True)
    result["counts"] = counts[chosen.window]
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, type=Path, help="run directory of `fedrec simulate`")
    parser.add_argument("--round", type=int, default=None, help="checkpoint round (default: the newest)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save", action="store_true", help=f"write the chosen counts as RUN/{TRANSITIONS_FILE}")
    parser.add_argument("--run-config", action="append", help='evaluation settings, e.g. "personal.recent-items=2"')
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.run_config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    model, server_round = load_run(args.model, args.round, {**overrides, "runtime.threads": args.threads})
    if model.config.transitions.enabled:
        model.user_prior = None  # the sweep adds its own priors to the model's scores
        model.config = replace(model.config, transitions=TransitionConfig())
    result = sweep(model)
    counts = result.pop("counts")
    result.update(run=str(args.model), round=server_round, overrides=overrides, seconds=round(time.perf_counter() - start, 1))
    out = args.model / "evaluations" / f"{checkpoint_name(server_round)}-transition-sweep{overrides_tag(overrides)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    k = result["k"]
    for name, found in (
        ("model alone", result["without"]["test"]),
        ("prior alone", result["alone_test"]),
        ("model + prior", result["test"]),
    ):
        print(f"{name}: test hr@{k} {found[f'hr@{k}']:.4f} ndcg@{k} {found[f'ndcg@{k}']:.4f} "
              f"hr@{k}_full {found[f'hr@{k}_full']:.4f}")
    print(f"chosen on validation: {result['chosen']}; written to {out}")
    if args.save:
        if (args.model / TRANSITIONS_FILE).exists():
            print(f"not saved: {args.model / TRANSITIONS_FILE} exists")
        else:
            print(f"saved {save_transitions(args.model, counts, result['chosen']['window'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
