"""What secure aggregation (SecAgg+) costs against plain FedAvg, on the same run.

One Flower simulation, one set of clients: each of N rounds is run twice, once
as plain FedAvg (``FedRecAvg``) and once as SecAgg+ (``SecAggFedRec``), in
alternating order (so that a change in the machine's load hits both alike), each
continuing from the other's adapters. Per round it prints the seconds (the whole
exchange: instructions, local training, aggregation; no evaluation) and the bytes
per client down and up (every message's serialized content, counted by
``server.traffic.TrafficGrid``). The last line is
``secagg_time_ratio=<mean SecAgg+ round / mean FedAvg round>``, leaving out the
run's very first round (FedAvg's round 1, which also loads the model in every
client process).

    python benchmarks/secagg_overhead.py [--rounds 3] [--clients 4] [--model tiny-random|minilm-l6] [--quick]

Data: the first users of ML-100K (cached by any earlier fedrec run), split iid
over the clients; every client trains in every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from statistics import mean

from flwr.app import ArrayRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from clients.client_app import train
from clients.mods import run_config_mod
from clients.secure_aggregation import SECAGG_MODS
from fedrec import records
from fedrec.config import FedRecConfig, load_config
from fedrec.global_model import GlobalModel
from fedrec.prepare import prepare
from server.secure_aggregation import SecAggFedRec
from server.strategy import FedRecAvg
from server.traffic import TrafficGrid

MODES = ("fedavg", "secagg")


def run_config(args: argparse.Namespace, out: Path) -> dict:
    return {
        "num-server-rounds": args.rounds,
        "fraction-train": 1.0,
        "min-train-nodes": args.clients,
        "out-dir": str(out),
        "data.max-users": args.users,
        "partition.scheme": "iid",
        "partition.num-partitions": args.clients,
        "model.name": args.model,
        "train.max-steps": args.steps,
        "train.batch-size": 8,
        "eval.max-users": 1,
        "runtime.threads": 1,
        "secagg.enabled": True,
        "secagg.max-weight": float(args.steps * 8),  # the most examples a client can report
    }


def one_round(
    mode: str,
    grid,
    context: Context,
    config: FedRecConfig,
    arrays: ArrayRecord,
    server_round: int,
) -> tuple[ArrayRecord, dict]:
    """Run one round with ``mode``'s strategy from ``arrays``: (new arrays, its figures)."""
    found = {}

    def keep(_round, new_arrays):
        found["arrays"] = new_arrays

    traffic = TrafficGrid(grid)
    start = time.monotonic()
    if mode == "fedavg":
        FedRecAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=config.federation.min_train_nodes,
            min_available_nodes=config.federation.min_train_nodes,
            weighted_by_key=records.NUM_EXAMPLES,
            arrayrecord_key=records.ARRAYS,
            configrecord_key=records.CONFIG,
            round_offset=server_round - 1,
        ).start(grid=traffic, initial_arrays=arrays, num_rounds=1, evaluate_fn=keep)
        down, up = traffic.per_node()
        figures = {records.BYTES_DOWN_PER_CLIENT: down, records.BYTES_UP_PER_CLIENT: up}
    else:
        strategy = SecAggFedRec(config, context, round_offset=server_round - 1)
        figures = strategy.start(grid, arrays, num_rounds=1, evaluate_fn=keep)[0]
    figures = {records.ROUND: server_round, records.SECONDS: time.monotonic() - start, **figures}
    return found["arrays"], figures


def build_apps(settings: dict, found: dict) -> tuple[ServerApp, ClientApp]:
    """fedrec's train handler behind the SecAgg+ mods; a ServerApp alternating the modes."""

    client = ClientApp(mods=[run_config_mod(settings)])  # run_simulation has no run config
    client.train(mods=SECAGG_MODS)(train)
    server = ServerApp()

    @server.main()
    def main(grid, context):
        config = load_config(settings)
        model = GlobalModel(config, prepare(config.data, config.eval))
        arrays = ArrayRecord(model.adapters())
        found["adapter_bytes"] = arrays.count_bytes()
        for server_round in range(1, config.federation.num_server_rounds + 1):
            order = MODES if server_round % 2 else MODES[::-1]
            for mode in order:
                arrays, figures = one_round(mode, grid, context, config, arrays, server_round)
                found.setdefault(mode, []).append(figures)

    return server, client


def measure(args: argparse.Namespace, folder: Path) -> dict:
    settings = run_config(args, folder)
    config = load_config(settings)
    prepare(config.data, config.eval)  # once, before the clients read the cache
    found: dict = {}
    server, client = build_apps(settings, found)
    run_simulation(
        server_app=server,
        client_app=client,
        num_supernodes=args.clients,
        backend_config={"client_resources": {"num_cpus": 1}},
    )
    if len(found.get("secagg", [])) != args.rounds:
        raise RuntimeError("the simulation did not finish; see its log above")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--model", default="tiny-random", help="tiny-random or minilm-l6")
    parser.add_argument("--steps", type=int, default=2, help="local steps per round (batch 8)")
    parser.add_argument("--users", type=int, default=40, help="first N users of ML-100K")
    parser.add_argument("--quick", action="store_true", help="2 rounds, 3 clients")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.clients, args.users = 2, 3, 24
    logging.getLogger("flwr").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="fedrec-secagg-") as tmp:
        found = measure(args, Path(tmp))

    # FedAvg's round 1 ran first: it also loaded the model in every client process.
    warm = {"fedavg": slice(1, None) if args.rounds > 1 else slice(None), "secagg": slice(None)}
    print(f"{'mode':8} {'round':>5} {'seconds':>8} {'bytes down/client':>18} {'bytes up/client':>16}")
    for server_round in range(args.rounds):
        for mode in MODES:
            r = found[mode][server_round]
            print(
                f"{mode:8} {int(r[records.ROUND]):5d} {r[records.SECONDS]:8.2f} "
                f"{r[records.BYTES_DOWN_PER_CLIENT]:18,.0f} {r[records.BYTES_UP_PER_CLIENT]:16,.0f}"
            )
    summary = {
        "model": args.model,
        "clients": args.clients,
        "rounds": args.rounds,
        "adapter_arrayrecord_bytes": found["adapter_bytes"],
        "secagg_error_bound": max(r[records.SECAGG_ERROR_BOUND] for r in found["secagg"]),
    }
    for mode in MODES:
        rounds = found[mode]
        summary[f"{mode}_seconds_per_round"] = mean(r[records.SECONDS] for r in rounds[warm[mode]])
        for key in (records.BYTES_DOWN_PER_CLIENT, records.BYTES_UP_PER_CLIENT):
            summary[f"{mode}_{key}"] = mean(r[key] for r in rounds)
    print(json.dumps(summary, indent=2))
    ratio = summary["secagg_seconds_per_round"] / summary["fedavg_seconds_per_round"]
    print(f"secagg_time_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
