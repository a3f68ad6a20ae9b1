"""``model.item-text``: which item text the item tower reads, and its own token cache."""

import dataclasses

import numpy as np
import pytest

from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.model.build import token_table, token_table_path
from fedrec.model.encoder import load_tokenizer
from fedrec.prepare import prepare
from tests.conftest import toy_run_config


def _squeezed(text: str) -> str:
    return "".join(text.lower().split())


def _decoded_items(table, tokenizer) -> list[str]:
    """Each item's tokens decoded, lower-cased and without spaces (WordPiece spacing)."""
    return [
        _squeezed(tokenizer.decode(ids[mask.astype(bool)], skip_special_tokens=True))
        for ids, mask in zip(table.item_ids, table.item_mask)
    ]


def test_title_setting_tokenizes_titles_and_keeps_its_own_cache(tmp_path):
    config = load_config(toy_run_config(tmp_path))
    prepared = prepare(config.data, config.eval)
    titled = dataclasses.replace(config.model, item_text="title")
    tokenizer = load_tokenizer(config.model.name)

    full = token_table(prepared, config.model)
    title_only = token_table(prepared, titled)

    texts = _decoded_items(full, tokenizer)
    titles = _decoded_items(title_only, tokenizer)
    assert titles == [_squeezed(t) for t in prepared.items["title"]]
    assert texts == [_squeezed(t) for t in prepared.items["text"]]
    assert all("genres" in t for t in texts) and not any("genres" in t for t in titles)
    # Histories are titles under both settings.
    for a, b in zip(full.title_tokens, title_only.title_tokens):
        np.testing.assert_array_equal(a, b)
    # Each setting has its own cache file, so switching never reuses the other's tokens.
    assert token_table_path(prepared, config.model) != token_table_path(prepared, titled)
    assert token_table_path(prepared, titled).exists()


def test_unknown_item_text_is_named():
    with pytest.raises(ConfigError, match="model.item-text"):
        load_config({"model.item-text": "description"})
