"""SASRec, a central sequential baseline, scored by the same evaluation code as fedrec.

Kang and McAuley, *Self-attentive sequential recommendation* (ICDM 2018): one
ID embedding per item plus a learnt position embedding, causal self-attention
blocks over a user's last ``max_len`` items in time order, and the output at
the last position dotted with every item's embedding. It is trained centrally
on the pooled training sequences (every prefix predicts its next item), with
no privacy, and measures how much the *order* of a user's history is worth on
a protocol whose held-out item is the user's latest one.

Two losses: ``bce``, the paper's (each next item against one sampled item the
user never interacted with), and ``ce``, a softmax over the whole catalogue
(Klenitskiy and Vasilev, RecSys 2023, "Turning dross into gold loss"), often
the stronger of the two. The epoch with the best validation NDCG@k (sampled)
is kept and scored on the test split.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from fedrec.evaluation import Scorer, evaluate_scorer, histories_for
from fedrec.prepare import PreparedData

log = logging.getLogger(__name__)

PAD = 0
"""Index of the padding token; item ``i`` is token ``i + 1``."""

LOSSES = ("bce", "ce")


@dataclass(frozen=True)
class SasRecSettings:
    """Hyper-parameters of SASRec (the paper's ML-1M settings, scaled to ML-100K's size)."""

    dim: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    max_len: int = 200
    """The last ``max_len`` items of a history are read; earlier ones are dropped."""
    epochs: int = 200
    eval_every: int = 10
    """Validation NDCG@k every this many epochs (and at the last); the best is kept."""
    batch_size: int = 128
    lr: float = 1e-3
    loss: str = "bce"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"SASRec loss {self.loss!r} is not one of {LOSSES}")
        if self.dim % self.heads:
            raise ValueError(f"SASRec dim {self.dim} is not a multiple of heads {self.heads}")
        for name in ("dim", "blocks", "heads", "max_len", "epochs", "eval_every", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"SASRec {name} must be at least 1, got {getattr(self, name)}")


class SasRec(nn.Module):
    """Causal self-attention over item sequences; ``forward`` gives one state per position."""

    def __init__(self, num_items: int, settings: SasRecSettings) -> None:
        super().__init__()
        self.items = nn.Embedding(num_items + 1, settings.dim, padding_idx=PAD)
        self.positions = nn.Embedding(settings.max_len, settings.dim)
        self.dropout = nn.Dropout(settings.dropout)
        layer = nn.TransformerEncoderLayer(
            settings.dim, settings.heads, dim_feedforward=settings.dim, dropout=settings.dropout,
            activation="relu", batch_first=True, norm_first=True,
        )
        self.blocks = nn.TransformerEncoder(layer, settings.blocks, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(settings.dim)
        self.max_len = settings.max_len
        for embedding in (self.items, self.positions):  # as the paper's code: small initial logits
            nn.init.xavier_normal_(embedding.weight)
        with torch.no_grad():
            self.items.weight[PAD].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, L] left-padded tokens -> [B, L, dim] states; position t sees tokens 0..t only."""
        length = tokens.shape[1]
        keep = (tokens != PAD).unsqueeze(-1).float()
        x = self.items(tokens) * self.items.embedding_dim**0.5 + self.positions(torch.arange(length))
        x = self.dropout(x) * keep
        causal = nn.Transformer.generate_square_subsequent_mask(length)
        return self.norm(self.blocks(x, mask=causal, is_causal=True)) * keep

    def item_matrix(self) -> torch.Tensor:
        """[num_items, dim] embeddings of the real items (padding row dropped)."""
        return self.items.weight[1:]


def left_padded(histories: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """[users, max_len] tokens: each history's last ``max_len`` items, right-aligned."""
    tokens = torch.zeros(len(histories), max_len, dtype=torch.long)
    for row, history in enumerate(histories):
        recent = np.asarray(history, dtype=np.int64)[-max_len:]
        if len(recent):
            tokens[row, max_len - len(recent) :] = torch.from_numpy(recent) + 1
    return tokens


def sasrec_scorer(model: SasRec, histories: Sequence[np.ndarray], batch_size: int = 256) -> Scorer:
    """Scores of every item for each user: the last position's state against every item."""
    tokens = left_padded(histories, model.max_len)

    def score(users: np.ndarray) -> np.ndarray:
        model.eval()
        out = []
        with torch.no_grad():
            items = model.item_matrix()
            for start in range(0, len(users), batch_size):
                batch = tokens[torch.from_numpy(np.asarray(users[start : start + batch_size]))]
                out.append((model(batch)[:, -1] @ items.T).numpy())
        return np.concatenate(out).astype(np.float32)

    return score


@dataclass(frozen=True)
class SeenItems:
    """Which items each user has, as sorted ``user * num_items + item`` keys: memory
    grows with the interactions, not with users x items (ML-20M would need 3.7 GB dense)."""

    keys: np.ndarray
    counts: np.ndarray
    """Distinct items of each user."""
    num_items: int

    @classmethod
    def of(cls, items_by_user: Sequence[Sequence[int]], num_items: int) -> SeenItems:
        users = np.concatenate([np.full(len(items), u, dtype=np.int64) for u, items in enumerate(items_by_user)])
        items = np.concatenate([np.asarray(items, dtype=np.int64) for items in items_by_user])
        keys = np.unique(users * num_items + items)
        return cls(keys, np.bincount(keys // num_items, minlength=len(items_by_user)), num_items)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Whether each user has the item beside it."""
        query = users.astype(np.int64) * self.num_items + items
        if not len(self.keys):
            return np.zeros(len(query), dtype=bool)
        found = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return self.keys[found] == query


def _unseen(rng: np.random.Generator, users: np.ndarray, seen: SeenItems) -> np.ndarray:
    """One item per entry of ``users`` that the user never interacted with.

    A user who has every item gets any item: there is no unseen one to draw.
    """
    out = rng.integers(0, seen.num_items, size=len(users))
    has_unseen = seen.counts < seen.num_items
    clash = seen.contains(users, out) & has_unseen[users]
    while clash.any():
        out[clash] = rng.integers(0, seen.num_items, size=int(clash.sum()))
        clash = seen.contains(users, out) & has_unseen[users]
    return out


def _loss(model: SasRec, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, kind: str) -> torch.Tensor:
    """Next-item loss over the positions whose target is a real item."""
    states = model(inputs)
    real = targets != PAD
    if kind == "ce":
        logits = states[real] @ model.item_matrix().T
        return nn.functional.cross_entropy(logits, targets[real] - 1)
    positive = (states * model.items(targets)).sum(-1)[real]
    negative = (states * model.items(negatives)).sum(-1)[real]
    return -(nn.functional.logsigmoid(positive) + nn.functional.logsigmoid(-negative)).mean()


@dataclass(frozen=True)
class NextItemData:
    """Training sequences of the users with two or more items, and what each user has."""

    sequences: torch.Tensor
    """[rows, max_len + 1] left-padded tokens: inputs are ``[:, :-1]``, their next items ``[:, 1:]``."""
    users: np.ndarray
    """The user of each row."""
    seen: SeenItems
    """Items never drawn as a user's negatives: their history and held-out items."""


def next_item_data(
    histories: Sequence[np.ndarray], num_items: int, max_len: int, excluded: Sequence[Sequence[int]] = ()
) -> NextItemData:
    """Rows of every user with a next item to predict; ``excluded[u]``: user u's held-out items."""
    users = np.asarray([u for u, h in enumerate(histories) if len(h) >= 2], dtype=np.int64)
    if not len(users):
        raise ValueError("SASRec needs at least one user with two or more training items")
    known = [np.append(h, excluded[u]) if excluded else h for u, h in enumerate(histories)]
    return NextItemData(left_padded([histories[u] for u in users], max_len + 1), users, SeenItems.of(known, num_items))


def train_step(
    model: SasRec, optimizer: torch.optim.Optimizer, data: NextItemData, rows: np.ndarray,
    rng: np.random.Generator, loss: str,
) -> float:
    """One optimizer step on ``rows`` of ``data`` (every position predicts its next item); the loss."""
    model.train()
    inputs, targets = data.sequences[rows, :-1], data.sequences[rows, 1:]
    negatives = _unseen(rng, np.repeat(data.users[rows], targets.shape[1]), data.seen).reshape(len(rows), -1)
    negatives = torch.from_numpy(negatives + 1).masked_fill(targets == PAD, PAD)
    value = _loss(model, inputs, targets, negatives, loss)
    optimizer.zero_grad()
    value.backward()
    optimizer.step()
    return float(value.detach())


def new_optimizer(model: SasRec, lr: float) -> torch.optim.Optimizer:
    """The paper's Adam (beta2 0.98)."""
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))


def train_sasrec(
    histories: Sequence[np.ndarray],
    num_items: int,
    settings: SasRecSettings,
    validate: Callable[[SasRec], float] | None,
    excluded: Sequence[Sequence[int]] = (),
) -> tuple[SasRec, list[dict[str, float]]]:
    """Train SASRec on chronological ``histories``; keep the state with the best ``validate`` score
    (``validate=None``: train every epoch and keep the last state, as a refit does).

    ``excluded[u]``: items never drawn as user u's negatives besides their history
    (their held-out items). Returns the model and each validated epoch's figures.
    """
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    data = next_item_data(histories, num_items, settings.max_len, excluded)
    model = SasRec(num_items, settings)
    optimizer = new_optimizer(model, settings.lr)
    best, best_state, history = -np.inf, None, []
    for epoch in range(1, settings.epochs + 1):
        start, total = time.perf_counter(), 0.0
        order = rng.permutation(len(data.users))
        for s in range(0, len(order), settings.batch_size):
            rows = order[s : s + settings.batch_size]
            total += train_step(model, optimizer, data, rows, rng, settings.loss) * len(rows)
        if epoch % settings.eval_every and epoch != settings.epochs:
            continue
        if validate is None:
            history.append({"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - start})
            log.info("SASRec epoch %d/%d: loss %.4f", epoch, settings.epochs, total / len(order))
            continue
        score = validate(model)
        history.append({"epoch": epoch, "loss": total / len(order), "seconds": time.perf_counter() - start, "valid": score})
        log.info("SASRec epoch %d/%d: loss %.4f validation %.4f", epoch, settings.epochs, total / len(order), score)
        if score > best:
            best, best_state = score, {n: t.clone() for n, t in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model, history


def held_out_items(prepared: PreparedData) -> list[list[int]]:
    """Each user's validation and test items: never drawn as their training negatives."""
    valid = prepared.holdout("valid")["item_idx"].to_numpy()
    test = prepared.holdout("test")["item_idx"].to_numpy()
    return [[int(v), int(t)] for v, t in zip(valid, test)]


def run_sasrec_baseline(
    prepared: PreparedData,
    settings: SasRecSettings,
    k: int = 10,
    reorder: Callable[[np.ndarray], np.ndarray] | None = None,
    refit: bool = False,
) -> dict:
    """SASRec trained on the pooled training split, chosen on validation NDCG@k, scored on test.

    ``reorder``, applied to every history the model reads (training, validation
    and test), is for ablations: e.g. a shuffle removes the order of each
    history while the held-out items stay each user's latest.

    ``refit``: then also train a fresh model, with the same seed, on the training
    and validation items for the chosen number of epochs, and score it on test
    (``results["refit"]``): only the test item held out of training, the protocol
    of fedrec's ``train.include-valid-item``.
    """

    def histories(split: str) -> list[np.ndarray]:
        return [reorder(h) if reorder else h for h in histories_for(prepared, split)]

    valid_histories = histories("valid")  # the training items: SASRec trains on them

    def validate(model: SasRec) -> float:
        return evaluate_scorer(sasrec_scorer(model, valid_histories), prepared, "valid", k)[f"ndcg@{k}"]

    started = time.perf_counter()
    model, history = train_sasrec(valid_histories, prepared.num_items, settings, validate, held_out_items(prepared))
    best = max(history, key=lambda h: h["valid"])
    results = {
        "settings": asdict(settings),
        "best_epoch": best["epoch"],
        "minutes": (time.perf_counter() - started) / 60,
        "validation": evaluate_scorer(sasrec_scorer(model, valid_histories), prepared, "valid", k),
        "test": evaluate_scorer(sasrec_scorer(model, histories("test")), prepared, "test", k, beyond=True),
        "epochs": history,
    }
    if prepared.has_cold_test:  # items held out of training (eval.cold-items): ID vectors never trained
        results["cold"] = evaluate_scorer(sasrec_scorer(model, histories("cold")), prepared, "cold", k)
    if refit:
        started = time.perf_counter()
        test_histories = histories("test")  # the training items and the validation item
        chosen = replace(settings, epochs=best["epoch"])
        refitted, refit_history = train_sasrec(test_histories, prepared.num_items, chosen, None, held_out_items(prepared))
        results["refit"] = {
            "epochs": best["epoch"],
            "minutes": (time.perf_counter() - started) / 60,
            "test": evaluate_scorer(sasrec_scorer(refitted, test_histories), prepared, "test", k, beyond=True),
            "losses": refit_history,
        }
    return results
