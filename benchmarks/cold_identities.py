"""Cold items with item identities: trained as negatives only, or new after training.

A run with ``eval.cold-items`` keeps its cold items in the catalogue during
training, with no interactions: clients draw them as sampled negatives, so with
``model.item-ids`` their identity vectors learn only to keep them away from
users. An item that joins the catalogue after training instead keeps the zero
vector it was created with and is scored from its text. This script evaluates
one checkpoint of such a run both ways: as trained, and with the identity rows
of every item without interactions set back to zero (the new-item case). Only
those rows differ, so the warm figures barely move.

Prints a JSON line per variant and writes them to ``--out``; the last line is
``cold_hr10_new_minus_trained=<difference>``.

    python benchmarks/cold_identities.py --model RUN [--round N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from fedrec.evaluation import histories_for
from fedrec.logs import setup_logging
from fedrec.model.item_identity import zero_identities
from fedrec.reevaluate import load_run

FIGURES = ("hr@10", "ndcg@10", "hr@10_full", "hr@10_cold", "ndcg@10_cold", "hr@10_full_cold", "ndcg@10_full_cold")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a fedrec simulate run with eval.cold-items and model.item-ids")
    parser.add_argument("--round", type=int, default=None, help="checkpoint round (default: the last)")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="default: RUN/evaluations/cold-identities-round-N.json")
    args = parser.parse_args()
    setup_logging()
    model, server_round = load_run(args.model, args.round, {"runtime.threads": args.threads})
    if not model.prepared.has_cold_test or model.model.item_identity is None:
        raise SystemExit(f"{args.model}: needs a run with eval.cold-items > 0 and model.item-ids = true")
    interacted = np.unique(np.concatenate(histories_for(model.prepared, "all")))
    never = np.setdiff1d(np.arange(model.prepared.num_items), interacted)
    results = {"round": server_round, "items_without_interactions": len(never)}
    for variant in ("as-trained", "new-after-training"):
        if variant == "new-after-training":
            zero_identities(model.model.item_identity, never)
        metrics = model.evaluate("test")
        results[variant] = {name: metrics[name] for name in FIGURES}
        print(json.dumps({"variant": variant, **results[variant]}), flush=True)
    out = args.out or args.model / "evaluations" / f"cold-identities-round-{server_round}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    gain = results["new-after-training"]["hr@10_cold"] - results["as-trained"]["hr@10_cold"]
    print(f"cold_hr10_new_minus_trained={gain:.4f}")


if __name__ == "__main__":
    main()
