"""Evaluate a finished run's checkpoint again, with other evaluation-time settings.

Training settings are fixed by the checkpoint; what can change is how the trained
model is used: the private per-user vector (``personal.*``), the cut-off
(``eval.k``), how many users are scored (``eval.max-users``), the weight of the
popularity prior (``popularity.weight``, for a run that has item counts) and the runtime.
``fedrec evaluate`` writes the metrics next to the run, so a lever that needs no
training (e.g. ``personal.enabled``) is measured on the very same adapters.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedrec.config import RunConfigValue
from fedrec.global_model import GlobalModel
from fedrec.model.adapters import load_saved_adapter_mean
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.serving.trained import (
    checkpoint_folders,
    checkpoint_name,
    evaluation_config,
    run_item_prior,
    run_transition_prior,
)


def overrides_tag(overrides: Mapping[str, RunConfigValue]) -> str:
    """``_KEY=VALUE`` for each override, sorted: one evaluation file per set of overrides."""
    return "".join(f"_{key}={value}" for key, value in sorted(overrides.items()))


def load_run(
    run_dir: Path,
    server_round: int | None = None,
    overrides: Mapping[str, RunConfigValue] | None = None,
    average_rounds: Sequence[int] = (),
) -> tuple[GlobalModel, int | None]:
    """A finished run's global model with its checkpoint (or the mean of
    ``average_rounds``) and item counts loaded, and the round loaded.

    ``server_round=0``: the pretrained model with the run's settings (no adapters
    loaded); None: the newest checkpoint.
    """
    config = evaluation_config(run_dir, dict(overrides or {}))
    configure_threads(config.runtime)
    model = GlobalModel(config, prepare(config.data, config.eval))
    if server_round != 0 or average_rounds:  # round 0: the adapters as initialised, i.e. the pretrained model
        server_round, folders = checkpoint_folders(run_dir, server_round, average_rounds)
        load_saved_adapter_mean(model.model.encoder, folders)
    model.item_prior = run_item_prior(run_dir, config, model.prepared.num_items)
    model.user_prior = run_transition_prior(run_dir, config, model.prepared.num_items)
    return model, server_round


def evaluate_run(
    run_dir: Path,
    server_round: int | None = None,
    split: str = "test",
    overrides: Mapping[str, RunConfigValue] | None = None,
    out: Path | None = None,
    average_rounds: Sequence[int] = (),
) -> dict:
    """Metrics of a run's checkpoint on ``split`` (test or valid), written as JSON.

    ``server_round=0`` evaluates the pretrained model before any round (no
    adapters loaded) with the run's settings, its item counts and ``overrides``:
    what training added is the difference to a later round.

    ``average_rounds`` (instead of ``server_round``) evaluates the element-wise
    mean of those rounds' checkpoints (tail averaging of the global model; a run
    keeps its last three).

    ``out`` defaults to ``RUN/evaluations/round-NNNN-SPLIT[_KEY=VALUE...].json``
    (``round-NNNN-mean-of-AAAA-...-SPLIT...`` for an average; one file per set of
    overrides); the file records the overrides and averaged rounds too.
    """
    if split not in ("test", "valid"):
        raise ValueError(f"split must be test or valid, not {split!r}")
    run_dir = Path(run_dir)
    overrides = dict(overrides or {})
    model, server_round = load_run(run_dir, server_round, overrides, average_rounds)
    result = {
        "run": str(run_dir),
        "round": server_round,
        "averaged_rounds": sorted(average_rounds),
        "split": split,
        "k": model.config.eval.k,
        "overrides": overrides,
        "metrics": model.evaluate(split),
    }
    out = out or run_dir / "evaluations" / f"{checkpoint_name(server_round, average_rounds)}-{split}{overrides_tag(overrides)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    result["file"] = str(out)
    return result
