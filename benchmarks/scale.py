"""A real federated simulation at scale: wall time per round and peak memory.

Runs ``simulations.runner.simulate`` (``flwr run``, local SuperLink, Ray) with one
user per client:

* ``--clients N <= 943``: MovieLens-100K, the first N users (all 943 by default),
  every client trains in every round (``fraction-train=1.0``);
* ``--clients N > 943``: the synthetic dataset with N users (``data.name=synthetic``),
  ``--per-round`` clients sampled per round (default 100).

The model is the tiny random BERT of the smoke preset unless ``--model minilm-l6``.
Server-side evaluation is cut to ``--eval-users`` users (default 50) so that the
round time is mostly the clients' rounds; it is still inside the round time
(``seconds`` of metrics.json: training, aggregation, evaluation, checkpoint).

A background thread sums the RSS of every process under this one (SuperLink,
simulation process, Ray's raylet, GCS and workers) every 0.5 s. Writes
``OUT/scale-<N>-<model>.json``, prints the figures; the last line is
``peak_rss_gb=<peak of the summed RSS>``.

    python benchmarks/scale.py [--clients 943] [--rounds 1] [--model tiny-random] [--quick]
    python benchmarks/scale.py --curve [--reuse]   # 10, 100, 943 and 10,000 (synthetic) clients:
                                                   # OUT/scaling_curve.csv and scaling_curve.png
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from fedrec.logs import setup_logging
from simulations.monitor import TreeMemory
from simulations.runner import simulate

ML100K_USERS = 943
CURVE = (10, 100, 943, 10_000)
MODELS: dict[str, dict[str, Any]] = {
    # the smoke preset's model and training settings
    "tiny-random": {
        "model.name": "tiny-random",
        "model.max-user-tokens": 32,
        "model.max-item-tokens": 16,
        "train.max-steps": 2,
        "train.batch-size": 8,
        "train.lr": 0.005,
    },
    # the default preset's, without DP
    "minilm-l6": {"model.name": "minilm-l6", "train.max-steps": 4, "train.batch-size": 16},
}

log = logging.getLogger("fedrec.benchmarks.scale")


def scale_settings(clients: int, model: str, rounds: int, per_round: int, eval_users: int) -> dict[str, Any]:
    """Run-config overrides for ``clients`` one-user clients (see the module docstring)."""
    if model not in MODELS:
        raise ValueError(f"--model {model!r}: choose one of {', '.join(MODELS)}")
    settings: dict[str, Any] = {
        **MODELS[model],
        "num-server-rounds": rounds,
        "min-train-nodes": 2,
        "partition.scheme": "user",
        "eval.max-users": eval_users,
        "dp.enabled": False,
        "federation.client-resources-num-cpus": 1,
    }
    if clients <= ML100K_USERS:
        settings.update({"data.name": "ml-100k", "data.max-users": 0 if clients == ML100K_USERS else clients})
        settings["fraction-train"] = 1.0
    else:
        settings.update({"data.name": "synthetic", "data.synthetic-users": clients})
        settings["fraction-train"] = min(1.0, per_round / clients)
    return settings


def run_scale(clients: int, model: str, rounds: int, per_round: int, eval_users: int, out: Path) -> dict[str, Any]:
    """One simulation under the memory sampler; its figures as a dict."""
    settings = scale_settings(clients, model, rounds, per_round, eval_users)
    run_dir = out / f"run-{clients}-{model}"
    log.info("%d clients, %s, %d round(s): %s", clients, model, rounds, settings)
    start = time.perf_counter()
    with TreeMemory(interval=0.5) as memory:
        results = simulate(None, settings, out_dir=run_dir, stream=False)
    wall = time.perf_counter() - start
    rounds_run = results["rounds"]
    round_seconds = [float(r["seconds"]) for r in rounds_run]
    actors = memory.kinds().get("ray::ClientAppActor", 0)
    figures = {
        "clients": clients,
        "dataset": results["dataset"],
        "model": model,
        "rounds": len(rounds_run),
        "clients_per_round": [int(r["clients"]) for r in rounds_run],
        "failures_per_round": [int(r.get("failures", 0)) for r in rounds_run],
        "round_seconds": round_seconds,
        "mean_round_seconds": sum(round_seconds) / len(round_seconds),
        "seconds_per_client": sum(round_seconds) / max(1, sum(int(r["clients"]) for r in rounds_run)),
        "whole_run_seconds": wall,
        "client_actor_processes": actors,
        **memory.report(),
        "hr@10_last_round": rounds_run[-1].get("hr@10"),
        "eval_users": eval_users,
        "settings": settings,
        "what_round_seconds_holds": (
            "server-side wall time of the round: sampling, sending, every sampled client's "
            "training, aggregation, then server evaluation of eval.max-users users (all items "
            "encoded) and a checkpoint. whole_run_seconds adds data preparation, SuperLink and "
            "Ray start-up, the two baseline evaluations and shut-down."
        ),
    }
    (out / f"scale-{clients}-{model}.json").write_text(json.dumps(figures, indent=2))
    return figures


def print_figures(figures: dict[str, Any]) -> None:
    print(
        f"{figures['clients']} clients ({figures['dataset']['name']}, {figures['model']}), "
        f"{figures['rounds']} round(s) of {figures['clients_per_round']} clients: "
        f"round seconds {', '.join(f'{s:.1f}' for s in figures['round_seconds'])} "
        f"({figures['seconds_per_client']:.3f} s per client), whole run {figures['whole_run_seconds']:.1f} s; "
        f"peak RSS summed over {figures['peak_processes']} processes {figures['peak_rss_gb']:.2f} GiB, "
        f"largest process {figures['max_process_rss_gb']:.2f} GiB ({figures['max_process_kind']}); "
        f"client actor processes {figures['client_actor_processes']}"
    )


def write_curve(rows: list[dict[str, Any]], out: Path) -> None:
    """scaling_curve.csv and scaling_curve.png (round time against clients, log x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = ("clients", "dataset", "clients_per_round", "mean_round_seconds", "seconds_per_client",
               "whole_run_seconds", "peak_rss_gb", "max_process_rss_gb", "client_actor_processes")
    with (out / "scaling_curve.csv").open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([
                r["clients"], r["dataset"]["name"], r["clients_per_round"][0],
                f"{r['mean_round_seconds']:.2f}", f"{r['seconds_per_client']:.4f}",
                f"{r['whole_run_seconds']:.1f}", r["peak_rss_gb"], r["max_process_rss_gb"],
                r["client_actor_processes"],
            ])  # fmt: skip
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["clients"] for r in rows]
    left.plot(x, [r["mean_round_seconds"] for r in rows], "o-")
    for r in rows:
        left.annotate(f"{r['clients_per_round'][0]}/round", (r["clients"], r["mean_round_seconds"]),
                      textcoords="offset points", xytext=(4, 4), fontsize=8)  # fmt: skip
    left.set(xscale="log", xlabel="clients in the federation", ylabel="seconds per round",
             title="round wall time")  # fmt: skip
    right.plot(x, [r["peak_rss_gb"] for r in rows], "o-", label="sum over process tree")
    right.plot(x, [r["max_process_rss_gb"] for r in rows], "s--", label="largest process")
    right.set(xscale="log", xlabel="clients in the federation", ylabel="GiB", title="peak RSS")
    right.legend()
    fig.tight_layout()
    fig.savefig(out / "scaling_curve.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=ML100K_USERS, help="one user per client (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--model", default="tiny-random", choices=sorted(MODELS))
    parser.add_argument("--per-round", type=int, default=100, help="clients per round above 943 (default: %(default)s)")
    parser.add_argument("--eval-users", type=int, default=50, help="users of the server evaluation (default: %(default)s)")
    parser.add_argument("--out", default="runs/scale", help="results folder (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="20 clients, tiny model, 1 round (about 1.5 min on 2 cores, mostly start-up)")
    parser.add_argument("--curve", action="store_true", help=f"run {', '.join(map(str, CURVE))} clients; CSV + PNG")
    parser.add_argument("--reuse", action="store_true", help="take sizes already measured from OUT/scale-N-MODEL.json")
    args = parser.parse_args()
    setup_logging()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        args.clients, args.model, args.rounds, args.eval_users = 20, "tiny-random", 1, 20
    sizes = CURVE if args.curve else (args.clients,)
    rows = []
    for clients in sizes:
        earlier = out / f"scale-{clients}-{args.model}.json"
        if args.reuse and earlier.exists():
            figures = json.loads(earlier.read_text())
            log.info("reusing %s", earlier)
        else:
            figures = run_scale(clients, args.model, args.rounds, args.per_round, args.eval_users, out)
        print_figures(figures)
        rows.append(figures)
        if args.curve:
            write_curve(rows, out)  # after every size, so a stopped curve keeps its points
    if args.curve:
        print(f"curve: {out / 'scaling_curve.csv'} {out / 'scaling_curve.png'}")
    print(f"peak_rss_gb={max(r['peak_rss_gb'] for r in rows):.3f}")


if __name__ == "__main__":
    main()
