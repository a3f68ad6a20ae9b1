"""Where computation runs: device choice, mixed precision and CPU thread counts."""

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


def autocast_dtype(config: RuntimeConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``runtime.precision`` on ``device`` (None: plain fp32)."""
    if config.precision == "bf16":
        return torch.bfloat16
    if config.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(config: RuntimeConfig, device: torch.device) -> torch.autocast:
    """Mixed-precision context of ``runtime.precision`` (disabled for fp32).

    Weights, optimizer state and adapters stay float32; matrix products run in bf16.
    """
    dtype = autocast_dtype(config, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


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
