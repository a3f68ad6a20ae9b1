"""What Flower and Ray add to a round: one federated round against the same work in one process.

Side by side, with the same settings (MovieLens-100K, the first N users as N
one-user clients, every client in the round, ``train.max-steps`` local steps each):

1. **Federated**: a real simulation (``flwr run``, local SuperLink, Ray, 1 CPU per
   client actor) of 2 rounds. Round 1 includes starting Ray's actors (imports,
   building the model); round 2 is warm. A round's time is the server's
   (metrics.json ``seconds``): sending, every client's round (reading its
   partition, building its examples, training), replies, FedAvg, then server-side
   evaluation of ``--eval-users`` users and a checkpoint. That evaluation and
   checkpoint are timed separately here (same settings, this process) and
   subtracted, so the compared figure holds no server evaluation.
2. **Central, same client rounds**: the same N client rounds (``load_client_data``
   + ``run_local_round``, the code the ClientApp runs) one after another in this
   process, then the same weighted average; the model is built before the clock
   starts (as in the warm round). No Flower, no Ray, no messages.
3. **Central, pooled** (for reference): ``train_local`` on the N users' pooled
   examples for N x ``train.max-steps`` steps, one optimizer.

The last line is ``federation_overhead_ratio=<federated warm round without server
evaluation / central same client rounds>``.

    python benchmarks/federation_overhead.py [--clients 10] [--model minilm-l6] [--quick]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedrec.client_data import load_client_data
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.logs import setup_logging
from fedrec.model.adapters import adapter_state
from fedrec.model.build import cached_recommender, token_table
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.training import make_loader, make_optimizer, train_local
from simulations.monitor import TreeMemory
from simulations.runner import resolve_settings, simulate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import MODELS, scale_settings  # benchmarks/ is not a package

ROUNDS = 2


def federated(settings: dict, out: Path) -> dict:
    """Two rounds through Flower; each round's server-side seconds."""
    start = time.perf_counter()
    with TreeMemory() as memory:
        results = simulate(None, settings, out_dir=out / "federated", stream=False)
    return {
        "round_seconds": [float(r["seconds"]) for r in results["rounds"]],
        "clients_per_round": [int(r["clients"]) for r in results["rounds"]],
        "train_steps_per_client": [float(r["train_steps"]) for r in results["rounds"]],
        "whole_run_seconds": time.perf_counter() - start,
        "client_actor_processes": memory.kinds().get("ray::ClientAppActor", 0),
        "peak_rss_gb": memory.report()["peak_rss_gb"],
        "load_average_1min_mean": memory.report()["load_average_1min_mean"],
    }


def central_client_rounds(config, prepared, clients: int) -> dict:
    """The N client rounds of one federated round, in this process, plus their average."""
    table = token_table(prepared, config.model)
    model = cached_recommender(config.model, config.lora)  # built before the clock, as in a warm actor
    initial = {k: v.clone() for k, v in adapter_state(model.encoder).items()}
    start = time.perf_counter()
    outputs = []
    for partition_id in range(clients):
        data = load_client_data(config, prepared, partition_id, clients)
        outputs.append(run_local_round(config, data, table, initial, server_round=1))
    weights = torch.tensor([float(o.result.examples) for o in outputs])
    weights /= weights.sum()
    average = {k: sum(w * o.adapters[k] for w, o in zip(weights, outputs)) for k in initial}
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "load_average_1min_after": os.getloadavg()[0],
        "steps": sum(o.result.steps for o in outputs),
        "examples": sum(o.result.examples for o in outputs),
        "adapter_values_averaged": sum(v.numel() for v in average.values()),
    }


def central_pooled(config, prepared, clients: int, steps: int) -> dict:
    """``steps`` steps of one optimizer on the N users' pooled examples."""
    model = GlobalModel(config, prepared)
    examples = build_examples(prepared.all_train_items[:clients], config.model.history_items)
    dataset = NextItemDataset(examples, model.table, config.train.num_negatives, config.model.max_user_tokens, seed=0)
    train = dataclasses.replace(config.train, max_steps=steps, local_epochs=10**6)
    optimizer = make_optimizer(model.model, train)
    start = time.perf_counter()
    result = train_local(model.model, make_loader(dataset, train.batch_size, seed=0), optimizer, train, model.device)
    return {
        "seconds": time.perf_counter() - start,
        "steps": result.steps,
        "examples": result.examples,
        "load_average_1min_after": os.getloadavg()[0],
    }


def server_evaluation(config, prepared) -> float:
    """Seconds of what the server does after aggregating: evaluate and checkpoint."""
    model = GlobalModel(config, prepared)
    model.evaluate("test")  # warm-up: the server's own baselines did this before round 1
    start = time.perf_counter()
    model.evaluate("test")
    with tempfile.TemporaryDirectory() as folder:
        model.checkpoint(Path(folder), 1)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--model", default="minilm-l6", choices=sorted(MODELS))
    parser.add_argument("--steps", type=int, default=0, help="train.max-steps per client (0: the model's default)")
    parser.add_argument("--eval-users", type=int, default=10, help="users of the server evaluation (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads of the central runs (0: all cores)")
    parser.add_argument("--out", default="runs/federation_overhead")
    parser.add_argument("--quick", action="store_true", help="4 clients, tiny model, 1 step (about 1.5 min on 2 cores, mostly start-up)")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.model, args.steps, args.eval_users = 4, "tiny-random", 1, 5
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = scale_settings(args.clients, args.model, ROUNDS, per_round=args.clients, eval_users=args.eval_users)
    if args.steps:
        settings["train.max-steps"] = args.steps
    central_settings = {**settings, "runtime.threads": args.threads}
    config, _ = resolve_settings(None, central_settings, out / "central")
    threads = configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)

    fed = federated(settings, out)
    same = central_client_rounds(config, prepared, args.clients)
    pooled = central_pooled(config, prepared, args.clients, same["steps"])
    server_eval = server_evaluation(config, prepared)
    cold, warm = fed["round_seconds"][0], fed["round_seconds"][-1]
    figures = {
        "clients": args.clients,
        "model": args.model,
        "train_max_steps": config.train.max_steps,
        "batch_size": config.train.batch_size,
        "central_threads": threads,
        "federated": fed,
        "server_evaluation_seconds": server_eval,
        "federated_cold_round_without_eval_seconds": cold - server_eval,
        "federated_warm_round_without_eval_seconds": warm - server_eval,
        "central_same_client_rounds": same,
        "central_pooled": pooled,
        "ratio_warm": (warm - server_eval) / same["seconds"],
        "ratio_cold": (cold - server_eval) / same["seconds"],
        "ratio_warm_vs_pooled": (warm - server_eval) / pooled["seconds"],
        "settings": settings,
    }
    (out / f"federation_overhead-{args.clients}-{args.model}.json").write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))
    print(
        f"\n{args.clients} clients x {config.train.max_steps} steps (batch {config.train.batch_size}, {args.model}):\n"
        f"  federated round 1 (cold: Ray actors start, import, build the model): {cold:.1f} s\n"
        f"  federated round 2 (warm): {warm:.1f} s\n"
        f"  server evaluation ({args.eval_users} users, all items encoded) + checkpoint, timed here: {server_eval:.1f} s\n"
        f"    -> subtracted from both rounds: cold {cold - server_eval:.1f} s, warm {warm - server_eval:.1f} s\n"
        f"  central, same {args.clients} client rounds in one process ({threads} threads; "
        f"reading partitions, building examples, {same['steps']} steps, averaging): {same['seconds']:.1f} s\n"
        f"  central, pooled examples, {pooled['steps']} steps of one optimizer: {pooled['seconds']:.1f} s\n"
        f"  not in any figure: data preparation, SuperLink/Ray start-up before round 1, the server's "
        f"baseline evaluations (whole federated run: {fed['whole_run_seconds']:.1f} s)\n"
        f"  cold ratio {figures['ratio_cold']:.3f}; warm vs pooled {figures['ratio_warm_vs_pooled']:.3f}"
    )
    print(f"federation_overhead_ratio={figures['ratio_warm']:.4f}")


if __name__ == "__main__":
    main()
