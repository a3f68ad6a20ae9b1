"""The sequential user tower (``model.sequence-layers``): exact at the start, reads order
and not padding, learns what a set of items cannot tell, travels and serves with the
adapters, is trained by a client round, and is per-sample exact under Opacus."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from fedrec.client_data import load_client_data
from fedrec.config import load_config
from fedrec.errors import ConfigError
from fedrec.evaluation import encode_items, encode_users
from fedrec.examples import NextItemDataset, build_examples
from fedrec.model.adapters import (
    adapter_state,
    load_adapter_state,
    load_saved_adapter,
    save_adapter,
)
from fedrec.model.build import build_recommender, token_table
from fedrec.model.encoder import tiny_bert_config
from fedrec.model.recommender import TwoTowerRecommender
from fedrec.model.sequence_tower import SequenceTower
from fedrec.prepare import prepare as prepare_data
from fedrec.training import BATCH_KEYS
from tests.conftest import (
    LORA,
    TINY,
    client_round_evaluated_by_server,
    toy_run_config,
    toy_server,
)
from tests.privacy.test_per_sample_gradients import (
    NEGATIVES,
    inputs,
    opacus_gradients,
    per_example_gradients,
    prepare,
)

HIDDEN = tiny_bert_config(vocab_size=1).hidden_size
WITH_TOWER = dataclasses.replace(TINY, item_ids=True, sequence_layers=2, sequence_dim=8)
OUT_KEY = "base_model.model.sequence_tower.project_out.weight"


def tower_model():
    return build_recommender(WITH_TOWER, LORA, num_items=12)


def with_trained_output(model, seed=1):
    """The tower's output projection set non-zero (it starts at zero), as after training."""
    state = adapter_state(model.encoder)
    key = next(k for k in state if k.endswith("sequence_tower.project_out.weight"))
    state[key] = 0.5 * torch.randn(state[key].shape, generator=torch.Generator().manual_seed(seed))
    load_adapter_state(model.encoder, state)
    return model


def batch_with_vectors(model, table, sequences, size):
    vectors = encode_items(model, table, torch.device("cpu"))
    dataset = NextItemDataset(build_examples(sequences, 5), table, NEGATIVES, 24, seed=0, item_vectors=vectors)
    return default_collate([dataset[i] for i in range(size)])


def test_an_untrained_tower_scores_exactly_as_the_model_without_it(table, sequences):
    without = prepare(build_recommender(dataclasses.replace(WITH_TOWER, sequence_layers=0), LORA, num_items=12))
    with_tower = prepare(tower_model())
    batch = batch_with_vectors(with_tower, table, sequences, 4)
    assert batch["history_vectors"].abs().max() > 0
    torch.testing.assert_close(
        with_tower(*inputs(batch, BATCH_KEYS)).detach(), without(*inputs(batch, BATCH_KEYS)).detach()
    )
    with_trained_output(with_tower)
    moved = with_tower(*inputs(batch, BATCH_KEYS)).detach()
    assert not torch.allclose(moved, without(*inputs(batch, BATCH_KEYS)).detach())


def test_a_model_with_a_tower_refuses_users_without_their_items_embeddings(table, sequences):
    model = tower_model()
    batch = batch_with_vectors(model, table, sequences, 2)
    with pytest.raises(ValueError, match="history_vectors"):
        model.embed_users(*(batch[k] for k in ("user_ids", "user_mask", "history", "history_mask")))


def test_the_tower_reads_order_not_padding_and_gives_nothing_without_history():
    tower = SequenceTower(hidden=16, positions=6, dim=8, layers=2).eval()
    torch.nn.init.normal_(tower.project_out.weight)
    generator = torch.Generator().manual_seed(0)
    vectors = torch.randn(1, 6, 16, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    term = tower(vectors, mask)
    reordered = vectors.clone()
    reordered[0, :4] = vectors[0, [3, 2, 1, 0]]
    assert not torch.allclose(tower(reordered, mask), term, atol=1e-4)
    padding_changed = vectors.clone()
    padding_changed[0, 4:] = torch.randn(2, 16, generator=generator)
    torch.testing.assert_close(tower(padding_changed, mask), term)
    torch.testing.assert_close(tower(vectors[:, :4], mask[:, :4]), term)  # padding width does not matter
    assert tower(vectors, torch.zeros_like(mask)).abs().max() == 0
    with pytest.raises(ValueError, match="longer than the tower's 6 positions"):
        tower(torch.zeros(1, 7, 16), torch.ones(1, 7))


def test_every_party_starts_from_the_same_tower_with_a_zero_output():
    first, second = tower_model(), tower_model()
    a, b = adapter_state(first.encoder), adapter_state(second.encoder)
    tower_keys = [k for k in a if "sequence_tower" in k]
    assert len(tower_keys) > 10
    for key in tower_keys:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert a[OUT_KEY].abs().max() == 0 and a[OUT_KEY].shape == (HIDDEN, 8)


def test_the_tower_learns_the_direction_of_a_walk_which_a_set_of_items_cannot_tell():
    """Walks up (i, i+1, i+2 -> i+3) and down (i+2, i+1, i -> i-1) the catalogue have
    the same items and different next items: only the order tells them apart."""
    torch.manual_seed(0)
    items = torch.nn.functional.normalize(torch.randn(12, 16), dim=1)
    histories, targets = [], []
    for i in range(1, 9):  # most recent first
        histories.append([i + 2, i + 1, i])
        targets.append(i + 3)
        histories.append([i, i + 1, i + 2])
        targets.append(i - 1)
    history, target = torch.tensor(histories), torch.tensor(targets)
    mask = torch.ones_like(history)
    tower = SequenceTower(hidden=16, positions=3, dim=16, layers=1)
    optimizer = torch.optim.Adam(tower.parameters(), lr=0.01)
    for _ in range(300):
        logits = tower(items[history], mask) @ items.T / 0.1
        loss = torch.nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tower.eval()
    predicted = (tower(items[history], mask) @ items.T).argmax(1)
    # a reader of the set alone gets at most one of each up/down pair right: 0.5
    assert (predicted == target).float().mean() >= 0.9


def test_the_tower_travels_in_checkpoints_and_survives_merging_for_serving(tmp_path, table, sequences):
    model = with_trained_output(prepare(tower_model())).eval()
    save_adapter(model.encoder, tmp_path / "adapter")
    fresh = tower_model()
    load_saved_adapter(fresh.encoder, tmp_path / "adapter")
    served = TwoTowerRecommender(fresh.encoder.merge_and_unload()).eval()
    assert served.sequence_tower is not None
    histories = [np.array(s) for s in sequences]
    device = torch.device("cpu")
    want = encode_users(model, table, histories, 5, 24, device, item_vectors=encode_items(model, table, device))
    got = encode_users(served, table, histories, 5, 24, device, item_vectors=encode_items(served, table, device))
    torch.testing.assert_close(got, want)
    plain = encode_users(
        prepare(tower_model()).eval(), table, histories, 5, 24, device, item_vectors=encode_items(model, table, device)
    )
    assert not torch.allclose(plain, want)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_opacus_per_sample_gradients_of_the_tower_are_exact(table, sequences, mode):
    model = with_trained_output(prepare(tower_model()))
    batch = batch_with_vectors(model, table, sequences, 5)
    model.train()
    expected = per_example_gradients(model, batch, BATCH_KEYS)
    actual = opacus_gradients(model, batch, mode, BATCH_KEYS)
    tower = [n for n in expected if "sequence_tower" in n]
    assert set(actual) == set(expected) and len(tower) > 10
    assert all(expected[n].abs().max() > 1e-5 for n in tower), [n for n in tower if expected[n].abs().max() <= 1e-5]
    for key, want in expected.items():
        assert (actual[key] - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), key


@pytest.mark.parametrize(("private", "clipping"), [(False, "flat"), (True, "flat"), (True, "per-part")])
def test_a_client_round_trains_the_tower_on_its_own_items_and_the_server_evaluates_it(tmp_path, private, clipping):
    settings = {"model.sequence-layers": 1, "model.sequence-dim": 8, "dp.enabled": private, "dp.clipping": clipping}
    config, prepared, table, server = toy_server(tmp_path, **{"model.item-ids": True, **settings})
    start = server.adapters()
    out_key = next(k for k in start if k.endswith("sequence_tower.project_out.weight"))
    assert start[out_key].abs().max() == 0
    out = client_round_evaluated_by_server(config, prepared, table, server, start)
    assert out.adapters[out_key].abs().max() > 0
    assert (out.privacy is not None) == private


def test_a_client_reads_its_own_items_embeddings_under_the_received_model(tmp_path):
    from fedrec.local_round import _own_item_vectors

    config, prepared, table, server = toy_server(tmp_path, **{"model.sequence-layers": 1, "model.sequence-dim": 8})
    data = load_client_data(config, prepared, 3, 24)
    vectors = _own_item_vectors(server.model, table, data, torch.device("cpu"))
    assert server.model.training  # left ready to train
    own = np.unique(np.concatenate(data.sequences))
    catalogue = encode_items(server.model, table, torch.device("cpu"))
    torch.testing.assert_close(vectors[own], catalogue[own])
    others = np.setdiff1d(np.arange(len(catalogue)), own)
    assert len(others) and vectors[others].abs().max() == 0


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"model.sequence-layers": -1}, "model.sequence-layers"), ({"model.sequence-dim": 0}, "model.sequence-dim")],
)
def test_bad_tower_settings_are_refused_by_name(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(toy_run_config(tmp_path, **overrides))


def test_serving_ranks_with_the_tower_as_evaluation_does(tmp_path):
    from fedrec.checkpoint import save_checkpoint
    from fedrec.config import to_run_config
    from fedrec.results import RunRecord
    from fedrec.serving import Recommender
    from tests.test_serving import _known_items, _trained_adapters

    config = load_config(
        toy_run_config(tmp_path, **{"model.item-ids": True, "model.sequence-layers": 1, "model.sequence-dim": 8})
    )
    prepared = prepare_data(config.data, config.eval)
    model = _trained_adapters(build_recommender(config.model, config.lora, prepared.num_items), seed=3)
    save_checkpoint(model.encoder, tmp_path / "out", 1)
    RunRecord(settings=to_run_config(config)).write(tmp_path / "out")
    table, device = token_table(prepared, config.model), torch.device("cpu")
    items = encode_items(model, table, device)
    known = _known_items(prepared, 2)
    settings = (config.model.history_items, config.model.max_user_tokens, device)
    user = encode_users(model, table, [known], *settings, item_vectors=items)[0]
    without_tower = encode_users(model, table, [known], *settings, item_vectors=torch.zeros_like(items))[0]
    assert not torch.allclose(user, without_tower)  # the tower's term matters to this user
    scores = (items @ user).numpy()
    scores[known] = -np.inf

    found = Recommender.from_run(tmp_path / "out").for_user(str(prepared.users["user_id"].iloc[2]), k=5)
    np.testing.assert_allclose([r.score for r in found], np.sort(scores)[::-1][:5], atol=1e-5)
    # the int8 encoder quantizes the tower's linear layers too, and still serves
    quantized = Recommender.from_run(tmp_path / "out", quantization="int8")
    tower = quantized.trained.model.sequence_tower
    assert type(tower.project_in) is not torch.nn.Linear
    assert len(quantized.for_user(str(prepared.users["user_id"].iloc[2]), k=5)) == 5


def test_central_training_trains_the_tower_on_item_vectors_refreshed_at_each_evaluation(tmp_path, monkeypatch):
    """`fedrec centralized` with a tower: its output leaves zero, and the item vectors it
    reads are re-encoded from the current model at every evaluation, not kept from step 0."""
    from fedrec import centralized

    seen = []

    def recorded(model):
        vectors = original(model)
        current = encode_items(model.model, model.table, model.device).cpu()
        seen.append((vectors, torch.allclose(vectors, current), model))
        return vectors

    original = centralized._item_vectors
    monkeypatch.setattr(centralized, "_item_vectors", recorded)
    config = load_config(
        toy_run_config(
            tmp_path, **{"model.sequence-layers": 1, "model.sequence-dim": 8, "train.batch-size": 16, "train.lr": 0.01}
        )
    )
    results = centralized.train_centralized(config, steps=4, eval_every=2)
    assert [h["step"] for h in results["history"]] == [2, 4]
    # Once to start and once after the evaluation at step 2; none after the last,
    # where no training follows.
    assert len(seen) == 2
    assert all(fresh for _, fresh, _ in seen)  # each read of the current model
    assert not torch.allclose(seen[0][0], seen[1][0])  # the item space moved with training
    assert seen[-1][2].model.sequence_tower.project_out.weight.abs().sum() > 0
