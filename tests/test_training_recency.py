"""``train.recent-items``: training ranks with the user embedding the device ranks with."""

import copy

import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, PersonalConfig, load_config
from fedrec.evaluation import encode_items
from fedrec.local_round import run_local_round
from fedrec.model.adapters import adapter_state
from fedrec.model.build import build_recommender, token_table, training_recency
from fedrec.model.personal_vector import personalise
from fedrec.model.recommender import RecencyTerm
from fedrec.prepare import prepare as prepare_data
from fedrec.training import BATCH_KEYS
from simulations.runner import resolve_settings
from tests.conftest import TINY, toy_run_config
from tests.privacy.test_per_sample_gradients import (
    fixed_examples,
    inputs,
    opacus_gradients,
    per_example_gradients,
    prepare,
)
from tests.test_frozen_cache import TOP_LAYER, with_cache

RECENT = RecencyTerm(items=3, weight=0.4)


@pytest.fixture()
def top_lora_model():
    """LoRA on the top layer of the tiny BERT, non-zero adapters, dropout off."""
    return prepare(build_recommender(TINY, TOP_LAYER))


def test_training_logits_use_the_devices_recency_term(top_lora_model, table, sequences):
    model = with_cache(top_lora_model, table)
    batch = default_collate(fixed_examples(table, sequences, 6))
    model_inputs = inputs(batch, BATCH_KEYS)
    plain = model(*model_inputs).detach()
    model.recency = RECENT
    logits = model(*model_inputs).detach()

    # independently: the device's term (personal_vector.personalise) on the catalogue embeddings
    catalogue = encode_items(model, table, torch.device("cpu"))
    users = model.embed_users(*(batch[k] for k in ("user_ids", "user_mask", "history", "history_mask")))
    histories = [h[m.bool()].numpy()[::-1].copy() for h, m in zip(batch["history"], batch["history_mask"])]
    assert sorted({len(h) for h in histories})[:2] == [1, 2]  # shorter histories than 3 are covered
    device_users = personalise(
        users, catalogue, histories, PersonalConfig(recent_items=3, recent_weight=0.4), model.temperature
    )
    candidates = catalogue[batch["items"]]
    expected = torch.einsum("bd,bcd->bc", device_users, candidates) / model.temperature
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert (logits - plain).abs().max() > 0.1  # the term changes the ranking scores


def test_recency_needs_the_frozen_item_cache(top_lora_model, table, sequences):
    top_lora_model.recency = RECENT
    batch = default_collate(fixed_examples(table, sequences, 2))
    with pytest.raises(ValueError, match="frozen-layer item cache"):
        top_lora_model(*inputs(batch, BATCH_KEYS))


def test_opacus_per_sample_gradients_with_the_recency_term(top_lora_model, table, sequences):
    """The history items' item-tower calls add rows to no example but their own."""
    model = with_cache(top_lora_model, table)
    model.recency = RECENT
    batch = default_collate(fixed_examples(table, sequences, 5))
    expected = per_example_gradients(copy.deepcopy(model), batch, BATCH_KEYS)
    actual = opacus_gradients(model, batch, "sum", BATCH_KEYS)
    assert set(actual) == set(expected) and len(actual) == 4
    for name, want in expected.items():
        assert want.shape[0] == 5 and want.abs().max() > 1e-4, name
        torch.testing.assert_close(actual[name], want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("settings", "fault"),
    [
        ({"personal.recent-items": 0}, "personal.recent-items is 0"),
        ({"personal.recent-items": 3, "model.cache-frozen-items": False}, "model.cache-frozen-items"),
    ],
)
def test_config_refuses_a_term_the_device_would_not_add(settings, fault):
    base = {"train.recent-items": 3, "lora.layers": "4,5", "model.cache-frozen-items": True}
    with pytest.raises(ConfigError, match=fault):
        load_config({**base, **settings})
    load_config({**base, "personal.recent-items": 3})


def test_the_device_may_rank_with_fewer_recent_items_than_training_used(tmp_path):
    """The quality preset trains with 3 items and ranks with 2 (measured higher)."""
    config, _ = resolve_settings("quality", {}, tmp_path)
    assert (config.train.recent_items, config.personal.recent_items) == (3, 2)
    assert training_recency(config) == RecencyTerm(3, config.personal.recent_weight)


def test_local_round_trains_with_the_recency_term(tmp_path):
    common = {"lora.layers": "1", "model.cache-frozen-items": True, "personal.recent-items": 2}
    trained, start = [], None
    for recent in (0, 2):
        config = load_config(toy_run_config(tmp_path, **common, **{"train.recent-items": recent}))
        prepared = prepare_data(config.data, config.eval)
        table = token_table(prepared, config.model)
        start = start or adapter_state(build_recommender(config.model, config.lora).encoder)
        out = run_local_round(config, load_client_data(config, prepared, 0, 24), table, start, server_round=1)
        trained.append(out)
    without, with_term = trained
    assert without.result.steps == with_term.result.steps >= 1
    assert with_term.result.loss != pytest.approx(without.result.loss, rel=1e-4)
    assert max(float((with_term.adapters[k] - without.adapters[k]).abs().max()) for k in start) > 0
