"""A synthetic interactions table with item text, for simulations at any scale.

Deterministic from a seed: the same :class:`SyntheticSpec` always gives the same
table. The shape follows what real recommendation data looks like, so that
preparation, the split, the partitioners and training behave as on MovieLens:

* **Popularity**: item popularity is Zipf-like, weight ``1 / rank**ZIPF_EXPONENT``
  over a random ranking of the items, so a few items take most interactions.
* **Taste clusters**: each item belongs to one of ``K`` clusters (genres). Each
  user has a primary cluster and, half of the time, a second one; a pick comes
  from the user's clusters with probability ``IN_CLUSTER`` (popularity-weighted
  within the cluster), otherwise from the whole catalogue by popularity.
* **Text carries the signal**: an item's text is ``"Title words (year). Genres:
  G1[, G2]"``; the title mixes words specific to its cluster with shared words,
  and ``G1`` is its cluster's genre, so a text encoder can tell clusters apart.
* **Activity**: interactions per user are ``min_interactions`` plus a Lomax
  (Pareto II) draw, heavy-tailed, capped at ``MAX_INTERACTIONS`` and at a third
  of the catalogue (the evaluation needs unseen items to sample).
* **Time and ratings**: each user's timestamps strictly increase in the order the
  items were picked; ratings 1-5 are higher for in-cluster picks.

Everything is vectorised over all picks at once (no loop over users), so 10,000
users x 5,000 items take about a second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrec.data.interactions import DataError, InteractionData

logger = logging.getLogger(__name__)

NAME = "synthetic"
ZIPF_EXPONENT = 1.0
IN_CLUSTER = 0.85
"""Probability that a pick comes from one of the user's clusters."""
SECOND_CLUSTER = 0.5
"""Fraction of users with a second cluster; such users take 70 % of their cluster picks from the first."""
ACTIVITY_SHAPE = 1.5
"""Lomax shape of the extra interactions per user (smaller: heavier tail)."""
ACTIVITY_SCALE = 12.0
MAX_INTERACTIONS = 1_000
"""Cap on one user's interactions (ML-100K's busiest user has 737)."""
MAX_CLUSTERS = 20
ITEMS_PER_CLUSTER = 50
START = 1_000_000_000  # 2001-09-09, Unix seconds
MEAN_GAP_S = 86_400.0

GENRES = (
    "Action", "Adventure", "Animation", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western", "Noir", "Family", "Biography", "Sport",
)  # fmt: skip
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "st", "tr", "gl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
CLUSTER_WORDS = 30
"""Title words specific to each cluster."""
SHARED_WORDS = 200
"""Title words every cluster draws from."""


@dataclass(frozen=True)
class SyntheticSpec:
    """Size and seed of a synthetic dataset (``data.synthetic-*`` settings)."""

    num_users: int = 10_000
    num_items: int = 5_000
    seed: int = 0
    min_interactions: int = 5
    num_clusters: int = 0
    """Taste clusters (0: one per ITEMS_PER_CLUSTER items, between 2 and MAX_CLUSTERS)."""

    def __post_init__(self) -> None:
        if self.num_users < 1:
            raise DataError(f"synthetic data: num_users={self.num_users}; need at least 1")
        if self.min_interactions < 1:
            raise DataError(f"synthetic data: min_interactions={self.min_interactions}; need at least 1")
        if self.num_items < 3 * self.min_interactions:
            raise DataError(
                f"synthetic data: {self.num_items} items for users with at least "
                f"{self.min_interactions} interactions; need at least {3 * self.min_interactions} "
                "items (raise data.synthetic-items)"
            )
        if not 0 <= self.num_clusters <= self.num_items:
            raise DataError(f"synthetic data: num_clusters={self.num_clusters} outside 0..{self.num_items}")

    @property
    def clusters(self) -> int:
        if self.num_clusters:
            return self.num_clusters
        return int(np.clip(self.num_items // ITEMS_PER_CLUSTER, 2, MAX_CLUSTERS))

    @property
    def max_interactions(self) -> int:
        return max(self.min_interactions, min(self.num_items // 3, MAX_INTERACTIONS))


@dataclass(frozen=True)
class SyntheticTruth:
    """What generated the table (not part of the data a model sees; for tests)."""

    item_cluster: np.ndarray
    """Cluster of item index i (item id ``str(i + 1)``)."""
    user_clusters: np.ndarray
    """[num_users, 2] clusters of user index u (id ``str(u + 1)``); column 1 is -1 without a second."""
    popularity: np.ndarray
    """Normalised popularity weight of each item."""


def _words(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct pronounceable words of two or three syllables."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < count:
        syllables = rng.integers(2, 4)
        word = "".join(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))] for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word.capitalize())
    return words


def _genre_names(clusters: int) -> list[str]:
    if clusters <= len(GENRES):
        return list(GENRES[:clusters])
    return [f"{GENRES[c % len(GENRES)]} {c // len(GENRES) + 1}" for c in range(clusters)]


def _item_table(spec: SyntheticSpec, rng: np.random.Generator, item_cluster: np.ndarray) -> pd.DataFrame:
    clusters = spec.clusters
    vocabulary = _words(rng, SHARED_WORDS + clusters * CLUSTER_WORDS)
    shared = np.array(vocabulary[:SHARED_WORDS], dtype=object)
    own = np.array(vocabulary[SHARED_WORDS:], dtype=object).reshape(clusters, CLUSTER_WORDS)
    genres = np.array(_genre_names(clusters), dtype=object)
    n = spec.num_items
    lengths = rng.integers(2, 5, size=n)  # 2-4 title words
    columns = []
    for position in range(4):
        from_cluster = rng.random(n) < 0.6
        word = np.where(
            from_cluster,
            own[item_cluster, rng.integers(CLUSTER_WORDS, size=n)],
            shared[rng.integers(SHARED_WORDS, size=n)],
        )
        columns.append(np.where(position < lengths, word, ""))
    titles = pd.Series([" ".join(w for w in words if w) for words in zip(*columns)], dtype=object)
    years = rng.integers(1950, 2021, size=n).astype(str)
    title = titles + " (" + years + ")"
    second = (item_cluster + rng.integers(1, max(clusters, 2), size=n)) % clusters
    has_second = rng.random(n) < 0.3
    genre_text = pd.Series(genres[item_cluster], dtype=object)
    genre_text = genre_text.where(~has_second, genre_text + ", " + pd.Series(genres[second], dtype=object))
    return pd.DataFrame(
        {
            "item_id": np.arange(1, n + 1).astype(str),
            "title": title.astype(str),
            "text": (title + ". Genres: " + genre_text).astype(str),
        }
    )


def _activity(spec: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    extra = np.floor(rng.pareto(ACTIVITY_SHAPE, size=spec.num_users) * ACTIVITY_SCALE)
    return np.minimum(spec.min_interactions + extra.astype(np.int64), spec.max_interactions)


def _cluster_samplers(item_cluster: np.ndarray, popularity: np.ndarray, clusters: int) -> tuple[np.ndarray, np.ndarray]:
    """Items ordered by source (cluster 0..K-1, then the whole catalogue) and ``s + cdf`` keys.

    A pick from source ``s`` with uniform ``u`` is ``items[searchsorted(keys, s + u)]``:
    one sorted array serves every source, so all picks are drawn in one call.
    """
    items, keys = [], []
    for source in range(clusters + 1):
        members = np.flatnonzero(item_cluster == source) if source < clusters else np.arange(len(item_cluster))
        cdf = np.cumsum(popularity[members])
        cdf /= cdf[-1]
        cdf[-1] = 1.0 - 1e-12  # stay inside [s, s + 1)
        items.append(members)
        keys.append(source + cdf)
    return np.concatenate(items), np.concatenate(keys)


def _draw(
    rng: np.random.Generator,
    users: np.ndarray,
    user_clusters: np.ndarray,
    clusters: int,
    items: np.ndarray,
    keys: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """One pick per entry of ``users``: (item, picked from the user's own clusters)."""
    first, second = user_clusters[users, 0], user_clusters[users, 1]
    use_second = (second >= 0) & (rng.random(len(users)) < 0.3)
    in_cluster = rng.random(len(users)) < IN_CLUSTER
    source = np.where(in_cluster, np.where(use_second, second, first), clusters)
    picked = items[np.searchsorted(keys, source + rng.random(len(users)), side="right")]
    return picked, in_cluster


def generate_synthetic(spec: SyntheticSpec) -> tuple[InteractionData, SyntheticTruth]:
    """The interactions table, the item catalogue and what generated them."""
    rng = np.random.default_rng(spec.seed)
    clusters, n_items, n_users = spec.clusters, spec.num_items, spec.num_users
    item_cluster = rng.permutation(np.arange(n_items) % clusters)  # near-equal cluster sizes
    rank = rng.permutation(n_items) + 1
    popularity = 1.0 / rank.astype(np.float64) ** ZIPF_EXPONENT
    popularity /= popularity.sum()
    primary = rng.integers(clusters, size=n_users)
    offset = rng.integers(1, max(clusters, 2), size=n_users)
    secondary = np.where(rng.random(n_users) < SECOND_CLUSTER, (primary + offset) % clusters, -1)
    if clusters == 1:
        secondary[:] = -1
    user_clusters = np.column_stack([primary, secondary])
    wanted = _activity(spec, rng)
    items_by_source, keys = _cluster_samplers(item_cluster, popularity, clusters)

    # Draw with replacement, keep each user's first pick of an item, and draw again
    # for users still short; after a few passes, fill from the whole catalogue.
    got_user, got_item, got_in, got_order = [], [], [], []
    have = np.zeros(n_users, dtype=np.int64)
    seen_keys = np.zeros(0, dtype=np.int64)
    order_base = 0
    for attempt in range(12):
        short = wanted - have
        if not (short > 0).any():
            break
        users = np.repeat(np.arange(n_users), np.maximum(short, 0) * (2 if attempt < 11 else 1))
        if attempt == 11:  # last pass: uniform over the catalogue, no repeats needed
            picked, inside = _fill_uniform(rng, users, seen_keys, n_items)
        else:
            picked, inside = _draw(rng, users, user_clusters, clusters, items_by_source, keys)
        pair = users.astype(np.int64) * n_items + picked
        _, first = np.unique(pair, return_index=True)
        first.sort()
        fresh = first[~_contains(seen_keys, pair[first])]
        # keep at most `short` new items per user, in pick order
        rank_in_user = _rank_within(users[fresh])
        fresh = fresh[rank_in_user < short[users[fresh]]]
        got_user.append(users[fresh])
        got_item.append(picked[fresh])
        got_in.append(inside[fresh])
        got_order.append(order_base + fresh)
        order_base += len(users)
        have += np.bincount(users[fresh], minlength=n_users)
        seen_keys = np.sort(np.concatenate([seen_keys, pair[fresh]]))  # disjoint: stays unique
    if (have < wanted).any():  # pragma: no cover - the uniform pass always fills
        raise DataError("synthetic data: could not draw enough distinct items per user")

    user = np.concatenate(got_user)
    item = np.concatenate(got_item)
    inside = np.concatenate(got_in)
    order = np.argsort(user * (order_base + 1) + np.concatenate(got_order), kind="stable")
    user, item, inside = user[order], item[order], inside[order]

    starts = rng.integers(0, 2 * 365 * 86_400, size=n_users)
    gaps = 1 + np.floor(rng.exponential(MEAN_GAP_S, size=len(user))).astype(np.int64)
    cumulative = np.cumsum(gaps)
    first_row = np.concatenate([[0], np.cumsum(wanted)[:-1]])
    before_user = np.repeat(cumulative[first_row] - gaps[first_row], wanted)
    timestamps = START + starts[user] + cumulative - before_user
    mean = np.where(inside, 4.0, 2.8)
    ratings = np.clip(np.rint(rng.normal(mean, 0.9)), 1, 5).astype(np.float32)

    interactions = pd.DataFrame(
        {
            "user_id": (user + 1).astype(str),
            "item_id": (item + 1).astype(str),
            "rating": ratings,
            "timestamp": timestamps.astype(np.int64),
        }
    )
    items = _item_table(spec, rng, item_cluster)
    logger.info(
        "synthetic: %d users, %d items, %d clusters, %d interactions (seed %d)",
        n_users, n_items, clusters, len(interactions), spec.seed,
    )  # fmt: skip
    data = InteractionData(NAME, interactions, items)
    return data, SyntheticTruth(item_cluster, user_clusters, popularity)


def _contains(sorted_keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Whether each value is in ``sorted_keys`` (binary search; no hashing)."""
    if not len(sorted_keys):
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, values), len(sorted_keys) - 1)
    return sorted_keys[at] == values


def _rank_within(users: np.ndarray) -> np.ndarray:
    """0-based rank of each entry among the entries of the same user, in array order."""
    order = np.argsort(users, kind="stable")
    sorted_users = users[order]
    starts = np.flatnonzero(np.r_[True, sorted_users[1:] != sorted_users[:-1]])
    counts = np.diff(np.r_[starts, len(users)])
    ranks = np.empty(len(users), dtype=np.int64)
    ranks[order] = np.arange(len(users)) - np.repeat(starts, counts)
    return ranks


def _fill_uniform(
    rng: np.random.Generator, users: np.ndarray, seen_keys: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each short user, distinct unseen items in random order (one entry per pick)."""
    picked = np.empty(len(users), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else []
    for begin, end in zip(starts, [*starts[1:], len(users)]):
        user = users[begin]
        lo, hi = np.searchsorted(seen_keys, [user * n_items, (user + 1) * n_items])
        seen = seen_keys[lo:hi] - user * n_items  # seen_keys is sorted
        mask = np.ones(n_items, dtype=bool)
        mask[seen] = False
        unseen = np.flatnonzero(mask)
        picked[begin:end] = rng.permutation(unseen)[: end - begin]
    return picked, np.zeros(len(users), dtype=bool)


def load_synthetic(spec: SyntheticSpec) -> InteractionData:
    """The synthetic dataset for ``spec`` (what ``data.name = "synthetic"`` loads)."""
    return generate_synthetic(spec)[0]
