"""The item-identity table (``model.item-ids``): exact at the start, trained only where
used, exchanged and served with the adapters, and per-sample exact under Opacus."""

import dataclasses

import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from fedrec.config import TrainConfig, load_config
from fedrec.errors import ConfigError
from fedrec.model.adapters import (
    adapter_state,
    load_adapter_state,
    load_saved_adapter,
    save_adapter,
)
from fedrec.model.build import build_recommender
from fedrec.model.encoder import tiny_bert_config
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.training import make_optimizer, train_local
from tests.conftest import (
    LORA,
    TINY,
    client_round_evaluated_by_server,
    toy_run_config,
    toy_server,
)
from tests.privacy.test_per_sample_gradients import (
    fixed_examples,
    opacus_gradients,
    per_example_gradients,
    prepare,
    trainable,
)

WITH_IDS = dataclasses.replace(TINY, item_ids=True)
ID_KEYS = ("user_ids", "user_mask", "item_ids", "item_mask", "items", "history", "history_mask")
TABLE_KEY = "base_model.model.item_identity.table.weight"
LOW_RANK = dataclasses.replace(WITH_IDS, item_id_rank=3)
PROJECTION_KEY = "base_model.model.item_identity.projection.weight"
HIDDEN = tiny_bert_config(vocab_size=1).hidden_size  # the tiny BERT's width: a full table's columns


def identity_model():
    return build_recommender(WITH_IDS, LORA, num_items=12)


def low_rank_model():
    return build_recommender(LOW_RANK, LORA, num_items=12)


def table_of(model):
    return adapter_state(model.encoder)[TABLE_KEY]


def set_table(model, values):
    state = adapter_state(model.encoder)
    state[TABLE_KEY] = values
    load_adapter_state(model.encoder, state)


def test_a_zero_table_scores_exactly_as_the_text_only_model(table, sequences):
    batch = default_collate(fixed_examples(table, sequences, 4))
    text_only, with_ids = prepare(build_recommender(TINY, LORA)), prepare(identity_model())
    assert table_of(with_ids).abs().max() == 0
    torch.testing.assert_close(
        with_ids(*(batch[k] for k in ID_KEYS)).detach(), text_only(*(batch[k] for k in ID_KEYS[:4])).detach()
    )


def test_an_identity_vector_moves_its_item_and_the_users_who_have_it(table, sequences):
    model = prepare(identity_model()).eval()
    batch = default_collate(fixed_examples(table, sequences, 4))
    items = torch.arange(12)
    ids = torch.from_numpy(table.item_ids.astype("int64"))
    mask = torch.from_numpy(table.item_mask.astype("int64"))
    before_items = model.embed_items(ids, mask, items).detach()
    users = (batch[k] for k in ("user_ids", "user_mask", "history", "history_mask"))
    before_users = model.embed_users(*users).detach()
    values = torch.zeros(12, HIDDEN)
    values[3] = 0.5 * torch.randn(HIDDEN)
    set_table(model, values)
    after_items = model.embed_items(ids, mask, items).detach()
    changed = ~torch.isclose(after_items, before_items).all(dim=1)
    assert changed.tolist() == [i == 3 for i in range(12)]
    after_users = model.embed_users(*(batch[k] for k in ("user_ids", "user_mask", "history", "history_mask")))
    has_three = ((batch["history"] == 3) & (batch["history_mask"] == 1)).any(dim=1)
    moved = ~torch.isclose(after_users.detach(), before_users).all(dim=1)
    assert has_three.any() and moved.tolist() == has_three.tolist()


def test_training_moves_only_the_rows_of_items_in_its_batches_at_the_identity_rate(table, sequences):
    model = identity_model()
    examples = fixed_examples(table, sequences, 4)
    batch = default_collate(examples)
    config = TrainConfig(lr=1e-3, id_lr=0.05, max_steps=1, batch_size=4)
    optimizer = make_optimizer(model, config)
    train_local(model, [batch], optimizer, config, torch.device("cpu"))
    rows = table_of(model).abs().max(dim=1).values
    touched = set(batch["items"].flatten().tolist()) | set(batch["history"][batch["history_mask"] == 1].tolist())
    assert touched and len(touched) < 12
    for item in range(12):
        if item in touched:  # Adam's first step moves each coordinate by its learning rate
            assert rows[item] == pytest.approx(0.05, rel=1e-3), item
        else:
            assert rows[item] == 0, item
    lora_step = max(float(p.detach().abs().max()) for n, p in trainable(model).items() if "lora_B" in n)
    assert lora_step == pytest.approx(1e-3, rel=1e-3)


def test_building_without_the_catalogue_size_is_refused():
    with pytest.raises(ValueError, match="catalogue size"):
        build_recommender(WITH_IDS, LORA)


@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize(("settings", "identity_params"), [(WITH_IDS, 1), (LOW_RANK, 2)], ids=["full", "low-rank"])
def test_opacus_per_sample_gradients_of_the_identities_are_exact(table, sequences, mode, settings, identity_params):
    model = prepare(build_recommender(settings, LORA, num_items=12))
    rows = settings.item_id_rank or HIDDEN
    set_table(model, 0.3 * torch.randn(12, rows, generator=torch.Generator().manual_seed(1)))
    batch = default_collate(fixed_examples(table, sequences, 5))
    expected = per_example_gradients(model, batch, ID_KEYS)
    actual = opacus_gradients(model, batch, mode, ID_KEYS)
    identity = [n for n in expected if "item_identity" in n]
    # 8 LoRA matrices and the table (and the low-rank projection)
    assert set(actual) == set(expected) and len(identity) == identity_params
    assert len(actual) == 8 + identity_params
    assert all(expected[n].abs().max() > 1e-4 for n in identity)
    for key, want in expected.items():
        assert (actual[key] - want).abs().max() <= 1e-6 * max(1.0, float(want.abs().max())), key


@pytest.mark.parametrize("rank", [0, 3])
def test_the_table_travels_in_checkpoints_and_survives_merging_for_serving(tmp_path, table, rank):
    settings = dataclasses.replace(WITH_IDS, item_id_rank=rank)
    model = prepare(build_recommender(settings, LORA, num_items=12)).eval()
    state, generator = adapter_state(model.encoder), torch.Generator().manual_seed(2)
    state[TABLE_KEY] = 0.3 * torch.randn(12, rank or HIDDEN, generator=generator)
    if rank:  # a trained projection, not the seeded one a fresh model starts from
        state[PROJECTION_KEY] = torch.randn(HIDDEN, rank, generator=generator)
    load_adapter_state(model.encoder, state)
    save_adapter(model.encoder, tmp_path / "adapter")
    fresh = build_recommender(settings, LORA, num_items=12)
    load_saved_adapter(fresh.encoder, tmp_path / "adapter")
    served = TwoTowerRecommender(fresh.encoder.merge_and_unload()).eval()
    ids = torch.from_numpy(table.item_ids.astype("int64"))
    mask = torch.from_numpy(table.item_mask.astype("int64"))
    want = model.embed_items(ids, mask, torch.arange(12)).detach()
    torch.testing.assert_close(served.embed_items(ids, mask, torch.arange(12)), want)


@pytest.mark.parametrize(("private", "rank"), [(False, 0), (True, 0), (True, 4)])
def test_a_client_round_trains_the_table_and_the_server_evaluates_it(tmp_path, private, rank):
    config, prepared, table, server = toy_server(
        tmp_path,
        **{"model.item-ids": True, "model.item-id-rank": rank, "train.id-lr": 0.01, "dp.enabled": private},
    )
    start = server.adapters()
    assert start[TABLE_KEY].shape == (prepared.num_items, rank or HIDDEN)
    if rank:  # only the low-rank factors travel, no items x hidden table
        assert start[PROJECTION_KEY].shape == (HIDDEN, rank)
    else:
        assert PROJECTION_KEY not in start
    out = client_round_evaluated_by_server(config, prepared, table, server, start)
    assert out.adapters[TABLE_KEY].abs().max() > 0
    assert (out.privacy is not None) == private


def test_low_rank_identities_start_at_zero_and_every_party_gets_the_same_orthonormal_projection(table, sequences):
    batch = default_collate(fixed_examples(table, sequences, 4))
    text_only, low_rank = prepare(build_recommender(TINY, LORA)), prepare(low_rank_model())
    torch.testing.assert_close(
        low_rank(*(batch[k] for k in ID_KEYS)).detach(), text_only(*(batch[k] for k in ID_KEYS[:4])).detach()
    )
    state, other = adapter_state(low_rank.encoder), adapter_state(low_rank_model().encoder)
    assert state[TABLE_KEY].shape == (12, 3) and state[TABLE_KEY].abs().max() == 0
    projection = state[PROJECTION_KEY]
    assert projection.shape == (HIDDEN, 3)
    torch.testing.assert_close(projection, other[PROJECTION_KEY], rtol=0, atol=0)
    torch.testing.assert_close(projection.T @ projection, torch.eye(3))
    rows = torch.randn(12, 3, generator=torch.Generator().manual_seed(3))
    set_table(low_rank, rows)
    vectors = low_rank.item_identity(torch.arange(12)).detach()
    torch.testing.assert_close(vectors, rows @ projection.T)
    torch.testing.assert_close(vectors.norm(dim=1), rows.norm(dim=1))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"model.item-id-rank": 4}, "needs model.item-ids"), ({"model.item-ids": True, "model.item-id-rank": -1}, ">= 0")],
)
def test_an_item_id_rank_without_identities_or_below_zero_is_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(toy_run_config(tmp_path, **overrides))
