"""Top-k recommendations from a trained run, for known users and for new ones.

>>> from fedrec.serving import Recommender
>>> rec = Recommender.from_run("runs/default")           # doctest: +SKIP
>>> rec.for_user("1", k=10)                               # doctest: +SKIP
>>> rec.for_history(item_ids=["50", "172"], texts=["Alien (1979)"])  # doctest: +SKIP

A user is embedded from the text of their recent history (the same user tower
as in training); scores are cosine similarities against the cached item index;
items the user already has are never recommended. Each recommendation names the
history items most similar to it ("because you watched ...").
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from fedrec.config import RunConfigValue
from fedrec.evaluation import histories_for
from fedrec.examples import padded_history
from fedrec.model.encoder import load_tokenizer
from fedrec.model.personal_vector import personalise
from fedrec.model.sequence_tower import history_vectors
from fedrec.serving.index import item_index
from fedrec.serving.trained import TrainedModel, load_trained
from fedrec.tokens import join_titles


class ServingError(ValueError):
    """A request cannot be answered; the message says which input is at fault."""


class UnknownUserError(ServingError):
    """The user id is not in the run's dataset."""


class UnknownItemError(ServingError):
    """An item id is not in the catalogue."""


class EmptyHistoryError(ServingError):
    """A new user with no history items and no texts."""


def top_k(
    items: torch.Tensor,
    user_vector: torch.Tensor,
    exclude: np.ndarray,
    k: int,
    item_prior: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores) of the k rows of ``items`` [I, D] most similar to ``user_vector``.

    One matrix-vector product over the index and a partial sort; rows in
    ``exclude`` (the user's items) are never returned. ``item_prior`` [I] is
    added to the scores (the popularity prior, ``popularity.weight``).
    """
    scores = items @ user_vector
    if item_prior is not None:
        scores = scores + item_prior
    if len(exclude):
        scores[torch.from_numpy(np.asarray(exclude, dtype=np.int64))] = -torch.inf
    k = min(k, len(items) - len(np.unique(exclude)))
    best = torch.topk(scores, k)
    return best.indices.numpy(), best.values.numpy()


@dataclass(frozen=True)
class Recommendation:
    """One recommended item, its score and why."""

    item_id: str
    title: str
    score: float
    because: tuple[str, ...]
    """Titles of the history items most similar to this one (catalogued items only)."""

    def to_json(self) -> dict:
        return {**asdict(self), "because": list(self.because)}


class Recommender:
    """Answers "top-k for this user" from a trained run's merged model and item index."""

    def __init__(
        self,
        trained: TrainedModel,
        explanations: int = 2,
        items: torch.Tensor | None = None,
    ) -> None:
        """``items``: the item index to use instead of :func:`item_index`'s (benchmarks)."""
        self.trained = trained
        self.personal = trained.config.personal
        self.explanations = explanations
        self.items = item_index(trained) if items is None else items
        catalogue = trained.catalogue
        self.item_ids: list[str] = catalogue["item_id"].astype(str).tolist()
        self.titles: list[str] = catalogue["title"].astype(str).tolist()
        self.item_index_of = {item_id: i for i, item_id in enumerate(self.item_ids)}
        users = trained.prepared.users
        self.user_index_of = dict(zip(users["user_id"].astype(str), users["user_idx"].astype(int)))
        self._lock = threading.Lock()  # one forward pass at a time (HTTP threads)

    @classmethod
    def from_run(
        cls,
        run_dir: str | Path,
        server_round: int | None = None,
        quantization: str = "none",
        overrides: Mapping[str, RunConfigValue] | None = None,
        average_rounds: Sequence[int] = (),
        local_adapters: str | Path | None = None,
        new_items: str | Path | None = None,
    ) -> Recommender:
        """Load a run directory written by ``fedrec simulate``; ``overrides``:
        evaluation-time settings, e.g. ``{"personal.enabled": True}``;
        ``average_rounds``: serve the mean of those rounds' checkpoints;
        ``local_adapters``: a device's own ``lora_B`` file (``lora.local-b`` runs);
        ``new_items``: an item table of items added after training, served from their text."""
        local = None if local_adapters is None else Path(local_adapters)
        added = None if new_items is None else Path(new_items)
        return cls(load_trained(Path(run_dir), server_round, quantization, overrides, average_rounds, local, added))

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @cached_property
    def _histories(self) -> list[np.ndarray]:
        """Every known interaction of each user, chronological (train, valid, test)."""
        return histories_for(self.trained.prepared, "all")

    @cached_property
    def _tokenizer(self):
        return load_tokenizer(self.trained.config.model.name)

    def history_of(self, user_id: str) -> np.ndarray:
        """Catalogue indices of the user's known items, oldest first."""
        try:
            return self._histories[self.user_index_of[str(user_id)]]
        except KeyError:
            raise UnknownUserError(f"unknown user id {user_id!r}") from None

    def item_indices(self, item_ids: Sequence[str]) -> np.ndarray:
        """Catalogue indices of item ids; an unknown id raises :class:`UnknownItemError`."""
        unknown = [i for i in item_ids if str(i) not in self.item_index_of]
        if unknown:
            raise UnknownItemError(f"unknown item id(s) {unknown[:5]} (not in the catalogue)")
        return np.array([self.item_index_of[str(i)] for i in item_ids], dtype=np.int64)

    @torch.no_grad()
    def user_vector(self, history: np.ndarray, texts: Sequence[str] = ()) -> torch.Tensor:
        """The user tower's embedding [D] of catalogue items, then free-text titles.

        Both are taken as chronological (last = most recent); the text starts
        with the most recent, as in training. ``personal.*`` then adds the user's
        private vector and recency term, from the catalogue items of ``history``.
        """
        settings = self.trained.config.model
        titles = [self.trained.table.title_tokens[i] for i in history]
        if texts:
            encoded = self._tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            titles += [np.asarray(t, dtype=np.int32) for t in encoded]
        if not titles:
            raise EmptyHistoryError("a user needs at least one history item or text")
        recent_first = titles[-settings.history_items :][::-1]
        ids, mask = join_titles(self.trained.table, recent_first, settings.max_user_tokens)
        # item identities (model.item-ids) exist for catalogue items only, not free text
        known, known_mask = padded_history(np.asarray(history)[-settings.history_items :][::-1], settings.history_items)
        known, known_mask = torch.from_numpy(known[None]), torch.from_numpy(known_mask[None])
        with self._lock:
            vector = self.trained.model.embed_users(
                torch.from_numpy(ids[None].astype(np.int64)),
                torch.from_numpy(mask[None].astype(np.int64)),
                known,
                known_mask,
                history_vectors(self.items, known, known_mask),
            )
        if self.personal.active and len(history):
            vector = personalise(
                vector, self.items, [np.asarray(history)], self.personal, self.trained.model.temperature
            )
        return vector[0].float()

    def top_k(
        self, user_vector: torch.Tensor, exclude: np.ndarray, k: int, history: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(item indices, scores) of the k best catalogue items, ``exclude`` left out
        (``history``: the user's catalogue items, which the transition prior reads)."""
        return top_k(self.items, user_vector, exclude, k, self._prior(history))

    def _prior(self, history: np.ndarray | None) -> torch.Tensor | None:
        """What is added to the cosine scores: the popularity prior and the user's
        transition prior (zero for items that have no counts, e.g. items added after training)."""
        prior = self.trained.item_prior
        user_prior = self.trained.user_prior
        if user_prior is None or history is None or not len(history):
            return prior
        from_history = user_prior([np.asarray(history, dtype=np.int64)])[0]
        padded = from_history.new_zeros(len(self.items))
        padded[: len(from_history)] = from_history
        return padded if prior is None else prior + padded

    def _explain(self, recommended: np.ndarray, history: np.ndarray) -> list[tuple[str, ...]]:
        if not len(history) or not self.explanations:
            return [() for _ in recommended]
        unique = np.unique(history)
        similarity = self.items[torch.from_numpy(recommended)] @ self.items[torch.from_numpy(unique)].T
        n = min(self.explanations, len(unique))
        nearest = torch.topk(similarity, n, dim=1).indices.numpy()
        return [tuple(self.titles[unique[j]] for j in row) for row in nearest]

    @cached_property
    def _index_of_title(self) -> dict[str, int]:
        return {title.strip().casefold(): i for i, title in enumerate(self.titles)}

    def _answer(self, history: np.ndarray, texts: Sequence[str], k: int) -> list[Recommendation]:
        if k < 1:
            raise ServingError(f"k must be >= 1, not {k}")
        # a free-text title that names a catalogue item is something the user has too
        named = [self._index_of_title[t.strip().casefold()] for t in texts if t.strip().casefold() in self._index_of_title]
        exclude = np.concatenate([history, np.asarray(named, dtype=np.int64)])
        indices, scores = self.top_k(self.user_vector(history, texts), exclude, k, history)
        reasons = self._explain(indices, exclude)
        return [
            Recommendation(self.item_ids[i], self.titles[i], float(s), why)
            for i, s, why in zip(indices, scores, reasons)
        ]

    def for_user(self, user_id: str, k: int = 10) -> list[Recommendation]:
        """Top-k for a user of the run's dataset, excluding everything they have."""
        return self._answer(self.history_of(user_id), (), k)

    def for_history(
        self, item_ids: Sequence[str] = (), texts: Sequence[str] = (), k: int = 10
    ) -> list[Recommendation]:
        """Top-k for a new user from catalogue item ids and/or free-text titles."""
        return self._answer(self.item_indices(item_ids), texts, k)
