"""What the order of a user's history is worth on the leave-one-out protocol.

Trains the central SASRec baseline (:mod:`fedrec.sequential_baseline`) twice on
the same data and seed: once on each history in time order, once with every
history (training, validation and test input) shuffled by a seeded generator.
The held-out items stay each user's latest, so the second run keeps which items
a user has and loses only their order. The difference is what a model that
reads order can gain over one that reads the history as a set (BPR-MF, EASE,
fedrec's pooled item identities).

Prints a JSON line per variant, writes them all to ``--out``; the last line is
``sasrec_order_hr_delta=<HR@10 in order - HR@10 shuffled>``.

    python benchmarks/sequence_order.py [--seed 0] [--epochs 200] [--loss bce] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedrec.config import load_config
from fedrec.logs import setup_logging
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.sequential_baseline import LOSSES, SasRecSettings, run_sasrec_baseline

FIGURES = ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full", "coverage@10")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="SASRec's initialisation, batches and negatives, and the shuffles")
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--loss", choices=LOSSES, default="bce")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--out", type=Path, default=Path("runs/sequence-order.json"))
    parser.add_argument("--quick", action="store_true", help="100 users, 4 epochs: checks that the script runs")
    args = parser.parse_args()
    setup_logging()
    overrides = {"runtime.threads": args.threads, **({"data.max-users": 100} if args.quick else {})}
    config = load_config(overrides)
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    epochs = 4 if args.quick else args.epochs
    settings = SasRecSettings(epochs=epochs, eval_every=min(10, epochs), loss=args.loss, seed=args.seed)
    rng = np.random.default_rng(args.seed)
    results = {}
    for variant, reorder in (("in-order", None), ("shuffled", rng.permutation)):
        run = run_sasrec_baseline(prepared, settings, config.eval.k, reorder)
        results[variant] = {"best_epoch": run["best_epoch"], "minutes": run["minutes"], **{m: run["test"][m] for m in FIGURES}}
        print(json.dumps({"variant": variant, **results[variant]}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "results": results}, indent=2))
    print(f"sasrec_order_hr_delta={results['in-order']['hr@10'] - results['shuffled']['hr@10']:.4f}")


if __name__ == "__main__":
    main()
