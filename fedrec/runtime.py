"""Where computation runs: device choice and CPU thread counts."""

from __future__ import annotations

import os

import torch

from fedrec.config import RuntimeConfig


def select_device(config: RuntimeConfig) -> torch.device:
    """CUDA when asked for or available (``auto``), else CPU."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("setting 'runtime.device=cuda': no CUDA device is visible here")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def configure_threads(config: RuntimeConfig) -> int:
    """Set torch intra-op threads to ``runtime.threads`` (0: as Ray assigned, else all cores).

    Ray exports ``OMP_NUM_THREADS`` equal to the CPUs it gave an actor; with several
    clients per machine, using more threads than that oversubscribes the cores.
    """
    threads = config.threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or (os.cpu_count() or 1)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or parallel work already started
        pass
    return threads
