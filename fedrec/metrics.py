"""Ranking metrics for leave-one-out evaluation (one held-out item per user).

Ranks are 0-based and pessimistic: an item tied with the held-out one counts as
ranked above it, so a model that scores everything equal gets no credit.

With one relevant item per user: HR@K = Recall@K = 1[rank < K];
NDCG@K = 1/log2(rank + 2) when rank < K; MRR = 1/(rank + 1) (no cut-off);
Precision@K = HR@K / K; F1@K = 2PR/(P+R) per user, averaged.
"""

from __future__ import annotations

import numpy as np

from fedrec.records import metric_name


def target_ranks(scores: np.ndarray, target_scores: np.ndarray) -> np.ndarray:
    """0-based rank of each user's target among its candidate ``scores`` [U, C].

    ``target_scores`` [U] is the target's own score, and the target must be one of
    the candidates: rank = (#candidates scoring >= target) - 1.
    """
    scores = np.asarray(scores)
    target_scores = np.asarray(target_scores).reshape(-1, 1)
    if scores.shape[0] != target_scores.shape[0]:
        raise ValueError(f"{scores.shape[0]} score rows for {target_scores.shape[0]} targets")
    return (scores >= target_scores).sum(axis=1) - 1


def ranking_metrics(ranks: np.ndarray, k: int, full: bool = False) -> dict[str, float]:
    """HR, NDCG, MRR, Recall, Precision and F1 at ``k`` averaged over users."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no users to evaluate")
    hit = ranks < k
    precision = hit / k
    f1 = np.where(hit, 2 * precision / (precision + 1.0), 0.0)
    values = {
        metric_name("hr", k, full): hit.mean(),
        metric_name("ndcg", k, full): np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean(),
        metric_name("mrr", None, full): (1.0 / (ranks + 1.0)).mean(),
        metric_name("recall", k, full): hit.mean(),
        metric_name("precision", k, full): precision.mean(),
        metric_name("f1", k, full): f1.mean(),
    }
    return {name: float(v) for name, v in values.items()}


def activity_quartiles(activity: np.ndarray) -> np.ndarray:
    """Quartile 1..4 of each user by activity (1: the lightest quarter); ties by order."""
    order = np.argsort(np.asarray(activity), kind="stable")
    quartile = np.empty(len(order), dtype=np.int64)
    for q, members in enumerate(np.array_split(order, 4), start=1):
        quartile[members] = q
    return quartile


def beyond_accuracy(
    top_items: np.ndarray,
    item_popularity: np.ndarray,
    target_items: np.ndarray,
    sampled_ranks: np.ndarray,
    full_ranks: np.ndarray,
    activity: np.ndarray,
    k: int,
) -> dict[str, float]:
    """Coverage, popularity bias and HR per user-activity quartile.

    * ``coverage@k``: share of the catalogue that appears in some user's top-k
      (full ranking, the user's history excluded);
    * ``popularity@k``: mean training popularity (interaction count) of the
      recommended items, against ``popularity_test``, that of the held-out items;
      ``popularity_ratio@k`` is their ratio (above 1: biased towards the popular);
    * ``hr@k_q1`` .. ``hr@k_q4`` (and ``hr@k_full_q*``): HR of the users in each
      quartile of training activity, q1 the lightest.
    """
    popularity = np.asarray(item_popularity, dtype=np.float64)
    recommended = float(popularity[top_items].mean())
    held_out = float(popularity[target_items].mean())
    values = {
        f"coverage@{k}": len(np.unique(top_items)) / len(popularity),
        f"popularity@{k}": recommended,
        "popularity_test": held_out,
        f"popularity_ratio@{k}": recommended / held_out if held_out else float("nan"),
    }
    quartile = activity_quartiles(activity)
    for q in range(1, 5):
        members = quartile == q
        if members.any():
            values[f"{metric_name('hr', k)}_q{q}"] = float((sampled_ranks[members] < k).mean())
            values[f"{metric_name('hr', k, True)}_q{q}"] = float((full_ranks[members] < k).mean())
    return values
