"""The frozen-layer item cache gives the same embeddings, logits and gradients."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.data._utils.collate import default_collate

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, LoraSettings, load_config
from fedrec.local_round import run_local_round
from fedrec.model.adapters import adapter_state
from fedrec.model.build import build_recommender, cached_item_states, token_table
from fedrec.model.frozen_cache import (
    compute_item_states,
    embed_cached_items,
    first_adapted_layer,
)
from fedrec.prepare import prepare as prepare_data
from tests.conftest import TINY, toy_run_config
from tests.privacy.test_per_sample_gradients import (
    KEYS,
    fixed_examples,
    opacus_gradients,
    prepare,
    trainable,
)

TOP_LAYER = LoraSettings(r=4, alpha=8, layers="1")  # the tiny BERT has layers 0 and 1


@pytest.fixture()
def top_lora_model():
    """LoRA on the top layer only, non-zero adapters, dropout off."""
    return prepare(build_recommender(TINY, TOP_LAYER))


def with_cache(model, table):
    cached = copy.deepcopy(model)
    cached.item_states = compute_item_states(cached.encoder, table, first_adapted_layer(TOP_LAYER))
    return cached


def test_cached_item_embeddings_equal_the_full_encoder(top_lora_model, table):
    model = top_lora_model.eval()
    cache = compute_item_states(model.encoder, table, 1)
    assert cache.states.shape == (12, TINY.max_item_tokens, 32)
    items = torch.tensor([3, 0, 11, 7])
    ids = torch.from_numpy(table.item_ids[items.numpy()].astype("int64"))
    mask = torch.from_numpy(table.item_mask[items.numpy()].astype("int64"))
    torch.testing.assert_close(embed_cached_items(model.encoder, cache, items), model.embed(ids, mask))
    # the states entering layer 1 are not the embeddings: the cache skipped real work
    assert not torch.allclose(cache.states, compute_item_states(model.encoder, table, 0).states)


@pytest.mark.parametrize("first_layer", [0, 1, 2])
def test_cached_states_equal_the_full_forwards_hidden_states(top_lora_model, table, first_layer):
    """The cache runs only the layers below ``first_layer``; the states match BERT's own."""
    model = top_lora_model.eval()
    ids = torch.from_numpy(table.item_ids.astype("int64"))
    mask = torch.from_numpy(table.item_mask.astype("int64"))
    full = model.encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    cache = compute_item_states(model.encoder, table, first_layer, batch_size=5)  # batches of 5, 5, 2
    torch.testing.assert_close(cache.states, full[first_layer])


def test_logits_and_gradients_are_unchanged_by_the_cache(top_lora_model, table, sequences):
    batch = default_collate(fixed_examples(table, sequences, 5))
    plain, cached = top_lora_model, with_cache(top_lora_model, table)
    results = []
    for model, items in ((plain, None), (cached, batch["items"])):
        model.zero_grad(set_to_none=True)
        logits = model(*(batch[k] for k in KEYS), items)
        nn.functional.cross_entropy(logits, torch.zeros(5, dtype=torch.long)).backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in trainable(model).items()}))
    (logits, grads), (cached_logits, cached_grads) = results
    torch.testing.assert_close(cached_logits, logits)
    assert set(grads) == set(cached_grads) and len(grads) == 4  # A, B of query, value in layer 1
    for name, grad in grads.items():
        assert grad.abs().max() > 1e-4, name
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-4, atol=1e-6)


def test_opacus_per_sample_gradients_through_the_cache(top_lora_model, table, sequences):
    """Hooks-mode grad samples through the cached item tower equal the uncached ones."""
    batch = default_collate(fixed_examples(table, sequences, 4))
    expected = opacus_gradients(copy.deepcopy(top_lora_model), batch, "sum")
    cached = with_cache(top_lora_model, table)
    forward = cached.forward
    cached.forward = lambda *args: forward(*args, batch["items"])  # what train_local passes
    actual = opacus_gradients(cached, batch, "sum")
    for name, want in expected.items():
        assert want.shape[0] == 4
        torch.testing.assert_close(actual[name], want, rtol=1e-4, atol=1e-6)


def test_cache_needs_frozen_lower_layers():
    for layers in ("", "0,1"):
        with pytest.raises(ConfigError, match="model.cache-frozen-items"):
            load_config({"model.cache-frozen-items": True, "lora.layers": layers})
    load_config({"model.cache-frozen-items": True, "lora.layers": "4,5"})


def test_local_round_with_the_cache_trains_the_top_adapters(tmp_path):
    settings = toy_run_config(tmp_path, **{"lora.layers": "1", "model.cache-frozen-items": True})
    config = load_config(settings)
    prepared = prepare_data(config.data, config.eval)
    table = token_table(prepared, config.model)
    data = load_client_data(config, prepared, 0, 24)
    start = adapter_state(build_recommender(config.model, config.lora).encoder)
    out = run_local_round(config, data, table, start, server_round=1)
    assert out.result.steps >= 1 and out.result.examples > 0
    assert max((out.adapters[k] - start[k]).abs().max() for k in start) > 0
    states = cached_item_states(config.model, config.lora, table)
    assert states is cached_item_states(config.model, config.lora, table)  # once per process
    assert states.first_layer == 1 and states.states.shape[0] == prepared.num_items


def test_private_round_through_the_cache(tmp_path):
    """DP-SGD (make_private, Poisson sampling) with the cached item tower."""
    settings = toy_run_config(
        tmp_path, **{"lora.layers": "1", "model.cache-frozen-items": True, "dp.enabled": True, "dp.noise-multiplier": 1.0}
    )
    config = load_config(settings)
    prepared = prepare_data(config.data, config.eval)
    table = token_table(prepared, config.model)
    start = adapter_state(build_recommender(config.model, config.lora).encoder)
    out = run_local_round(config, load_client_data(config, prepared, 1, 24), table, start, server_round=1)
    assert out.privacy is not None and out.privacy.epsilon > 0
    assert max((out.adapters[k] - start[k]).abs().max() for k in start) > 0
