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
CATALOGUE_DIGEST = "catalogue-digest"  # fingerprint of the server's item catalogue
PROXIMAL_MU = "proximal-mu"  # FedProx's mu: the key Flower's FedProx strategy sends

# MetricRecord keys the clients send back.
NUM_EXAMPLES = "num-examples"  # FedAvg weights by this key (unless user-level DP is on)
EQUAL_WEIGHT = "equal-weight"  # set to 1 by the server under user-level DP: equal weights
TRAIN_LOSS = "train_loss"
TRAIN_STEPS = "train_steps"
BYTES_UP = "bytes_up"
PARTITION_ID = "partition-id"
EPSILON = "epsilon"  # a private client's total epsilon over all its rounds, at DELTA
DELTA = "delta"
NOISE_MULTIPLIER = "noise-multiplier"

# Record-level DP on clients (DP-SGD).
DP_STATE = "fedrec-dp-accountant"  # context.state key of a client's accountant history
LOCAL_ADAPTERS = "fedrec-local-adapters"  # context.state key of FedSA-LoRA's lora_B (never sent)
BUDGET_EXHAUSTED = 4031  # Error code of the reply of a client that refuses to train

# The popularity prior (fedrec.item_counts): a query before the first round.
ITEM_COUNTS = "item-counts"  # ArrayRecord key of a client's noised counts; evaluate-config key of the sum
ITEM_COUNT_CLIENTS = "clients"  # metrics.json "item_counts": clients whose counts were summed
ITEM_COUNT_FAILURES = "failures"  # ... and clients that replied with an error or not at all

# The transition prior (fedrec.item_transitions): a query before the first round.
TRANSITIONS_ACTION = "transitions"  # ``query.transitions``: the client replies with its counts
TRANSITION_ROWS = "transition-rows"  # ArrayRecord keys of a client's counts (COO: row, column, count)
TRANSITION_COLS = "transition-cols"
TRANSITION_COUNTS = "transition-counts"
TRANSITIONS_REFUSED = 4032  # Error code: the client's settings do not allow sending them

# Deployed devices (client-data=device).
DEVICE_DATA_INVALID = 4022  # Error code: the device's data or catalogue cannot be trained on

# Seeded client sampling (server.sampling): a query before a node is first sampled.
IDENTIFY_ACTION = "identify"  # ``query.identify``: the client replies with its PARTITION_ID

# Per-round keys of metrics.json.
ROUND = "round"
SECONDS = "seconds"
BYTES_UP_PER_CLIENT = "bytes_up_per_client"
BYTES_DOWN_PER_CLIENT = "bytes_down_per_client"
CLIENTS = "clients"
TRAINED_PARTITIONS = "trained_partitions"  # sorted partition ids whose updates were averaged
FAILURES = "failures"  # replies that were errors or rejected updates
REJECTED_UPDATES = "rejected_updates"  # updates that failed validation (keys, shapes, NaN, norm)
SERVER_LR = "server_lr"  # the server learning rate this round stepped with (FedAvgM, FedAdam)
FEDERATED_PREFIX = "federated_"  # on-client evaluation, averaged over clients
EPSILON_MAX = "epsilon_max"  # over this round's private clients
EPSILON_MEDIAN = "epsilon_median"
EPSILON_MAX_RUN = "epsilon_max_run"  # over every client that trained so far in the run
CLIENT_EPSILONS = "client_epsilons"  # {partition id: epsilon} of this round's clients
BUDGET_REFUSALS = "budget_refusals"  # clients that refused: their budget was spent
USER_EPSILON = "user_epsilon"  # user-level DP so far, Poisson-sampling amplification
USER_EPSILON_UNAMPLIFIED = "user_epsilon_unamplified"  # the same without amplification
USER_DELTA = "user_delta"
USER_CLIPPING_NORM = "user_clipping_norm"  # the clipping norm of this round's updates


# Secure aggregation (SecAgg+), which runs Flower's legacy "fit" workflow.
ADAPTER_KEYS = "adapter-keys"  # fit-config key: adapter names, in the order of the arrays
LEGACY_FIT_ARRAYS = "fitins.parameters"  # Flower's legacy fit layout (flwr.compat recorddict_compat)
FIT_SECONDS = "fit_seconds"  # per-round: from the first instruction sent to the aggregate
SECAGG_ERROR_BOUND = "secagg_error_bound"  # per-round: max quantization error per adapter value


def metric_name(metric: str, k: int | None = None, full: bool = False) -> str:
    """Name of a ranking metric, e.g. ``hr@10`` (sampled) or ``ndcg@10_full``."""
    name = metric if k is None else f"{metric}@{k}"
    return f"{name}_full" if full else name


def summary_metrics(k: int) -> tuple[str, str, str, str]:
    """The four headline figures at ``k`` (``eval.k``): HR and NDCG, sampled and full ranking."""
    return (metric_name("hr", k), metric_name("ndcg", k), metric_name("hr", k, True), metric_name("ndcg", k, True))

