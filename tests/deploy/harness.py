"""Real Flower deployment processes on 127.0.0.1: a TLS SuperLink, authenticated SuperNodes.

Stopping a process also stops every process it spawned (SuperExec,
ClientApp/ServerApp processes); ``close()`` stops whatever is still running. Logs go to ``<root>/logs/<name>.log``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fedrec.deploy.credentials import (
    NodeKeys,
    TlsFiles,
    generate_node_keys,
    generate_tls,
)
from simulations.runner import free_port, write_run_config

BIN = Path(sys.executable).parent
CONNECTION = "fedrec-test"  # the SuperLink connection name in FLWR_HOME/config.toml


def _bin(name: str) -> str:
    return str(BIN / name)


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll ``condition()`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Deployment:
    """A SuperLink with TLS and SuperNode authentication, and the nodes started against it."""

    root: Path
    port: int = field(default_factory=free_port)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    descendants: list[psutil.Process] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        self.tls: TlsFiles = generate_tls(self.root / "certs", ["127.0.0.1", "localhost"])
        self.env = {
            **os.environ,
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.tls.ca_cert}"\n'
        )

    # -- processes ------------------------------------------------------------

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        with (self.logs / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=self.root,
            )
        self.procs[name] = proc
        return proc

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start_superlink(self) -> None:
        self._start(
            "superlink",
            [
                _bin("flower-superlink"),
                "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--ssl-certfile", str(self.tls.server_cert),
                "--ssl-keyfile", str(self.tls.server_key),
                "--enable-supernode-auth",
                "--database", str(self.root / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
                "--port", str(self.port),
            ],
        )
        wait_for(lambda: _port_open(self.port), 60, "the SuperLink to listen")

    def node_keys(self, name: str) -> NodeKeys:
        return generate_node_keys(self.root / "keys", name)

    def register(self, keys: NodeKeys) -> int:
        """``flwr supernode register``: the node id the SuperLink gave the public key."""
        out = self.flwr(["supernode", "register", str(keys.public_key), CONNECTION, "--format", "json"])
        reply = json.loads(out)
        assert reply.get("success"), f"registering {keys.public_key} failed: {reply}"
        return int(reply["node-id"])

    def start_supernode(
        self,
        name: str,
        keys: NodeKeys,
        node_config: Mapping[str, object],
        ca_cert: Path | None = None,
        max_retries: int | None = None,
    ) -> subprocess.Popen:
        config = " ".join(
            f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in node_config.items()
        )
        command = [
            _bin("flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(ca_cert or self.tls.ca_cert),
            "--auth-supernode-private-key", str(keys.private_key),
            "--port", str(free_port()),
            "--node-config", config,
        ]
        if max_retries is not None:
            command += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return self._start(name, command)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        """Signal a process, its group and every descendant; SIGKILL whatever lingers.

        Flower's SuperExec starts its own session, so the process group alone does
        not reach it or the ClientApp/ServerApp processes it spawned.
        """
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        try:
            family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            family = []
        self.descendants.extend(family)
        for member in family:
            try:
                member.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        _, alive = psutil.wait_procs(family, timeout=timeout)
        for member in alive:
            member.kill()

    def close(self) -> None:
        """Stop every process started here, and their descendants."""
        for name in list(self.procs):
            self.stop(name, timeout=10)
        _, alive = psutil.wait_procs(self.descendants, timeout=5)
        for member in alive:
            try:
                member.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)

    def leftovers(self) -> list[psutil.Process]:
        """Processes started here (or by them) that are still running."""
        return [p for p in self.descendants if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    # -- flwr CLI ---------------------------------------------------------------

    def flwr(self, args: list[str], timeout: float = 60) -> str:
        done = subprocess.run(
            [_bin("flwr"), *args], check=False, env=self.env, capture_output=True, text=True,
            timeout=timeout, cwd=self.root,
        )
        if done.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done.stdout

    def nodes(self) -> list[dict]:
        return json.loads(self.flwr(["supernode", "list", CONNECTION, "--format", "json"]))["nodes"]

    def online(self) -> set[int]:
        return {int(n["node-id"]) for n in self.nodes() if n["status"] == "online"}

    def start_run(self, app_dir: Path, run_config: Mapping[str, object], name: str = "run") -> subprocess.Popen:
        """``flwr run APP CONNECTION --stream`` in the background; output in logs/NAME.log."""
        config_file = write_run_config(self.root / f"{name}-config.toml", run_config)
        return self._start(
            name,
            [_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(config_file), "--stream"],
        )
