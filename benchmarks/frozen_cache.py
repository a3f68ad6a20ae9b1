"""Local training throughput with the frozen-layer item cache against without.

Three arms train on the same pooled ML-100K examples, in alternating timed blocks
so that all see the same machine conditions:

* ``all_layers``: LoRA in every layer (the default settings), no cache possible;
* ``top_layers``: LoRA only in ``--layers`` (default 4,5 of MiniLM's 0..5), no cache;
* ``top_layers_cached``: the same, with ``model.cache-frozen-items=true``: item
  texts enter training at the first adapted layer from states computed once.

Prints the figures as JSON; the last line is
``cache_speedup=<cached examples/s / top_layers examples/s>``.

    python benchmarks/frozen_cache.py [--layers 4,5] [--steps 10] [--blocks 3] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

from fedrec.config import load_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.model.frozen_cache import compute_item_states, first_adapted_layer
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.training import make_loader, make_optimizer, train_local


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--layers", default="4,5", help="adapted layers of the cached arms")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each arm")
    parser.add_argument("--users", type=int, default=100, help="users whose examples are pooled")
    parser.add_argument("--negatives", type=int, default=4, help="train.num-negatives")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny random BERT (layers 0,1), 2 blocks of 5 steps")
    args = parser.parse_args()
    if args.quick:
        args.model, args.layers, args.steps, args.blocks = "tiny-random", "1", 5, 2

    base = {"model.name": args.model, "runtime.threads": args.threads, "train.num-negatives": args.negatives}
    arms = {
        "all_layers": load_config(base),
        "top_layers": load_config({**base, "lora.layers": args.layers}),
        "top_layers_cached": load_config({**base, "lora.layers": args.layers, "model.cache-frozen-items": True}),
    }
    configure_threads(arms["all_layers"].runtime)
    prepared = prepare(arms["all_layers"].data, arms["all_layers"].eval)
    runs = {}
    cache_seconds = 0.0
    for name, config in arms.items():
        model = GlobalModel(config, prepared)
        if config.model.cache_frozen_items:
            start = time.perf_counter()
            model.model.item_states = compute_item_states(model.model.encoder, model.table, first_adapted_layer(config.lora))
            cache_seconds = time.perf_counter() - start
            cache_bytes = model.model.item_states.nbytes
        examples = build_examples(prepared.all_train_items[: args.users], config.model.history_items)
        dataset = NextItemDataset(examples, model.table, config.train.num_negatives, config.model.max_user_tokens, seed=0)
        train = dataclasses.replace(config.train, max_steps=args.steps, local_epochs=10**6)
        loader = make_loader(dataset, train.batch_size, seed=0)
        runs[name] = (model, loader, make_optimizer(model.model, train), train)

    totals = {name: [0, 0.0] for name in arms}
    for block in range(args.blocks + 1):  # block 0 warms every arm up and is not timed
        for name, (model, loader, optimizer, train) in runs.items():
            start = time.perf_counter()
            result = train_local(model.model, loader, optimizer, train, model.device)
            if block:
                totals[name][0] += result.examples
                totals[name][1] += time.perf_counter() - start
    rate = {name: n / s for name, (n, s) in totals.items()}
    figures = {
        "model": args.model,
        "layers": args.layers,
        "threads": torch.get_num_threads(),
        "batch_size": arms["all_layers"].train.batch_size,
        "candidates_per_example": 1 + args.negatives,
        "steps_per_block": args.steps,
        "blocks": args.blocks,
        **{f"{name}_examples_per_s": r for name, r in rate.items()},
        "cache_build_seconds": cache_seconds,
        "cache_mb": cache_bytes / 2**20,
        "speedup_vs_all_layers": rate["top_layers_cached"] / rate["all_layers"],
    }
    print(json.dumps(figures, indent=2))
    print(f"cache_speedup={rate['top_layers_cached'] / rate['top_layers']:.4f}")


if __name__ == "__main__":
    main()
