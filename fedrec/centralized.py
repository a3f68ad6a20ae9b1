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
from tqdm import tqdm

from fedrec.config import FedRecConfig, to_run_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.prepare import prepare
from fedrec.runtime import configure_threads
from fedrec.training import make_loader, make_optimizer, train_local

log = logging.getLogger(__name__)


def train_centralized(config: FedRecConfig, steps: int, eval_every: int) -> dict[str, Any]:
    """Train for ``steps`` optimizer steps on all users' examples; evaluate periodically."""
    configure_threads(config.runtime)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    examples = build_examples(prepared.all_train_items, config.model.history_items)
    dataset = NextItemDataset(
        examples, model.table, config.train.num_negatives, config.model.max_user_tokens, config.federation.seed
    )
    torch.manual_seed(config.federation.seed)
    loader = make_loader(dataset, config.train.batch_size, config.federation.seed)
    optimizer = make_optimizer(model.model, config.train)
    out = Path(config.federation.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    history: list[dict[str, float]] = []
    done, start = 0, time.monotonic()
    with tqdm(total=steps, desc="central training", unit="step") as bar:
        while done < steps:
            chunk = min(eval_every, steps - done)
            train_cfg = dataclasses.replace(config.train, max_steps=chunk, local_epochs=10**6)
            result = train_local(model.model, loader, optimizer, train_cfg, model.device)
            done += result.steps
            bar.update(result.steps)
            metrics = model.evaluate("test")
            history.append({"step": done, "train_loss": result.loss, "seconds": time.monotonic() - start, **metrics})
            log.info("step %d: loss %.4f hr@10 %.4f ndcg@10 %.4f", done, result.loss, metrics["hr@10"], metrics["ndcg@10"])
    results = {"settings": to_run_config(config), "examples": len(examples), "history": history, "final": history[-1]}
    (out / "centralized.json").write_text(json.dumps(results, indent=2))
    return results
