"""Run a fedrec simulation through Flower (``flwr run``), from Python or the CLI.

The runner merges a preset with overrides, validates the settings, prepares the
data once (so every virtual client reads a cached partition), works out how many
virtual clients the partitioning makes, and starts ``flwr run`` on fedrec's app
with matching federation settings: ``num-supernodes``, CPUs per client (so that
clients run side by side without oversubscribing cores) and a GPU fraction per
client when CUDA is present. Results land in ``OUT/metrics.json``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import psutil
import torch
from flwr.common.config import parse_config_args

from fedrec.client_data import num_partitions_for
from fedrec.config import (
    ConfigError,
    FedRecConfig,
    RunConfigValue,
    load_config,
    to_run_config,
)
from fedrec.partition import resolve_num_partitions
from fedrec.prepare import prepare
from fedrec.results import METRICS_FILE

log = logging.getLogger("fedrec.simulations")

PRESETS_DIR = Path(__file__).parent / "presets"
APP_DIR = Path(__file__).resolve().parent.parent
LOCAL_SUPERLINK_FLAG = "--simulation"
# Flower's local SuperLink reads its ports from these (flwr/cli/constant.py).
SUPERLINK_PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"
CONTROL_PORT_ENV = "FLWR_LOCAL_CONTROL_API_PORT"


class SimulationError(RuntimeError):
    """The Flower run failed; the message says where its log is."""


@dataclass(frozen=True)
class Resources:
    """Resources of each virtual client (Flower federation settings)."""

    num_cpus: float
    num_gpus: float


def preset_names() -> list[str]:
    """Names of the bundled presets."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name: str) -> dict[str, Any]:
    """The settings of a preset: flat run-config keys plus a ``[federation]`` table."""
    path = PRESETS_DIR / f"{name}.toml"
    if not path.exists():
        raise ValueError(f"unknown preset '{name}'; known presets: {', '.join(preset_names())}")
    with path.open("rb") as file:
        data = tomllib.load(file)
    return _flatten(data)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_settings(
    preset: str | None, overrides: Mapping[str, RunConfigValue], out_dir: Path | None
) -> tuple[FedRecConfig, dict[str, Any]]:
    """(validated config, federation settings) from a preset and overrides."""
    merged: dict[str, Any] = load_preset(preset) if preset else {}
    merged.update(overrides)
    federation = {k.removeprefix("federation."): v for k, v in merged.items() if k.startswith("federation.")}
    run_config = {k: v for k, v in merged.items() if not k.startswith("federation.")}
    if out_dir is not None:
        run_config["out-dir"] = str(out_dir)
    config = load_config(run_config)
    return config, federation


def client_resources(federation: Mapping[str, Any]) -> Resources:
    """CPUs and GPU fraction per virtual client.

    Defaults: 1 CPU per client (so a 2-core machine runs two clients side by side,
    each with one torch thread) and, when CUDA is present, a GPU fraction that lets
    ``gpu-clients`` clients (default 4) share each GPU.
    """
    cpus = float(federation.get("client-resources-num-cpus", 1))
    if "client-resources-num-gpus" in federation:
        gpus = float(federation["client-resources-num-gpus"])
    elif torch.cuda.is_available():
        gpus = 1.0 / int(federation.get("gpu-clients", 4))
    else:
        gpus = 0.0
    return Resources(cpus, gpus)


def _absolute(config: FedRecConfig) -> dict[str, RunConfigValue]:
    """Run config with paths made absolute (Flower runs the app in another cwd)."""
    flat = to_run_config(config)
    flat["out-dir"] = str(Path(config.federation.out_dir).expanduser().resolve())
    flat["data.cache-dir"] = str(config.data.cache_path.resolve())
    for key in ("data.path", "data.items-path"):
        if flat[key]:
            flat[key] = str(Path(str(flat[key])).expanduser().resolve())
    return flat


def _toml_value(value: RunConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_run_config(path: Path, run_config: Mapping[str, RunConfigValue]) -> Path:
    """Write run-config values as the TOML file ``flwr run --run-config FILE`` takes."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _local_superlinks(port: str | None = None) -> list[psutil.Process]:
    """Local (simulation) SuperLinks started by `flwr run`; only the one on ``port`` if given."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not (any(c.endswith("flower-superlink") for c in cmd[:2]) and LOCAL_SUPERLINK_FLAG in cmd):
            continue
        if port is None or ("--port" in cmd and cmd[cmd.index("--port") + 1] == port):
            found.append(proc)
    return found


def stop_superlinks(procs: list[psutil.Process]) -> None:
    """Terminate the given SuperLink processes and their children."""
    for proc in procs:
        try:
            children = proc.children(recursive=True)
            for p in [proc, *children]:
                p.terminate()
            psutil.wait_procs([proc, *children], timeout=10)
        except psutil.NoSuchProcess:
            continue


def simulate(
    preset: str | None = "default",
    overrides: Mapping[str, RunConfigValue] | None = None,
    out_dir: Path | None = None,
    stream: bool = True,
    keep_superlink: bool = False,
) -> dict[str, Any]:
    """Run a simulation with ``flwr run`` and return the parsed ``metrics.json``."""
    config, federation = resolve_settings(preset, overrides or {}, out_dir)
    prepared = prepare(config.data, config.eval)
    num_clients = resolve_num_partitions(
        config.partition, prepared.num_users, int(federation.get("num-supernodes", 10))
    )
    num_partitions_for(config, prepared, num_clients)
    resources = client_resources(federation)
    run_config = _absolute(config)
    out = Path(str(run_config["out-dir"]))
    out.mkdir(parents=True, exist_ok=True)
    config_file = write_run_config(out / "run_config.toml", run_config)
    federation_config = (
        f"num-supernodes={num_clients} "
        f"client-resources-num-cpus={resources.num_cpus:g} "
        f"client-resources-num-gpus={float(resources.num_gpus)}"
    )
    command = [
        str(Path(sys.executable).with_name("flwr")),
        "run",
        str(APP_DIR),
        "--run-config",
        str(config_file),
        "--federation-config",
        federation_config,
        "--stream",  # without it `flwr run` returns as soon as the run is submitted
    ]
    # Flower starts `flower-superlink` by name: put this environment's scripts first.
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    # Flower's engine calls ray.init() with no address, which joins whatever cluster
    # /tmp/ray/ray_current_cluster names, even one long dead (ray.init then hangs and
    # the simulation crashes). A private Ray instance unless RAY_ADDRESS asks for a
    # cluster (simulations/multinode.sh sets it).
    env.setdefault("RAY_ADDRESS", "local")
    # Each call gets its own local SuperLink on free ports, with its own state under
    # OUT/flwr-home (unless FLWR_HOME is set), so concurrent simulations (a sweep
    # beside a long run) never share one, and stopping ours stops no other.
    env.setdefault("FLWR_HOME", str(out / "flwr-home"))
    port = env.get(SUPERLINK_PORT_ENV) or str(free_port())
    env[SUPERLINK_PORT_ENV] = port
    env.setdefault(CONTROL_PORT_ENV, str(free_port()))
    running_before = {p.pid for p in _local_superlinks(port)}
    log.info("%d virtual clients, %s; running: %s", num_clients, resources, " ".join(command))
    try:
        if stream:
            completed = subprocess.run(command, env=env, check=False)
        else:  # Flower's log goes to OUT/flwr.log, where the error below points
            with (out / "flwr.log").open("w") as flwr_log:
                completed = subprocess.run(
                    command, env=env, check=False, stdout=flwr_log, stderr=subprocess.STDOUT
                )
    finally:
        if not keep_superlink:
            stop_superlinks([p for p in _local_superlinks(port) if p.pid not in running_before])
    metrics_path = out / METRICS_FILE
    if completed.returncode != 0 or not metrics_path.exists():
        raise SimulationError(
            f"`flwr run` exited with {completed.returncode} and wrote no {metrics_path}; "
            f"see {'the log above' if stream else out / 'flwr.log'} "
            "(and $FLWR_HOME/local-superlink/superlink.log)"
        )
    results = json.loads(metrics_path.read_text())
    if len(results["rounds"]) < config.federation.num_server_rounds:
        raise SimulationError(
            f"{metrics_path} has {len(results['rounds'])} of "
            f"{config.federation.num_server_rounds} rounds; the run stopped early "
            f"(see {'the log above' if stream else out / 'flwr.log'})"
        )
    return results


def parse_overrides(text: list[str] | None) -> dict[str, RunConfigValue]:
    """``["k=v k2=v2", ...]`` -> dict, with TOML value types (as ``flwr run``)."""
    if not text:
        return {}
    try:
        return parse_config_args(text)
    except click.ClickException as err:  # Flower's parser: say which option was wrong
        raise ConfigError(f"--run-config {' '.join(text)!r}: {err.message}") from err
