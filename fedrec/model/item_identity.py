"""A learned identity vector per catalogue item, beside its text embedding.

Text alone cannot tell apart two items whose titles and genres read alike, nor
learn that an item is liked beyond what its text says; ID-based recommenders
(matrix factorisation, PFedRec) memorise one vector per item for that. With
``model.item-ids`` the two-tower model adds such a vector to the item's unit
text embedding, and the mean of the history items' vectors to the user's,
before both are normalised again:

    item = normalise(text(i) + id[i])        user = normalise(text(h) + mean id[h])

The table starts at zero, so an untrained model is exactly the text-only one,
and an item never drawn, not even as a sampled negative, keeps the zero vector:
it is scored from its text alone, as is an item added to the catalogue after
training (:func:`grow_item_identity`, ``fedrec recommend --new-items``). An
item that is in the catalogue but has no interactions is still drawn as a
negative, so its vector only learns to keep it away from users, as an ID
model's would; leaving the negatives' vectors untrained does not help such
items, since the warm items' vectors then share a pull towards users that text
alone lacks (docs/results.md, "Cold start").

With ``model.item-id-rank`` r > 0 the vectors are low-rank, as LoRA factors a
weight update: ``id[i] = P e[i]`` with a zero [items, r] table ``e`` and a shared
[hidden, r] projection ``P`` with orthonormal columns (seeded, so every party
starts from the same one), so a row's norm is its vector's. The upload shrinks
from items x hidden to items x r + hidden x r floats, and under DP-SGD each
example's clipped gradient falls on r coordinates per item instead of hidden, so
the same noise drowns less of it.

The module is a PEFT ``modules_to_save`` module: it is trained, checkpointed,
sent and averaged together with the LoRA adapters.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fedrec.model.pooling import mean_pool

MODULE_NAME = "item_identity"
"""Attribute of the base encoder that holds the table (PEFT ``modules_to_save``)."""


PROJECTION_SEED = 0
"""Seed of the low-rank projection's initial value, the same for every party."""


class ItemIdentity(nn.Module):
    """Identity vectors of width ``dim``, zero at the start: an [items, dim] table,
    or with ``rank`` > 0 an [items, rank] table times a [dim, rank] projection."""

    def __init__(self, num_items: int, dim: int, rank: int = 0) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError("model.item-ids needs the catalogue size (num_items >= 1)")
        if not 0 <= rank <= dim:
            raise ValueError(f"model.item-id-rank must be between 0 and the width {dim}, got {rank}")
        self.table = nn.Embedding(num_items, rank or dim)
        nn.init.zeros_(self.table.weight)
        self.projection: nn.Linear | None = None
        if rank:
            self.projection = nn.Linear(rank, dim, bias=False)
            generator = torch.Generator().manual_seed(PROJECTION_SEED)
            with torch.no_grad():
                basis, _ = torch.linalg.qr(torch.randn(dim, rank, generator=generator))
                self.projection.weight.copy_(basis)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Identity vectors of catalogue indices, shape ``[*items.shape, dim]``."""
        rows = self.table(items)
        return rows if self.projection is None else self.projection(rows)


def attach_item_identity(encoder: nn.Module, num_items: int, rank: int = 0) -> None:
    """Give the (not yet PEFT-wrapped) encoder zero identity vectors of its width
    (``rank`` > 0: low-rank, see the module docstring)."""
    encoder.add_module(MODULE_NAME, ItemIdentity(num_items, encoder.config.hidden_size, rank))


def grow_item_identity(identity: ItemIdentity, extra_items: int) -> None:
    """Append ``extra_items`` zero rows to a (merged, inference-time) table: items
    added to the catalogue after training, scored from their text alone."""
    if extra_items < 0:
        raise ValueError(f"cannot remove items from the identity table ({extra_items})")
    old = identity.table.weight.detach()
    grown = nn.Embedding(old.shape[0] + extra_items, old.shape[1], dtype=old.dtype, device=old.device)
    with torch.no_grad():
        grown.weight.zero_()
        grown.weight[: old.shape[0]] = old
    grown.weight.requires_grad_(False)
    identity.table = grown


def zero_identities(identity: ItemIdentity, items: np.ndarray | list[int]) -> None:
    """Set the identity vectors of ``items`` to zero: they are scored from their text
    alone, as items that join the catalogue after training are."""
    with torch.no_grad():
        identity.table.weight[torch.as_tensor(items, dtype=torch.long)] = 0.0


def find_item_identity(encoder: nn.Module) -> nn.Module | None:
    """The identity table of a PEFT-wrapped or merged encoder, or None without one."""
    base = encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder
    return getattr(base, MODULE_NAME, None)


def with_identity(text: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Unit-norm sum of unit text embeddings and identity vectors (float32)."""
    return nn.functional.normalize(text + identity.float(), dim=-1)


def pooled_identity(identity: nn.Module, history: torch.Tensor, history_mask: torch.Tensor) -> torch.Tensor:
    """Mean identity vector [B, D] of each row's history items (``history_mask`` 1 where real)."""
    return mean_pool(identity(history).float(), history_mask)
