"""An item-to-item transition prior from counts summed over the clients.

fedrec's towers learn which items follow which only through gradient steps on a
few clients a round. The counts themselves carry that signal directly, and they
sum over clients:

1. before the first round the server asks every client (a Flower ``query``
   message, action :data:`fedrec.records.TRANSITIONS_ACTION`) for its transition
   counts: for each of its training examples (item ``s_t`` given the items before
   it, :func:`fedrec.examples.build_examples`), one count for each of the
   ``transitions.window`` items just before the target, ``C[s_{t-d}, s_t] += 1``
   for ``d = 1..window``;
2. the server sums the replies and saves them (``item-transitions.npz``);
3. every ranking (server evaluation, ``fedrec evaluate``, serving) adds to the
   cosine scores of a user with history ``h`` (most recent last)::

       weight * p / max(p),   p = sum_{d < last_items} decay^d  W[h_{-1-d}],
       W = C / ((out + 1)^exponent (in + 1)^exponent)

   where ``out`` and ``in`` are C's row and column sums: the items that followed
   the user's recent ones, most for the most recent, discounted by how common
   they are. Only the user's own history and the summed counts are needed, so a
   device given the summed counts computes its prior itself, as it does its
   private vector.

**Privacy: none.** Each device's reply is exact: the server learns which of the
device's items followed which within the window. This is for non-private
federations only, where the server is trusted with as much (a non-private
update of the item identity table already shows which items a device trained
on); it is refused with ``dp.enabled``, user-level DP and SecAgg+. Noised on
each device as the popularity prior's counts are, the counts are useless at any
meaningful ε (docs/privacy.md, ``benchmarks/transition_noise.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from fedrec.config import TransitionConfig

TRANSITIONS_FILE = "item-transitions.npz"
MAX_ITEMS = 20_000
"""Largest catalogue served: each user's prior is a dense row over the catalogue
(the summed counts stay sparse)."""


def local_transitions(sequences: Sequence[np.ndarray], num_items: int, window: int) -> sp.coo_matrix:
    """[num_items, num_items] counts of this client's training examples: for each
    target ``s_t`` (t >= 1), 1 at ``(s_{t-d}, s_t)`` for each ``d`` in 1..window (t - d >= 0).

    Removing one training example lowers at most ``window`` counts by 1.
    """
    rows, cols = [], []
    for sequence in sequences:
        items = np.asarray(sequence, dtype=np.int64)
        if len(items) and (items.min() < 0 or items.max() >= num_items):
            raise ValueError(f"item index outside the catalogue of {num_items} items")
        for d in range(1, min(window, len(items) - 1) + 1):
            rows.append(items[:-d])
            cols.append(items[d:])
    if not rows:
        return sp.coo_matrix((num_items, num_items), dtype=np.float64)
    row, col = np.concatenate(rows), np.concatenate(cols)
    counts = sp.coo_matrix((np.ones(len(row)), (row, col)), shape=(num_items, num_items))
    counts.sum_duplicates()
    return counts


def sum_counts(parts: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], num_items: int) -> sp.csr_matrix:
    """The sum of clients' counts, each given as (rows, columns, counts)."""
    parts = list(parts)
    if not parts:
        return sp.csr_matrix((num_items, num_items), dtype=np.float64)
    rows, cols, counts = (np.concatenate([np.asarray(part[i]) for part in parts]) for i in range(3))
    return sp.csr_matrix(
        (counts.astype(np.float64), (rows.astype(np.int64), cols.astype(np.int64))), shape=(num_items, num_items)
    )


def transition_weights(counts: sp.spmatrix, exponent: float) -> sp.csr_matrix:
    """``W = C / ((out + 1)^exponent (in + 1)^exponent)``, out/in the row/column sums."""
    counts = sp.csr_matrix(counts, dtype=np.float64)
    out = np.asarray(counts.sum(1)).ravel() + 1.0
    into = np.asarray(counts.sum(0)).ravel() + 1.0
    return sp.csr_matrix(sp.diags(out**-exponent) @ counts @ sp.diags(into**-exponent))


@dataclass(frozen=True)
class TransitionPrior:
    """Each user's transition prior over the catalogue, from their own history."""

    weights: sp.csr_matrix
    """W [I, I] (:func:`transition_weights`)."""
    config: TransitionConfig

    def __call__(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        """[len(histories), I] float32: ``weight * p / max(p)`` per user (0 for a user
        whose recent items were never followed by anything)."""
        num_items = self.weights.shape[0]
        if not len(histories):
            return torch.zeros(0, num_items)
        last, decay = self.config.last_items, self.config.decay
        rows, cols, values = [], [], []
        for user, history in enumerate(histories):
            recent = np.asarray(history, dtype=np.int64)[-last:][::-1]
            rows.append(np.full(len(recent), user))
            cols.append(recent)
            values.append(decay ** np.arange(len(recent), dtype=np.float64))
        recent_matrix = sp.csr_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(histories), num_items),
        )  # an item twice in the recent items adds both weights
        prior = np.asarray((recent_matrix @ self.weights).todense(), dtype=np.float32)
        peak = prior.max(axis=1, keepdims=True)
        prior = np.divide(prior, peak, out=np.zeros_like(prior), where=peak > 0)
        return torch.from_numpy(self.config.weight * prior)


def transition_prior(counts: sp.spmatrix | None, config: TransitionConfig) -> TransitionPrior | None:
    """The prior of ``config`` from summed ``counts``, or None when ``transitions.weight`` is 0."""
    if not config.enabled:
        return None
    if counts is None:
        raise ValueError("transitions.weight > 0 needs the run's transition counts (item-transitions.npz)")
    return TransitionPrior(transition_weights(counts, config.exponent), config)


def check_catalogue_size(num_items: int) -> None:
    """Refuse catalogues too large for dense per-user priors."""
    if num_items > MAX_ITEMS:
        raise ValueError(
            f"transitions.weight > 0 supports catalogues of up to {MAX_ITEMS} items, not {num_items}: "
            "each user's prior is a dense row over the catalogue"
        )


def save_transitions(run_dir: Path, counts: sp.spmatrix, window: int) -> Path:
    """Write ``run_dir/item-transitions.npz``: the counts (sparse) and the window they were counted with."""
    path = Path(run_dir) / TRANSITIONS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    csr = sp.csr_matrix(counts, dtype=np.float64)
    np.savez_compressed(
        path, data=csr.data, indices=csr.indices, indptr=csr.indptr, shape=np.array(csr.shape), window=np.array(window)
    )
    return path


def load_transitions(run_dir: Path, num_items: int) -> sp.csr_matrix | None:
    """The counts saved in ``run_dir`` (None if there are none), checked against the catalogue."""
    path = Path(run_dir) / TRANSITIONS_FILE
    if not path.exists():
        return None
    with np.load(path) as saved:
        counts = sp.csr_matrix((saved["data"], saved["indices"], saved["indptr"]), shape=tuple(saved["shape"]))
    if counts.shape != (num_items, num_items):
        raise ValueError(f"{path}: counts of {counts.shape[0]} items for a catalogue of {num_items} items")
    return counts


def saved_window(run_dir: Path) -> int | None:
    """The window the counts in ``run_dir`` were counted with (None without counts or
    for a file that does not record it)."""
    path = Path(run_dir) / TRANSITIONS_FILE
    if not path.exists():
        return None
    with np.load(path) as saved:
        return int(saved["window"]) if "window" in saved.files else None
