"""Central item-to-item baselines, scored by the same evaluation code as fedrec.

Both score a user as ``x_u @ W``: ``x_u`` the user's 0/1 row of the pooled
interaction matrix (every item before the held-out one), ``W`` an item-by-item
weight matrix learnt from all users' rows at once, i.e. centrally, with no privacy.

* ``ease``: Steck, *Embarrassingly shallow autoencoders for sparse data*
  (WWW 2019): ``W = argmin ||X - X W||^2 + l2 ||W||^2`` with ``diag(W) = 0``, in
  closed form ``W = I - P diag(1 / diag(P))``, ``P = (X^T X + l2 I)^-1``. A strong
  non-sequential baseline on MovieLens.
* ``item-knn``: cosine similarity of the items' interaction columns, summed over
  the user's last ``N`` items (all of them when N is 0): the classic item-based
  neighbourhood model, with recency when N is small.

Each picks its one setting (``l2``, ``N``) by validation NDCG@k. ``X^T X`` is a
dense items x items matrix: fine for catalogues up to some 20,000 items.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.evaluation import Scorer, evaluate_scorer, histories_for
from fedrec.prepare import PreparedData

log = logging.getLogger(__name__)

EASE_L2 = (50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0)
KNN_LAST = (1, 3, 10, 0)


def interaction_matrix(histories: Sequence[np.ndarray], num_items: int) -> sp.csr_matrix:
    """[users, items] 0/1 CSR matrix of the given histories."""
    rows = np.concatenate([np.full(len(h), u) for u, h in enumerate(histories)]) if histories else np.zeros(0)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories]) if histories else np.zeros(0)
    matrix = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(histories), num_items))
    matrix.data[:] = 1.0  # an item twice in a history counts once
    return matrix


def ease_weights(interactions: sp.csr_matrix, l2: float) -> torch.Tensor:
    """EASE's item-item weights [I, I] (zero diagonal) for ``l2`` > 0."""
    gram = torch.from_numpy((interactions.T @ interactions).toarray())
    precision = torch.linalg.inv(gram + l2 * torch.eye(gram.shape[0], dtype=gram.dtype))
    weights = -precision / torch.diag(precision)
    weights.fill_diagonal_(0.0)
    return weights


def cosine_similarity(interactions: sp.csr_matrix) -> torch.Tensor:
    """Cosine similarity [I, I] of the items' interaction columns (zero diagonal)."""
    norms = np.sqrt(np.asarray(interactions.sum(0)).ravel())
    scaled = interactions @ sp.diags(1.0 / np.maximum(norms, 1.0))
    similarity = torch.from_numpy((scaled.T @ scaled).toarray())
    similarity.fill_diagonal_(0.0)
    return similarity


def item_item_scorer(histories: Sequence[np.ndarray], weights: torch.Tensor, last: int = 0) -> Scorer:
    """Scores of each user: the sum of ``weights``' rows of their last ``last`` items (0: all)."""
    recent = [np.asarray(h, dtype=np.int64)[-last:] if last else np.asarray(h, dtype=np.int64) for h in histories]
    matrix = interaction_matrix(recent, weights.shape[0])
    dense = weights.numpy()

    def score(users: np.ndarray) -> np.ndarray:
        return np.asarray(matrix[np.asarray(users)] @ dense, dtype=np.float32)

    return score


def _best(prepared: PreparedData, k: int, candidates: Sequence, scorer_for) -> tuple:
    """The candidate with the best validation NDCG@k, and every candidate's figures."""
    tried = []
    for candidate in candidates:
        metrics = evaluate_scorer(scorer_for(candidate, "valid"), prepared, "valid", k)
        tried.append({"setting": candidate, **{f"valid_{m}": v for m, v in metrics.items()}})
        log.info("%s: valid ndcg@%d %.4f", candidate, k, metrics[f"ndcg@{k}"])
    best = max(tried, key=lambda t: t[f"valid_ndcg@{k}"])
    return best["setting"], tried


def run_item_item_baselines(prepared: PreparedData, k: int = 10) -> dict:
    """EASE and item-kNN on the test split, each with its setting chosen on validation."""
    histories = {split: histories_for(prepared, split) for split in ("valid", "test")}
    matrices = {split: interaction_matrix(h, prepared.num_items) for split, h in histories.items()}

    def ease(l2: float, split: str) -> Scorer:
        return item_item_scorer(histories[split], ease_weights(matrices[split], l2))

    similarity = {split: cosine_similarity(m) for split, m in matrices.items()}

    def knn(last: int, split: str) -> Scorer:
        return item_item_scorer(histories[split], similarity[split], last)

    results = {}
    for name, key, candidates, scorer_for in (
        ("ease", "l2", EASE_L2, ease),
        ("item-knn", "last_items", KNN_LAST, knn),
    ):
        chosen, tried = _best(prepared, k, candidates, scorer_for)
        test_scorer = scorer_for(chosen, "test")
        results[name] = {
            key: chosen,
            "test": evaluate_scorer(test_scorer, prepared, "test", k, beyond=True),
            "validation": tried,
        }
    return results
