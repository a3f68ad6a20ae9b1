"""Local training throughput with Opacus DP-SGD against without, same model and data.

Trains the same LoRA recommender on the same pooled ML-100K examples, alternating
blocks of plain steps and DP-SGD steps (hooks mode, Poisson sampling, clipping,
noise) so that both see the same machine conditions. Prints the figures as JSON;
the last line is ``dp_overhead_ratio=<private examples/s / plain examples/s>``.

    python benchmarks/dp_overhead.py [--model minilm-l6] [--steps 10] [--blocks 3] [--quick]
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
from fedrec.prepare import prepare
from fedrec.privacy.accounting import AccountantState
from fedrec.privacy.dp_sgd import detach_private, make_private
from fedrec.runtime import configure_threads
from fedrec.training import make_loader, make_optimizer, train_local


def _block(model, loader, optimizer, train, device) -> tuple[int, float]:
    """Run one block of steps; return (examples, seconds)."""
    start = time.perf_counter()
    result = train_local(model, loader, optimizer, train, device)
    return result.examples, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks of each kind")
    parser.add_argument("--users", type=int, default=100, help="users whose examples are pooled")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: all cores)")
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 2 blocks of 5 steps")
    args = parser.parse_args()
    if args.quick:
        args.model, args.steps, args.blocks = "tiny-random", 5, 2

    config = load_config({"model.name": args.model, "runtime.threads": args.threads})
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    examples = build_examples(prepared.all_train_items[: args.users], config.model.history_items)
    dataset = NextItemDataset(
        examples, model.table, config.train.num_negatives, config.model.max_user_tokens, seed=0
    )
    train = dataclasses.replace(config.train, max_steps=args.steps, local_epochs=10**6)
    net, device = model.model, model.device

    plain_opt = make_optimizer(net, train)
    plain_loader = make_loader(dataset, train.batch_size, seed=0)
    totals = {"plain": [0, 0.0], "private": [0, 0.0]}
    for block in range(args.blocks + 1):  # block 0 warms both up and is not timed
        examples_seen, seconds = _block(net, plain_loader, plain_opt, train, device)
        if block:
            totals["plain"][0] += examples_seen
            totals["plain"][1] += seconds
        private_model, private_opt, private_loader, _ = make_private(
            net, make_optimizer(net, train), make_loader(dataset, train.batch_size, seed=block),
            config.dp, 1.0, AccountantState(config.dp.accountant),
        )
        try:
            examples_seen, seconds = _block(private_model, private_loader, private_opt, train, device)
        finally:
            detach_private(private_model)
        if block:
            totals["private"][0] += examples_seen
            totals["private"][1] += seconds

    rate = {k: n / s for k, (n, s) in totals.items()}
    figures = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "batch_size": train.batch_size,
        "steps_per_block": args.steps,
        "blocks": args.blocks,
        "plain_examples_per_s": rate["plain"],
        "private_examples_per_s": rate["private"],
        "plain_seconds_per_step": totals["plain"][1] / (args.steps * args.blocks),
        "private_seconds_per_step": totals["private"][1] / (args.steps * args.blocks),
    }
    print(json.dumps(figures, indent=2))
    print(f"dp_overhead_ratio={rate['private'] / rate['plain']:.4f}")


if __name__ == "__main__":
    main()
