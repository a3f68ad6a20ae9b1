"""A trained run, loaded for inference: settings, catalogue and merged model.

A run directory written by ``fedrec simulate`` (or the ServerApp) holds
``metrics.json`` (whose ``settings`` are the run config) and
``checkpoints/round-NNNN/`` (PEFT adapters). Serving rebuilds the same base
encoder, loads the chosen round's adapters and merges them into the base weights
(``merge_and_unload``): inference then costs exactly a plain BERT forward pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from fedrec.checkpoint import checkpoint_dir, latest_checkpoint
from fedrec.config import (
    ConfigError,
    FedRecConfig,
    RunConfigValue,
    load_config,
    to_run_config,
)
from fedrec.item_counts import COUNTS_FILE, load_item_counts, popularity_prior
from fedrec.item_transitions import (
    TRANSITIONS_FILE,
    TransitionPrior,
    load_transitions,
    transition_prior,
)
from fedrec.model.adapters import (
    AdapterStateError,
    load_local_adapter_state,
    load_saved_adapter_mean,
)
from fedrec.model.build import build_recommender, token_table, tokenize_items
from fedrec.model.item_identity import find_item_identity, grow_item_identity
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.prepare import PreparedData, prepare
from fedrec.results import METRICS_FILE
from fedrec.serving.new_items import new_items_digest, read_new_items
from fedrec.tokens import TokenTable

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")


class RunDirectoryError(ValueError):
    """The folder is not a usable fedrec run (no settings, no checkpoint)."""


@dataclass(frozen=True)
class TrainedModel:
    """Everything inference needs from one run, loaded once."""

    run_dir: Path
    config: FedRecConfig
    prepared: PreparedData
    table: TokenTable
    model: TwoTowerRecommender
    server_round: int
    quantization: str
    item_prior: torch.Tensor | None = None
    """Added to every item's score (``popularity.*``; None when off)."""
    user_prior: TransitionPrior | None = None
    """Added to a user's scores of the run's items, from their history (``transitions.*``)."""
    averaged_rounds: tuple[int, ...] = ()
    """The rounds whose checkpoints were averaged (empty: ``server_round``'s alone)."""
    local_adapters: str = ""
    """Digest of the device's own ``lora_B`` file merged in (``lora.local-b``; empty: none)."""
    new_items: pd.DataFrame | None = field(default=None, compare=False)
    """Items added to the catalogue after training, after the run's own (``--new-items``)."""

    @cached_property
    def catalogue(self) -> pd.DataFrame:
        """The served catalogue: item_idx, item_id, title, text; the run's items, then new ones."""
        if self.new_items is None:
            return self.prepared.items
        return pd.concat([self.prepared.items, self.new_items], ignore_index=True)

    @cached_property
    def new_items_digest(self) -> str:
        """Fingerprint of the added items (empty without any)."""
        return "" if self.new_items is None else new_items_digest(self.new_items)


def run_config_of(run_dir: Path) -> FedRecConfig:
    """The validated settings a run was started with (``metrics.json``)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise RunDirectoryError(
            f"{run_dir} is not a fedrec run directory: no {METRICS_FILE} "
            "(give the --out folder of `fedrec simulate`)"
        )
    try:
        settings = json.loads(path.read_text())["settings"]
    except (json.JSONDecodeError, KeyError) as err:
        raise RunDirectoryError(f"{path}: not a fedrec metrics file ({err})") from err
    return load_config(settings)


EVALUATION_SETTINGS = (
    "personal.",
    "runtime.",
    "eval.k",
    "eval.max-users",
    "popularity.weight",
    "transitions.weight",
    "transitions.last-items",
    "transitions.decay",
    "transitions.exponent",
)
"""Settings (or prefixes) that may differ from training's; the rest would not match the checkpoint."""


def evaluation_config(run_dir: Path, overrides: Mapping[str, RunConfigValue]) -> FedRecConfig:
    """The run's settings with evaluation-time ``overrides``; any other setting is refused."""
    fixed = [key for key in overrides if not key.startswith(EVALUATION_SETTINGS)]
    if fixed:
        raise ConfigError(
            f"{fixed} cannot change after training (the checkpoint depends on them); "
            f"only {', '.join(EVALUATION_SETTINGS)} can"
        )
    return load_config({**to_run_config(run_config_of(run_dir)), **overrides})


def run_item_prior(run_dir: Path, config: FedRecConfig, num_items: int) -> torch.Tensor | None:
    """The popularity prior of a run (None when ``popularity.weight`` is 0), from the
    item counts its clients sent (``item-counts.npy``)."""
    if not config.popularity.enabled:
        return None
    counts = load_item_counts(run_dir, num_items)
    if counts is None:
        raise RunDirectoryError(
            f"popularity.weight={config.popularity.weight} needs {Path(run_dir) / COUNTS_FILE}, "
            "which only a run trained with popularity.weight > 0 has"
        )
    return popularity_prior(counts, config.popularity)


def run_transition_prior(run_dir: Path, config: FedRecConfig, num_items: int) -> TransitionPrior | None:
    """The transition prior of a run (None when ``transitions.weight`` is 0), from the
    counts its clients sent (``item-transitions.npz``)."""
    if not config.transitions.enabled:
        return None
    counts = load_transitions(run_dir, num_items)
    if counts is None:
        raise RunDirectoryError(
            f"transitions.weight={config.transitions.weight} needs {Path(run_dir) / TRANSITIONS_FILE}, "
            "which only a run trained with transitions.weight > 0 has"
        )
    return transition_prior(counts, config.transitions)


def find_checkpoint(run_dir: Path, server_round: int | None) -> tuple[int, Path]:
    """(round, folder) of the chosen checkpoint of a run (None: the newest)."""
    if server_round is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise RunDirectoryError(f"{run_dir}/checkpoints holds no complete checkpoint")
        return found
    folder = checkpoint_dir(run_dir, server_round)
    if not (folder / "adapter_model.safetensors").exists():
        raise RunDirectoryError(f"no checkpoint of round {server_round} at {folder}")
    return server_round, folder


def checkpoint_name(server_round: int, averaged_rounds: Sequence[int] = ()) -> str:
    """``round-0010``, or ``round-0010-mean-of-0008-0009-0010`` for an average: the
    stem of files derived from a checkpoint (item index, evaluation JSON)."""
    mean = "".join(f"-{r:04d}" for r in sorted(averaged_rounds))
    return f"round-{server_round:04d}" + (f"-mean-of{mean}" if mean else "")


def checkpoint_folders(
    run_dir: Path, server_round: int | None, average_rounds: Sequence[int] = ()
) -> tuple[int, list[Path]]:
    """(round, folders) to load: one checkpoint (default: the newest), or with
    ``average_rounds`` those rounds' checkpoints, whose mean is loaded (tail
    averaging of the global model; a run keeps its last three rounds)."""
    rounds = sorted(average_rounds)
    if not rounds:
        server_round, folder = find_checkpoint(run_dir, server_round)
        return server_round, [folder]
    if server_round is not None:
        raise ValueError("give a checkpoint round or rounds to average, not both")
    if len(set(rounds)) != len(rounds) or rounds[0] < 1:
        raise ValueError(f"rounds to average must be distinct rounds from 1 on, not {list(average_rounds)}")
    return rounds[-1], [find_checkpoint(run_dir, r)[1] for r in rounds]


def _load_local_adapters(encoder: nn.Module, path: Path, config: FedRecConfig, run_dir: Path) -> str:
    """Put a device's own ``lora_B`` (FedSA-LoRA) into the unmerged model; its digest."""
    if not config.lora.local_b:
        raise RunDirectoryError(
            f"{path}: {run_dir} was trained without lora.local-b, so no client kept a lora_B of its own"
        )
    try:
        data = path.read_bytes()
        state = torch.load(io.BytesIO(data), weights_only=True)
    except Exception as err:
        raise RunDirectoryError(f"{path}: cannot be read as saved lora_B weights ({err})") from err
    if not isinstance(state, dict):
        raise RunDirectoryError(f"{path}: holds a {type(state).__name__}, not a state dict of lora_B weights")
    try:
        load_local_adapter_state(encoder, state)
    except AdapterStateError as err:
        raise RunDirectoryError(f"{path}: not this run's local adapters ({err})") from err
    return hashlib.sha256(data).hexdigest()[:12]


def quantize_int8(model: TwoTowerRecommender) -> TwoTowerRecommender:
    """Dynamic int8 quantization of every Linear layer (weights int8, CPU only).

    ``torch.ao.quantization`` is deprecated in favour of torchao but still works
    in torch 2.13, which fedrec pins below; its warning is silenced here.
    """
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def load_trained(
    run_dir: Path,
    server_round: int | None = None,
    quantization: str = "none",
    overrides: Mapping[str, RunConfigValue] | None = None,
    average_rounds: Sequence[int] = (),
    local_adapters: Path | None = None,
    new_items: Path | None = None,
) -> TrainedModel:
    """Load a run's settings, catalogue and model with merged adapters, for CPU inference.

    ``server_round`` picks a checkpoint (default: the newest), ``average_rounds``
    the mean of several (:func:`checkpoint_folders`); ``quantization``
    ``int8`` quantizes the merged encoder's linear layers dynamically;
    ``overrides``: evaluation-time settings (:func:`evaluation_config`);
    ``local_adapters``: for a ``lora.local-b`` run, the file in which a device's
    client kept its own ``lora_B`` (``local-adapters-<partition>.pt`` in its state
    folder), merged with the shared adapters so the device ranks as it trained;
    ``new_items``: an item table of items added after training
    (:mod:`fedrec.serving.new_items`), served after the run's own, from their
    text alone (zero identity vectors, no popularity counts).
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, not {quantization!r}")
    run_dir = Path(run_dir)
    config = evaluation_config(run_dir, overrides or {})
    server_round, folders = checkpoint_folders(run_dir, server_round, average_rounds)
    if config.lora.local_b and local_adapters is None:
        log.warning(
            "%s trained with lora.local-b: each client's lora_B stayed on the client, so this "
            "model has the shared adapters only (lora_B = 0), as a client that never trained",
            run_dir,
        )
    prepared = prepare(config.data, config.eval)
    added = None if new_items is None else read_new_items(Path(new_items), prepared.items)
    recommender = build_recommender(config.model, config.lora, prepared.num_items)
    load_saved_adapter_mean(recommender.encoder, folders)
    local_digest = ""
    if local_adapters is not None:
        local_digest = _load_local_adapters(recommender.encoder, Path(local_adapters), config, run_dir)
    model = TwoTowerRecommender(recommender.encoder.merge_and_unload(), recommender.temperature)
    model.eval()
    table = token_table(prepared, config.model)
    prior = run_item_prior(run_dir, config, prepared.num_items)
    if added is not None:
        table = tokenize_items(pd.concat([prepared.items, added], ignore_index=True), config.model)
        identity = find_item_identity(model.encoder)
        if identity is not None:
            grow_item_identity(identity, len(added))
        if prior is not None:  # no counts for them: the prior adds nothing to their scores
            prior = torch.cat([prior, prior.new_zeros(len(added))])
        log.info("added %d items after the run's %d (%s)", len(added), prepared.num_items, new_items)
    if quantization == "int8":
        model = quantize_int8(model)
    averaged = tuple(sorted(average_rounds))
    log.info("loaded %s round %d%s (%s)", run_dir, server_round, f" averaged over {averaged}" if averaged else "", quantization)
    return TrainedModel(
        run_dir=run_dir,
        config=config,
        prepared=prepared,
        table=table,
        model=model,
        server_round=server_round,
        quantization=quantization,
        item_prior=prior,
        user_prior=run_transition_prior(run_dir, config, prepared.num_items),
        averaged_rounds=averaged,
        local_adapters=local_digest,
        new_items=added,
    )
