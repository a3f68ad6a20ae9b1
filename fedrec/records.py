"""The one place that names Flower record keys and metric names.

Clients, server, runner and tests import these constants; no key is spelled twice.
"""

from __future__ import annotations

# Keys of the RecordDict entries exchanged between ServerApp and ClientApp.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# ConfigRecord keys the server sends.
SERVER_ROUND = "server-round"

# MetricRecord keys the clients send back.
NUM_EXAMPLES = "num-examples"  # FedAvg weights by this key
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "train_steps"
BYTES_UP = "bytes_up"

# Per-round keys of metrics.json.
ROUND = "round"
SECONDS = "seconds"
BYTES_UP_PER_CLIENT = "bytes_up_per_client"
BYTES_DOWN_PER_CLIENT = "bytes_down_per_client"
CLIENTS = "clients"
FAILURES = "failures"
FEDERATED_PREFIX = "federated_"  # on-client evaluation, averaged over clients


def metric_name(metric: str, k: int | None = None, full: bool = False) -> str:
    """Name of a ranking metric, e.g. ``hr@10`` (sampled) or ``ndcg@10_full``."""
    name = metric if k is None else f"{metric}@{k}"
    return f"{name}_full" if full else name
