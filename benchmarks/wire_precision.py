"""The HR@10 cost of sending updates as float16 or int8 instead of float32, isolated.

Runs ``--rounds`` federated rounds in one process with the ClientApp's own code
(``run_local_round`` on each client's data, FedAvg weighted by examples), once per
wire type, with the *same* clients each round (drawn from ``--seed``) and the
same client seeds, so the only difference between the runs is the rounding of
the uploads (``fedrec.model.wire``). (Flower samples clients with an unseeded
``random.sample``, so two ``fedrec simulate`` runs never see the same clients:
their HR difference mixes sampling noise with the wire effect.)

Prints a JSON line per wire type (HR@10, NDCG@10 of the final global adapters,
bytes per upload, largest deviation of the global adapters from the float32
run); the last line is ``wire_int8_hr_delta=<HR@10 int8 - HR@10 float32>``.

    python benchmarks/wire_precision.py [--rounds 5] [--clients 9] [--quick]
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedrec.client_data import load_client_data
from fedrec.config import load_config
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.model.wire import decode_update, encode_update
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads

WIRE = ("float32", "float16", "int8")


def _fedavg(updates: list[tuple[OrderedDict, float]]) -> OrderedDict:
    total = sum(weight for _, weight in updates)
    return OrderedDict(
        (key, sum(state[key] * (weight / total) for state, weight in updates))
        for key in updates[0][0]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=9, help="clients per round (default: as the default preset)")
    parser.add_argument("--seed", type=int, default=0, help="which clients are drawn")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny random model, 2 rounds, 3 clients, 100 users")
    args = parser.parse_args()
    overrides = {"runtime.threads": args.threads}
    if args.quick:
        args.rounds, args.clients = 2, 3
        overrides.update({"model.name": "tiny-random", "data.max-users": 100})
    config = load_config(overrides)
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    initial = model.adapters()
    num_users = prepared.num_users
    draws = np.random.default_rng(args.seed)
    chosen = [draws.choice(num_users, size=args.clients, replace=False) for _ in range(args.rounds)]
    final = {}
    for wire in WIRE:
        state = OrderedDict((k, v.clone()) for k, v in initial.items())
        upload_bytes = 0
        for server_round, clients in enumerate(chosen, start=1):
            updates = []
            for client in clients:
                data = load_client_data(config, prepared, int(client), num_users)
                output = run_local_round(config, data, model.table, state, server_round)
                payload = encode_update(output.adapters, state, wire)
                upload_bytes = ArrayRecord(payload).count_bytes()
                updates.append((decode_update(payload, state, wire), float(output.num_examples)))
            state = _fedavg(updates)
        model.set_adapters(state)
        metrics = model.evaluate("test")
        final[wire] = state
        deviation = max(float((state[k] - final["float32"][k]).abs().max()) for k in state)
        print(json.dumps({
            "wire_dtype": wire, "rounds": args.rounds, "clients_per_round": args.clients,
            "upload_bytes": upload_bytes, "max_abs_deviation_from_float32": deviation,
            **{k: metrics[k] for k in ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full")},
        }), flush=True)
        final[wire + "_metrics"] = metrics
    delta = final["int8_metrics"]["hr@10"] - final["float32_metrics"]["hr@10"]
    print(f"wire_int8_hr_delta={delta:.4f}")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
