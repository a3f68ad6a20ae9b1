"""The frozen-layer cache: item texts run through the frozen lower layers once.

With LoRA only on the top layers (``lora.layers``), every layer below the first
adapted one is frozen and its input never changes, so an item's hidden states
entering the first adapted layer are the same in every step, round and client.
``model.cache-frozen-items`` computes them once per process for the whole
catalogue (``fedrec.model.build.cached_item_states``) and trains the item tower through the
adapted top layers only (:func:`embed_cached_items`). The user tower is not
cached: a history text differs from example to example.

The cache is exact in evaluation mode (the test checks it against the full
forward pass). In training the frozen layers' dropout (BERT's hidden and
attention dropout, 0.1 in MiniLM) no longer applies to item texts, a small
change of the training regime; docs/benchmarks.md reports its effect.
Memory: items x model.max-item-tokens x hidden x 4 bytes (1,682 x 32 x 384 x 4
= 83 MB for ML-100K and MiniLM).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from fedrec.config import LoraSettings
from fedrec.model.pooling import unit_mean_pool
from fedrec.tokens import TokenTable


@dataclass(frozen=True)
class FrozenItemStates:
    """Hidden states [I, T, H] of every item entering layer ``first_layer``, and masks [I, T]."""

    first_layer: int
    states: torch.Tensor
    mask: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()


def first_adapted_layer(lora: LoraSettings) -> int:
    """The lowest layer with adapters (0 when every layer has them)."""
    layers = lora.layer_list
    return min(layers) if layers else 0


def _bert(encoder: nn.Module) -> nn.Module:
    """The ``BertModel`` inside the PEFT wrapper (or the bare encoder)."""
    return encoder.get_base_model() if hasattr(encoder, "get_base_model") else encoder


def layer_count(encoder: nn.Module) -> int:
    """How many transformer layers the (PEFT-wrapped) encoder has."""
    return len(_bert(encoder).encoder.layer)


def _run_layers(bert: nn.Module, hidden: torch.Tensor, mask: torch.Tensor, layers: nn.ModuleList) -> torch.Tensor:
    """``hidden`` [B, T, H] through ``layers`` of ``bert`` with padding ``mask`` [B, T]."""
    attention = create_bidirectional_mask(config=bert.config, inputs_embeds=hidden, attention_mask=mask)
    for layer in layers:
        hidden = layer(hidden, attention)
    return hidden


@torch.no_grad()
def compute_item_states(
    encoder: nn.Module, table: TokenTable, first_layer: int, batch_size: int = 256
) -> FrozenItemStates:
    """Every item's hidden states entering ``first_layer`` (evaluation mode, no dropout).

    Runs the embeddings and the ``first_layer`` frozen layers below it only: the
    layers above are never evaluated for the cache (with LoRA on layers 4 and 5
    of six, a third of the encoder's work is saved).
    """
    was_training = encoder.training
    encoder.eval()
    bert = _bert(encoder)
    device = next(encoder.parameters()).device
    ids = torch.from_numpy(table.item_ids.astype(np.int64))
    mask = torch.from_numpy(table.item_mask.astype(np.int64))
    chunks = []
    for start in range(0, len(ids), batch_size):
        batch_mask = mask[start : start + batch_size].to(device)
        hidden = bert.embeddings(input_ids=ids[start : start + batch_size].to(device))
        chunks.append(_run_layers(bert, hidden, batch_mask, bert.encoder.layer[:first_layer]))
    encoder.train(was_training)
    return FrozenItemStates(first_layer, torch.cat(chunks), mask.to(device))


def embed_cached_items(encoder: nn.Module, cache: FrozenItemStates, items: torch.Tensor) -> torch.Tensor:
    """Unit-norm embeddings [B, D] of catalogue items [B], through the top layers only.

    Equal to the two-tower ``embed`` of the items' tokens; the frozen layers are skipped.
    """
    mask = cache.mask[items]
    length = int(mask.sum(1).max().clamp(min=1))
    hidden, mask = cache.states[items, :length], mask[:, :length]
    bert = _bert(encoder)
    hidden = _run_layers(bert, hidden, mask, bert.encoder.layer[cache.first_layer :])
    return unit_mean_pool(hidden, mask)
