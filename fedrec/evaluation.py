"""Leave-one-out evaluation under both protocols, for any scorer.

* Sampled: the held-out item against ``eval.num-negatives`` items the user never
  interacted with, sampled once at preparation (numpy ``default_rng(eval.seed)``).
* Full: the held-out item against every item, the user's history items excluded.

A scorer maps user indices to scores over the whole catalogue, so the model, the
popularity baseline and any other baseline go through exactly the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from fedrec.config import PersonalConfig
from fedrec.examples import padded_history
from fedrec.metrics import beyond_accuracy, ranking_metrics, target_ranks
from fedrec.model.personal_vector import personalise
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.model.sequence_tower import history_vectors
from fedrec.prepare import PreparedData
from fedrec.tokens import TokenTable, history_tokens

Scorer = Callable[[np.ndarray], np.ndarray]
"""Maps user indices [u] to scores over all items [u, I]."""


def histories_for(prepared: PreparedData, split: str) -> list[np.ndarray]:
    """Each user's chronological history before the held-out ``split`` item.

    ``all`` (and the ``cold`` test): every item of the prepared split the user
    has (train, valid, test), e.g. what serving excludes from recommendations.
    """
    train = prepared.all_train_items
    if split == "valid":
        return train
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    if split in ("all", "cold"):
        test = prepared.holdout("test")["item_idx"].to_numpy()
        return [np.append(items, [valid[u], test[u]]) for u, items in enumerate(train)]
    return [np.append(items, valid[u]) for u, items in enumerate(train)]


def evaluate_scorer(
    scorer: Scorer,
    prepared: PreparedData,
    split: str = "test",
    k: int = 10,
    max_users: int = 0,
    users: np.ndarray | None = None,
    chunk: int = 512,
    beyond: bool = False,
) -> dict[str, float]:
    """Sampled and full-ranking metrics of ``scorer`` on the ``split`` items.

    ``users`` restricts the evaluation (e.g. to one client's users); otherwise
    the first ``max_users`` users (0: all) are evaluated. ``beyond`` adds the
    catalogue-wide figures of :func:`fedrec.metrics.beyond_accuracy` (coverage,
    popularity bias, HR per activity quartile) of the full-ranking top-k.
    """
    candidates = prepared.candidates(split)
    histories = histories_for(prepared, split)
    if users is None:
        users = np.arange(len(candidates) if not max_users else min(max_users, len(candidates)))
    users = users[candidates[users, 0] >= 0]  # the cold test has no item for some users
    sampled_ranks, full_ranks, top_items = [], [], []
    for start in range(0, len(users), chunk):
        batch = users[start : start + chunk]
        scores = np.asarray(scorer(batch), dtype=np.float64)
        rows = np.arange(len(batch))
        target = candidates[batch, 0]
        target_scores = scores[rows, target]
        sampled_ranks.append(target_ranks(scores[rows[:, None], candidates[batch]], target_scores))
        for row, user in enumerate(batch):
            seen = histories[user]
            scores[row, seen[seen != target[row]]] = -np.inf
        full_ranks.append(target_ranks(scores, target_scores))
        if beyond:  # the full-ranking top-k: what the user would be shown
            top_items.append(np.argpartition(-scores, k - 1, axis=1)[:, :k])
    sampled, full = np.concatenate(sampled_ranks), np.concatenate(full_ranks)
    metrics = ranking_metrics(sampled, k)
    metrics.update(ranking_metrics(full, k, full=True))
    metrics["num_users"] = float(len(users))
    if beyond:
        popularity = np.bincount(np.asarray(prepared.train["item_idx"]), minlength=prepared.num_items)
        activity = prepared.users["num_train"].to_numpy()[users]
        metrics.update(
            beyond_accuracy(
                np.concatenate(top_items), popularity, candidates[users, 0], sampled, full, activity, k
            )
        )
    return metrics


def popularity_scorer(prepared: PreparedData) -> Scorer:
    """Scores every item by its number of training interactions."""
    counts = np.bincount(np.asarray(prepared.train["item_idx"]), minlength=prepared.num_items)
    counts = counts.astype(np.float64)
    return lambda users: np.broadcast_to(counts, (len(users), len(counts))).copy()


@torch.no_grad()
def encode_items(
    model: TwoTowerRecommender,
    table: TokenTable,
    device: torch.device,
    batch_size: int = 256,
    only: np.ndarray | None = None,
) -> torch.Tensor:
    """Embeddings of every item in the catalogue, [I, D] on ``device`` (``only``: of
    those catalogue indices, the other rows zero)."""
    model.eval()
    ids = torch.from_numpy(table.item_ids.astype(np.int64))
    mask = torch.from_numpy(table.item_mask.astype(np.int64))
    indices = torch.arange(len(ids)) if only is None else torch.from_numpy(np.unique(only).astype(np.int64))
    out = [
        model.embed_items(
            ids[indices[s : s + batch_size]].to(device),
            mask[indices[s : s + batch_size]].to(device),
            indices[s : s + batch_size].to(device),
        )
        for s in range(0, len(indices), batch_size)
    ]
    if not out:
        raise ValueError("no items to encode (an empty 'only')")
    encoded = torch.cat(out)
    if only is None:
        return encoded
    rows = encoded.new_zeros(len(ids), encoded.shape[1])
    rows[indices.to(device)] = encoded
    return rows


@torch.no_grad()
def encode_users(
    model: TwoTowerRecommender,
    table: TokenTable,
    histories: Sequence[np.ndarray],
    history_items: int,
    max_user_tokens: int,
    device: torch.device,
    batch_size: int = 128,
    item_vectors: torch.Tensor | None = None,
) -> torch.Tensor:
    """Embeddings of users from their chronological histories, [U, D]
    (``item_vectors`` [I, D]: the catalogue's embeddings, which a sequence tower reads)."""
    model.eval()
    out = []
    for s in range(0, len(histories), batch_size):
        recent_first = [h[-history_items:][::-1] for h in histories[s : s + batch_size]]
        pairs = [history_tokens(table, items, max_user_tokens) for items in recent_first]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.int64)).to(device)
        mask = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64)).to(device)
        padded = [padded_history(items, history_items) for items in recent_first]
        history = torch.from_numpy(np.stack([p[0] for p in padded])).to(device)
        history_mask = torch.from_numpy(np.stack([p[1] for p in padded])).to(device)
        vectors = None if item_vectors is None else history_vectors(item_vectors, history, history_mask)
        out.append(model.embed_users(ids, mask, history, history_mask, vectors))
    return torch.cat(out)


def model_scorer(
    model: TwoTowerRecommender,
    table: TokenTable,
    histories: Sequence[np.ndarray],
    history_items: int,
    max_user_tokens: int,
    device: torch.device,
    personal: PersonalConfig | None = None,
    item_prior: torch.Tensor | None = None,
    user_prior: Callable[[Sequence[np.ndarray]], torch.Tensor] | None = None,
) -> Scorer:
    """Cosine scores of the model; the catalogue is encoded once per call of this, and
    each user once (the cold-start test scores the same users again).

    ``personal`` makes each user's embedding personal (private vector, recency
    term: :mod:`fedrec.model.personal_vector`) from that user's ``histories`` row
    alone: what the user's device computes, done here for many users at once.
    ``item_prior`` [num_items] is added to every user's scores (the popularity
    prior of :mod:`fedrec.item_counts`); ``user_prior`` maps users' histories to
    [users, num_items] added to their scores (the transition prior of
    :mod:`fedrec.item_transitions`, from each user's own history).
    """
    items = encode_items(model, table, device)
    encoded: dict[int, torch.Tensor] = {}

    def score(users: np.ndarray) -> np.ndarray:
        missing = [int(u) for u in users if int(u) not in encoded]
        if missing:
            vectors = encode_users(
                model,
                table,
                [histories[u] for u in missing],
                history_items,
                max_user_tokens,
                device,
                item_vectors=items,
            )
            if personal is not None and personal.active:
                vectors = personalise(
                    vectors, items, [histories[u] for u in missing], personal, model.temperature
                )
            encoded.update(zip(missing, vectors))
        user_vectors = torch.stack([encoded[int(u)] for u in users])
        with torch.autocast(device.type, enabled=False):  # rank in float32 even under autocast
            scores = user_vectors.float() @ items.float().T
            if item_prior is not None:
                scores = scores + item_prior.to(scores.device)
            if user_prior is not None:
                scores = scores + user_prior([histories[int(u)] for u in users]).to(scores.device)
            return scores.cpu().numpy()

    return score
