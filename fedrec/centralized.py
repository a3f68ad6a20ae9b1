"""The same model trained centrally on the pooled training split (a baseline).

Same encoder, adapters, examples, loss, optimizer and evaluation as the
federation; only the data is pooled in one place. Progress and the evaluation
every ``eval_every`` steps go to ``OUT/centralized.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from fedrec.config import FedRecConfig, to_run_config
from fedrec.evaluation import encode_items
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.hard_negatives import text_neighbours
from fedrec.item_transitions import local_transitions, transition_prior
from fedrec.model.build import training_recency
from fedrec.model.frozen_cache import compute_item_states, first_adapted_layer
from fedrec.prepare import prepare
from fedrec.records import summary_metrics
from fedrec.runtime import autocast_dtype, configure_threads
from fedrec.training import make_loader, make_optimizer, train_local

log = logging.getLogger(__name__)

PROGRESS_STEPS = 10


class _Endless:
    """Batches of a loader, epoch after epoch, resuming where the last caller stopped.

    A plain iterator rather than a generator: a generator would be closed when a
    caller that delegated to it (``yield from``) is abandoned mid-way.
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.current = iter(loader)

    def __iter__(self) -> _Endless:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        try:
            return next(self.current)
        except StopIteration:
            self.current = iter(self.loader)
            return next(self.current)


def _item_vectors(model: GlobalModel) -> torch.Tensor | None:
    """The catalogue's current embeddings when the model has a sequence tower (which
    reads them as histories, not differentiated), else None."""
    if model.model.sequence_tower is None:
        return None
    return encode_items(model.model, model.table, model.device).cpu()


def train_centralized(config: FedRecConfig, steps: int, eval_every: int) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps on all users' examples; evaluate periodically."""
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    if config.transitions.enabled:  # the pooled items' counts: what the clients' counts sum to
        counts = local_transitions(prepared.all_train_items, prepared.num_items, config.transitions.window)
        model.user_prior = transition_prior(counts, config.transitions)
    if config.model.cache_frozen_items:
        model.model.item_states = compute_item_states(
            model.model.encoder, model.table, first_adapted_layer(config.lora)
        )
    model.model.recency = training_recency(config)
    examples = build_examples(prepared.all_train_items, config.model.history_items)
    neighbours = (
        text_neighbours(model.model.encoder, model.table, config.train.hard_negative_pool)
        if config.train.hard_negatives
        else None
    )
    dataset = NextItemDataset(
        examples,
        model.table,
        config.train.num_negatives,
        config.model.max_user_tokens,
        config.federation.seed,
        neighbours,
        config.train.hard_negatives,
        _item_vectors(model),
        prepared.unlisted_in_training(config.eval),
    )
    torch.manual_seed(config.federation.seed)
    batches = _Endless(make_loader(dataset, config.train.batch_size, config.federation.seed))
    if config.train.lr_schedule != "constant":
        log.warning(
            "train.lr-schedule=%s is a schedule over federated rounds; "
            "central training keeps train.lr constant",
            config.train.lr_schedule,
        )
    optimizer = make_optimizer(model.model, config.train)
    precision = autocast_dtype(config.runtime, model.device)
    out = Path(config.federation.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    done, start = 0, time.monotonic()
    since_eval, losses = 0, []
    with tqdm(total=steps, desc="central training", unit="step") as bar:
        while done < steps:
            # Short chunks keep the progress bar moving; the loader keeps its place.
            chunk = min(PROGRESS_STEPS, steps - done, eval_every - since_eval)
            train_cfg = dataclasses.replace(config.train, max_steps=chunk, local_epochs=1)
            result = train_local(model.model, batches, optimizer, train_cfg, model.device, precision)
            if result.steps == 0:
                raise RuntimeError("central training made no step; the training data is empty")
            done, since_eval = done + result.steps, since_eval + result.steps
            losses.append(result.loss)
            bar.update(result.steps)
            bar.set_postfix(loss=f"{result.loss:.4f}")
            if since_eval >= eval_every or done >= steps:
                metrics = model.evaluate("test")
                loss = float(sum(losses) / len(losses))
                history.append({"step": done, "train_loss": loss, "seconds": time.monotonic() - start, **metrics})
                hr, ndcg = summary_metrics(config.eval.k)[:2]
                log.info("step %d: loss %.4f %s %.4f %s %.4f", done, loss, hr, metrics[hr], ndcg, metrics[ndcg])
                since_eval, losses = 0, []
                if done < steps:  # the tower reads the current item space in the steps to come
                    dataset.item_vectors = _item_vectors(model)
    results = {"settings": to_run_config(config), "examples": len(examples), "history": history, "final": history[-1]}
    (out / "centralized.json").write_text(json.dumps(results, indent=2))
    return results
