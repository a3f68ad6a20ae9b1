"""Building the LoRA recommender and its token table, once per process.

A Ray actor runs many virtual clients one after another; the frozen base model,
the token table and (``model.cache-frozen-items``) the catalogue's frozen
lower-layer states are built once per actor (``functools.lru_cache``) and each
client only swaps in the adapters it received.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from fedrec.config import FedRecConfig, LoraSettings, ModelConfig
from fedrec.model.adapters import add_lora
from fedrec.model.encoder import load_encoder, load_tokenizer
from fedrec.model.frozen_cache import (
    FrozenItemStates,
    compute_item_states,
    first_adapted_layer,
)
from fedrec.model.item_identity import attach_item_identity
from fedrec.model.recommender import RecencyTerm, TwoTowerRecommender
from fedrec.model.sequence_tower import attach_sequence_tower
from fedrec.tokens import TokenTable, build_token_table

if TYPE_CHECKING:
    import pandas as pd

    from fedrec.prepare import PreparedData


def build_recommender(model: ModelConfig, lora: LoraSettings, num_items: int = 0) -> TwoTowerRecommender:
    """A fresh two-tower recommender with LoRA adapters on a frozen encoder.

    ``num_items``, the catalogue size, is needed only with ``model.item-ids``.
    """
    tokenizer = load_tokenizer(model.name)
    encoder = load_encoder(model.name, vocab_size=len(tokenizer))
    if model.item_ids:
        if num_items < 1:
            raise ValueError("model.item-ids needs the catalogue size: pass num_items")
        attach_item_identity(encoder, num_items, model.item_id_rank)
    if model.sequence_layers:
        attach_sequence_tower(encoder, model.history_items, model.sequence_dim, model.sequence_layers)
    return TwoTowerRecommender(add_lora(encoder, lora), temperature=model.temperature)


def training_recency(config: FedRecConfig) -> RecencyTerm | None:
    """The recency term training adds to user embeddings (``train.recent-items``), or None."""
    if not config.train.recent_items:
        return None
    return RecencyTerm(config.train.recent_items, config.personal.recent_weight)


def cached_recommender(model: ModelConfig, lora: LoraSettings, num_items: int = 0) -> TwoTowerRecommender:
    """The process-wide recommender for these settings; callers set its adapters.

    The catalogue size matters only with ``model.item-ids``, so it is not part of
    the key otherwise.
    """
    return _cached_recommender(model, lora, num_items if model.item_ids else 0)


@functools.lru_cache(maxsize=2)
def _cached_recommender(model: ModelConfig, lora: LoraSettings, num_items: int) -> TwoTowerRecommender:
    return build_recommender(model, lora, num_items)


def token_settings_key(model: ModelConfig) -> str:
    """A short digest of the settings a token table depends on: tokenizer, length, text."""
    settings = f"{model.name}|{model.max_item_tokens}|{model.item_text}"
    return hashlib.sha256(settings.encode()).hexdigest()[:10]


def tokenize_items(items: pd.DataFrame, model: ModelConfig) -> TokenTable:
    """Tokenize a catalogue's ``model.item-text`` column (item tower) and titles (histories)."""
    return build_token_table(
        load_tokenizer(model.name),
        items[model.item_text].astype(str).tolist(),
        items["title"].astype(str).tolist(),
        model.max_item_tokens,
    )


def token_table_path(prepared: PreparedData, model: ModelConfig) -> Path:
    """Cache file of the token table for this dataset and these token settings."""
    return prepared.root / f"tokens-{token_settings_key(model)}.npz"


def token_table(prepared: PreparedData, model: ModelConfig) -> TokenTable:
    """The dataset's token table, tokenized once and cached beside the prepared data."""
    return stored_token_table(token_table_path(prepared, model), prepared.items, model)


def stored_token_table(path: Path, items: pd.DataFrame, model: ModelConfig) -> TokenTable:
    """The token table kept at ``path``: tokenized and written there on first use, then
    read from disk once per process."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tokenize_items(items, model).save(path)
    return cached_token_table(path)


@functools.lru_cache(maxsize=4)
def cached_token_table(path: Path) -> TokenTable:
    """Token table read from disk once per process."""
    return TokenTable.load(path)


_ITEM_STATES: dict[tuple, FrozenItemStates] = {}


def cached_item_states(model: ModelConfig, lora: LoraSettings, table: TokenTable) -> FrozenItemStates:
    """The catalogue's frozen lower-layer states for these settings, built once per process.

    Keyed by the settings and a digest of the catalogue's tokens, so a process
    that serves two catalogues (or two models) keeps them apart.
    """
    key = (model, lora, table.item_digest())
    if key not in _ITEM_STATES:
        if len(_ITEM_STATES) >= 2:
            _ITEM_STATES.pop(next(iter(_ITEM_STATES)))
        encoder = cached_recommender(model, lora, len(table.item_ids)).encoder
        _ITEM_STATES[key] = compute_item_states(encoder, table, first_adapted_layer(lora))
    return _ITEM_STATES[key]
