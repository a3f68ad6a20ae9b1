"""Classic central baselines, scored by the same evaluation code as fedrec.

* ``popularity``: items ranked by training interaction count
  (:func:`fedrec.evaluation.popularity_scorer`).
* ``bpr-mf``: matrix factorisation with one ID embedding per user and per item,
  trained centrally on the pooled training split with the BPR loss (Rendle et
  al. 2009): each (user, item) pair against one item the user never
  interacted with. The epoch with the best validation NDCG@10 (sampled) is
  kept and scored on the test split.

* ``ease`` and ``item-knn``: item-to-item models (:mod:`fedrec.item_item_baselines`).
* ``sasrec``: a sequential model over the order of each history
  (:mod:`fedrec.sequential_baseline`); skipped when no settings are given.

``fedrec baselines`` runs them and writes ``OUT/baselines.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedrec.evaluation import Scorer, evaluate_scorer, histories_for, popularity_scorer
from fedrec.item_item_baselines import run_item_item_baselines
from fedrec.prepare import PreparedData
from fedrec.sequential_baseline import SasRecSettings, run_sasrec_baseline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BprSettings:
    """Hyper-parameters of the BPR-MF baseline."""

    dim: int = 64
    epochs: int = 30
    batch_size: int = 1024
    lr: float = 5e-3
    weight_decay: float = 1e-5
    """L2 penalty on the embeddings of each batch (per row used)."""
    seed: int = 0


class MatrixFactorization(nn.Module):
    """Score(u, i) = <p_u, q_i>."""

    def __init__(self, num_users: int, num_items: int, dim: int) -> None:
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        nn.init.normal_(self.users.weight, std=0.1)
        nn.init.normal_(self.items.weight, std=0.1)

    def scorer(self) -> Scorer:
        users, items = self.users.weight.detach(), self.items.weight.detach()
        return lambda batch: (users[torch.from_numpy(np.asarray(batch))] @ items.T).numpy()


def _negatives(rng: np.random.Generator, users: np.ndarray, seen: list[set[int]], num_items: int) -> np.ndarray:
    """One item per row that the row's user never interacted with."""
    out = rng.integers(0, num_items, size=len(users))
    for row in np.flatnonzero([out[r] in seen[u] for r, u in enumerate(users)]):
        while out[row] in seen[users[row]]:
            out[row] = rng.integers(0, num_items)
    return out


def train_bpr_mf(
    prepared: PreparedData, settings: BprSettings, k: int = 10, refit: bool = False
) -> tuple[MatrixFactorization, list[dict[str, float]]]:
    """Train BPR-MF; return the model of the best validation epoch and each epoch's figures.

    ``refit``: train on the training and validation items for ``settings.epochs``
    and return the last epoch's model (no validation: it has trained on those items).
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    train = histories_for(prepared, "test") if refit else prepared.all_train_items
    users = np.concatenate([np.full(len(items), u) for u, items in enumerate(train)])
    items = np.concatenate(train)
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    test = prepared.holdout("test")["item_idx"].to_numpy()
    # never sample a user's validation or test item as a negative
    seen = [set(h.tolist()) | {int(valid[u]), int(test[u])} for u, h in enumerate(train)]
    model = MatrixFactorization(prepared.num_users, prepared.num_items, settings.dim)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    best, best_state, history = -1.0, None, []
    for epoch in range(1, settings.epochs + 1):
        start = time.perf_counter()
        order = rng.permutation(len(users))
        negatives = _negatives(rng, users[order], seen, prepared.num_items)
        total = 0.0
        for s in range(0, len(order), settings.batch_size):
            rows = order[s : s + settings.batch_size]
            u = torch.from_numpy(users[rows])
            p, n = torch.from_numpy(items[rows]), torch.from_numpy(negatives[s : s + settings.batch_size])
            eu, ep, en = model.users(u), model.items(p), model.items(n)
            loss = -nn.functional.logsigmoid((eu * ep).sum(1) - (eu * en).sum(1)).mean()
            loss = loss + settings.weight_decay * (eu.pow(2).sum() + ep.pow(2).sum() + en.pow(2).sum()) / len(rows)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(rows)
        if refit:
            history.append({"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - start})
            continue
        metrics = evaluate_scorer(model.scorer(), prepared, "valid", k)
        history.append({"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - start, **{f"valid_{m}": v for m, v in metrics.items()}})
        log.info("BPR-MF epoch %d: loss %.4f valid ndcg@%d %.4f", epoch, total / len(order), k, metrics[f"ndcg@{k}"])
        if metrics[f"ndcg@{k}"] > best:
            best, best_state = metrics[f"ndcg@{k}"], {n: t.clone() for n, t in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return model, history


def run_baselines(
    prepared: PreparedData,
    settings: BprSettings,
    out_dir: Path,
    k: int = 10,
    sasrec: SasRecSettings | None = None,
    refit: bool = False,
) -> dict:
    """Popularity, BPR-MF, EASE, item-kNN (and SASRec) on the test split; written to ``out_dir/baselines.json``.

    ``refit``: BPR-MF and SASRec are also trained again on the training and
    validation items for their chosen epochs and scored on test (``"refit"``), as
    fedrec's ``train.include-valid-item`` trains. EASE and item-kNN need no refit:
    they already read each user's validation item when scoring the test item.
    """
    model, history = train_bpr_mf(prepared, settings, k)
    best_epoch = max(history, key=lambda h: h[f"valid_ndcg@{k}"])["epoch"]
    results = {
        "dataset": {"prepared": prepared.root.name, **{n: prepared.meta[n] for n in ("num_users", "num_items", "num_train")}},
        "popularity": evaluate_scorer(popularity_scorer(prepared), prepared, "test", k, beyond=True),
        "bpr-mf": {
            "settings": asdict(settings),
            "best_epoch": best_epoch,
            "test": evaluate_scorer(model.scorer(), prepared, "test", k, beyond=True),
            "epochs": history,
        },
        **run_item_item_baselines(prepared, k),
    }
    if refit:
        refitted, _ = train_bpr_mf(prepared, replace(settings, epochs=best_epoch), k, refit=True)
        results["bpr-mf"]["refit"] = {
            "epochs": best_epoch,
            "test": evaluate_scorer(refitted.scorer(), prepared, "test", k, beyond=True),
        }
    if sasrec is not None:
        results["sasrec"] = run_sasrec_baseline(prepared, sasrec, k, refit=refit)
    if prepared.has_cold_test:  # items held out of training (eval.cold-items)
        results["popularity"]["cold"] = evaluate_scorer(popularity_scorer(prepared), prepared, "cold", k)
        results["bpr-mf"]["cold"] = evaluate_scorer(model.scorer(), prepared, "cold", k)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "baselines.json"
    path.write_text(json.dumps(results, indent=2))
    return results
