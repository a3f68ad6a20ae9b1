"""Memory of a simulation's whole process tree, sampled in a background thread.

A simulation is many processes: this one, ``flwr run``, the local SuperLink, the
simulation process and Ray's raylet, GCS and one worker per client actor. The
sampler walks the tree under this process every ``interval`` seconds and keeps
the peak of the summed resident set sizes, the largest single process and the
distinct processes seen by kind (e.g. how many ``ray::ClientAppActor`` workers).

The sum counts shared pages (libraries, Ray's object store) once per process
that maps them, so it over-states what the machine needs; the largest single
process is a lower bound.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

import psutil

GIB = 1024**3


def process_kind(proc: psutil.Process) -> str:
    """A short name for what a process is: Ray's title (``ray::ClientAppActor``) or the program."""
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return "?"
    if not cmdline:
        return proc.name()
    first = cmdline[0].split()[0]
    if first.startswith("ray::"):
        return first.split(".")[0]  # "ray::ClientAppActor.run" -> "ray::ClientAppActor"
    program = first.rsplit("/", 1)[-1]
    if program.startswith("python") and len(cmdline) > 1:  # name the script or module run
        script = cmdline[2] if cmdline[1] == "-m" and len(cmdline) > 2 else cmdline[1]
        return f"{program} {script.rsplit('/', 1)[-1]}"
    return program


@dataclass
class TreeMemory:
    """Peak memory of the process tree under ``root`` (default: this process)."""

    interval: float = 0.5
    root: int | None = None
    peak_total: int = 0
    """Largest sum of RSS over the tree at one sample, bytes."""
    peak_single: int = 0
    """Largest RSS of one process, bytes."""
    peak_single_kind: str = ""
    peak_processes: int = 0
    """Most processes in the tree at one sample."""
    samples: int = 0
    load_average: list[float] = field(default_factory=list)
    """1-minute load average of the machine at every sample (other work shows here)."""
    seen: dict[int, str] = field(default_factory=dict)
    """pid -> kind of every process seen."""
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        """Take one sample now."""
        root = psutil.Process(self.root)
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total = 0
        for proc in procs:
            try:
                rss = proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            self.seen[proc.pid] = process_kind(proc)  # a Ray worker renames itself once started
            total += rss
            if rss > self.peak_single:
                self.peak_single, self.peak_single_kind = rss, self.seen[proc.pid]
        self.peak_total = max(self.peak_total, total)
        self.peak_processes = max(self.peak_processes, len(procs))
        self.load_average.append(os.getloadavg()[0])
        self.samples += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._run, name="tree-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    def kinds(self) -> dict[str, int]:
        """How many distinct processes of each kind were seen."""
        return dict(Counter(self.seen.values()).most_common())

    def report(self) -> dict[str, object]:
        return {
            "peak_rss_gb": round(self.peak_total / GIB, 3),
            "max_process_rss_gb": round(self.peak_single / GIB, 3),
            "max_process_kind": self.peak_single_kind,
            "peak_processes": self.peak_processes,
            "samples": self.samples,
            "sample_interval_s": self.interval,
            "processes_seen_by_kind": self.kinds(),
            "load_average_1min_mean": round(sum(self.load_average) / max(1, len(self.load_average)), 2),
            "load_average_1min_max": round(max(self.load_average, default=0.0), 2),
        }
