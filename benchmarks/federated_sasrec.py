"""Probe: does a sequential ID model survive federation at fedrec's client budget?

The central SASRec baseline (:mod:`fedrec.sequential_baseline`) is the
strongest model measured on MovieLens-100K's leave-one-out protocol. This probe
trains the same model the federated way, in one process: each round draws
``--clients`` of the single-user clients with a seeded generator, each copies
the global model, takes ``--local-steps`` Adam steps on its own sequence (every
position predicts its next item, fresh negatives each step) and returns its
weights; the server averages them weighted by each client's number of
next-item examples (FedAvg). There is no DP, no Flower and no transport: it
measures what federated averaging of an ID-based sequential model reaches in a
given number of rounds, to decide whether fedrec should grow one. fedrec's
``--preset quality`` trains 47 clients x 12 local steps x 10 rounds.

Prints a JSON line per validated round and writes the curve and the test
figures of the best validated round to ``--out``; the last line is
``federated_sasrec_hr10=<test HR@10>``.

    python benchmarks/federated_sasrec.py [--rounds 200] [--clients 47] [--local-steps 12] [--lr 0.001] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from fedrec.config import load_config
from fedrec.evaluation import evaluate_scorer, histories_for
from fedrec.logs import setup_logging
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.sequential_baseline import (
    PAD,
    SasRec,
    SasRecSettings,
    held_out_items,
    new_optimizer,
    next_item_data,
    sasrec_scorer,
    train_step,
)

FIGURES = ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full", "coverage@10", "popularity_ratio@10")


def fedavg(states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Element-wise mean of the clients' weights, weighted (FedAvg)."""
    total = sum(weights)
    return {name: sum(state[name] * (w / total) for state, w in zip(states, weights)) for name in states[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--clients", type=int, default=47, help="single-user clients a round (fedrec's quality preset: 47)")
    parser.add_argument("--local-steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=1e-3, help="each client's Adam learning rate")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("runs/federated-sasrec.json"))
    parser.add_argument("--quick", action="store_true", help="100 users, 4 rounds of 5 clients: checks that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients, args.eval_every = 4, 5, 2
    setup_logging()
    config = load_config({"runtime.threads": args.threads, **({"data.max-users": 100} if args.quick else {})})
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    k = config.eval.k
    settings = SasRecSettings(seed=args.seed, lr=args.lr)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    train = histories_for(prepared, "valid")
    data = next_item_data(train, prepared.num_items, settings.max_len, held_out_items(prepared))
    examples = (data.sequences[:, 1:] != PAD).sum(1).numpy()  # next-item examples of each client
    model = SasRec(prepared.num_items, settings)
    local = copy.deepcopy(model)
    curve, best, best_state, started = [], -np.inf, None, time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        states, weights = [], []
        for row in rng.choice(len(data.users), size=min(args.clients, len(data.users)), replace=False):
            local.load_state_dict(model.state_dict())
            optimizer = new_optimizer(local, args.lr)
            for _ in range(args.local_steps):
                train_step(local, optimizer, data, np.array([row]), rng, settings.loss)
            states.append({n: t.detach().clone() for n, t in local.state_dict().items()})
            weights.append(float(examples[row]))
        model.load_state_dict(fedavg(states, weights))
        if server_round % args.eval_every and server_round != args.rounds:
            continue
        metrics = evaluate_scorer(sasrec_scorer(model, train), prepared, "valid", k)
        point = {"round": server_round, "valid_hr@10": metrics[f"hr@{k}"], "valid_ndcg@10": metrics[f"ndcg@{k}"],
                 "minutes": (time.perf_counter() - started) / 60}
        curve.append(point)
        print(json.dumps(point), flush=True)
        if metrics[f"ndcg@{k}"] > best:
            best, best_state = metrics[f"ndcg@{k}"], copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    tested = evaluate_scorer(sasrec_scorer(model, histories_for(prepared, "test")), prepared, "test", k, beyond=True)
    best_round = max(curve, key=lambda p: p["valid_ndcg@10"])["round"]
    result = {"settings": vars(args) | {"out": str(args.out)}, "best_round": best_round, "curve": curve,
              "test": {m: tested[m] for m in FIGURES}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({"best_round": best_round, **result["test"]}))
    print(f"federated_sasrec_hr10={tested[f'hr@{k}']:.4f}")


if __name__ == "__main__":
    main()
