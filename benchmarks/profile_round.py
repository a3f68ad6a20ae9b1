"""Where a client's local round spends its time: a per-phase profile.

Runs the steps of one client round (the pooled examples of ``--users`` ML-100K
users, the run's model and LoRA settings) and times each phase of every step:
fetching the batch (tokens, negatives), the user tower's forward, the item
tower's forward (1 positive + negatives per example), the backward pass and
the optimizer step. Run it with the settings before and after an optimisation
(e.g. ``--run-config "lora.layers='4,5' model.cache-frozen-items=true"``) to see
what moved. Writes JSON to ``--out``; the last line is
``seconds_per_step=<mean wall time of one step>``.

    python benchmarks/profile_round.py [--run-config "..."] [--steps 20] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from fedrec.config import load_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.model.frozen_cache import compute_item_states, first_adapted_layer
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.training import make_loader, make_optimizer
from simulations.runner import parse_overrides

PHASES = ("batch", "user_tower", "item_tower", "backward", "optimizer")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-config", action="append", help="settings, as for fedrec simulate")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 3 warm-up steps)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="tiny random BERT, 5 steps")
    parser.add_argument("--out", default="runs/benchmarks/profile_round.json")
    args = parser.parse_args()
    overrides = parse_overrides(args.run_config)
    if args.quick:
        overrides.setdefault("model.name", "tiny-random")
        args.steps = 5
    config = load_config(overrides)
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    global_model = GlobalModel(config, prepared)
    model, device = global_model.model, global_model.device
    if config.model.cache_frozen_items:
        model.item_states = compute_item_states(model.encoder, global_model.table, first_adapted_layer(config.lora))
    examples = build_examples(prepared.all_train_items[: args.users], config.model.history_items)
    dataset = NextItemDataset(examples, global_model.table, config.train.num_negatives, config.model.max_user_tokens, 0)
    loader = iter(make_loader(dataset, config.train.batch_size, seed=0))
    optimizer = make_optimizer(model, config.train)
    model.train()
    seconds: dict[str, float] = defaultdict(float)
    for step in range(3 + args.steps):
        marks = [time.perf_counter()]
        batch = {k: v.to(device) for k, v in next(loader).items()}
        marks.append(time.perf_counter())
        users = model.embed(batch["user_ids"], batch["user_mask"])
        marks.append(time.perf_counter())
        candidates = model.embed_candidates(batch["item_ids"], batch["item_mask"], batch["items"])
        logits = torch.einsum("bd,bcd->bc", users, candidates) / model.temperature
        marks.append(time.perf_counter())
        loss = nn.functional.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        marks.append(time.perf_counter())
        optimizer.step()
        marks.append(time.perf_counter())
        if step >= 3:
            for phase, start, end in zip(PHASES, marks, marks[1:]):
                seconds[phase] += end - start
    total = sum(seconds.values())
    figures = {
        "settings": {k: v for k, v in overrides.items()},
        "model": config.model.name,
        "lora_layers": config.lora.layers or "all",
        "cache_frozen_items": config.model.cache_frozen_items,
        "threads": torch.get_num_threads(),
        "batch_size": config.train.batch_size,
        "candidates": 1 + config.train.num_negatives,
        "steps": args.steps,
        "ms_per_step": {phase: 1e3 * seconds[phase] / args.steps for phase in PHASES},
        "share": {phase: seconds[phase] / total for phase in PHASES},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    for phase in PHASES:
        print(f"{phase:<12} {figures['ms_per_step'][phase]:9.1f} ms  {100 * figures['share'][phase]:5.1f} %")
    print(f"seconds_per_step={total / args.steps:.4f}")


if __name__ == "__main__":
    main()
