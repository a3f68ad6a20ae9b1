"""Peak memory and time of one local round on a small device (CPU only, few threads).

Runs exactly what a deployed SuperNode's ClientApp runs for one round, in this
process: read the device's interactions file and the catalogue, tokenize the
catalogue into the state folder, build the frozen BERT + LoRA, train one round
(DP-SGD with ``--dp``). Each profile runs in a fresh subprocess, so its peak
resident memory (``ru_maxrss``) is that of one device round alone, Python and
torch included. The device's file is user 1 of ML-100K as ``fedrec deploy
export`` writes it (or the toy data with ``--quick``).

Prints one JSON line per profile; the last line is
``device_round_peak_rss_mb=<peak RSS of the default profile>``.

    python benchmarks/device_round.py [--threads 1] [--dp] [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# name -> run-config overrides; "default" is the project's default model settings.
PROFILES = {
    "default": {},
    "small": {"model.max-user-tokens": 32, "model.history-items": 10, "train.batch-size": 8},
}


def _one_round(args: argparse.Namespace) -> dict:
    """The measured part: everything a device does for one round."""
    start = time.perf_counter()
    import torch

    from fedrec.config import load_config
    from fedrec.deploy.device_data import device_token_table, load_device_data
    from fedrec.local_round import run_local_round
    from fedrec.model.adapters import adapter_state
    from fedrec.model.build import cached_recommender

    run_config = json.loads(args.run_config)
    config = load_config(run_config)
    node_config = json.loads(args.node_config)
    imported = time.perf_counter()
    device = load_device_data(config, node_config)
    table = device_token_table(device.catalogue, config, Path(node_config["state-dir"]))
    model = cached_recommender(config.model, config.lora)
    global_adapters = adapter_state(model.encoder)
    loaded = time.perf_counter()
    output = run_local_round(config, device.client, table, global_adapters, server_round=1)
    done = time.perf_counter()
    return {
        "threads": torch.get_num_threads(),
        "examples": output.num_examples,
        "steps": output.result.steps,
        "import_s": round(imported - start, 2),
        "load_s": round(loaded - imported, 2),
        "round_s": round(done - loaded, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _device_files(run_config: dict, out: Path) -> dict:
    from fedrec.config import load_config
    from fedrec.deploy.export import export_devices
    from fedrec.prepare import prepare

    config = load_config(run_config)
    exported = export_devices(prepare(config.data, config.eval), out, max_users=1)
    user_id, path = next(iter(exported.user_files.items()))
    return {"data-path": str(path), "items-path": str(exported.catalogue), "user-id": user_id,
            "state-dir": str(out / "state")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the device")
    parser.add_argument("--dp", action="store_true", help="DP-SGD (Opacus) round")
    parser.add_argument("--quick", action="store_true", help="tiny random model on toy data (<1 min)")
    parser.add_argument("--run-config", help=argparse.SUPPRESS)  # internal: child process
    parser.add_argument("--node-config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_config:  # the child: measure one round and report
        print(json.dumps(_one_round(args)))
        return

    work = Path(tempfile.mkdtemp(prefix="fedrec-device-"))
    base: dict = {"runtime.device": "cpu", "runtime.threads": args.threads, "client-data": "device"}
    if args.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import toy_run_config

        base.update(toy_run_config(work))
    if args.dp:
        base.update({"dp.enabled": True, "dp.target-epsilon": 8.0})
    node_config = _device_files(base, work / "device")
    results = {}
    for name, overrides in PROFILES.items():
        run_config = {**base, **overrides}
        child = subprocess.run(
            [sys.executable, __file__, "--run-config", json.dumps(run_config),
             "--node-config", json.dumps(node_config)],
            capture_output=True, text=True, check=False,
        )
        if child.returncode != 0:
            sys.exit(f"profile {name} failed:\n{child.stderr[-3000:]}")
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        results[name] = figures
        print(json.dumps({"profile": name, "settings": overrides, "dp": args.dp, **figures}))
    print(f"device_round_peak_rss_mb={results['default']['peak_rss_mb']}")


if __name__ == "__main__":
    main()
