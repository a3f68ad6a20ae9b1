import pytest
import torch

from fedrec.config import LoraSettings, TrainConfig
from fedrec.examples import NextItemDataset, build_examples
from fedrec.model.adapters import (
    AdapterStateError,
    adapter_state,
    load_adapter_state,
    load_saved_adapter,
    save_adapter,
    state_bytes,
)
from fedrec.model.build import build_recommender
from fedrec.training import make_loader, make_optimizer, train_local
from tests.conftest import LORA, TINY


def test_only_lora_weights_are_trainable(recommender):
    trainable = [n for n, p in recommender.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert set(adapter_state(recommender.encoder)) == {
        n.replace(".default", "").removeprefix("encoder.") for n in trainable
    }


def test_identical_builds_share_base_and_adapters():
    a, b = build_recommender(TINY, LORA), build_recommender(TINY, LORA)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_lora_on_chosen_layers_only():
    model = build_recommender(TINY, LoraSettings(r=2, layers="1", target_modules="query,key,value"))
    names = list(adapter_state(model.encoder))
    assert names and all(".layer.1." in n for n in names)
    assert any(".key." in n for n in names)


def test_forward_scores_candidates(recommender, table):
    batch = NextItemDataset(build_examples([torch.arange(6).numpy()], 5), table, 3, 24, 0)
    item = batch[0]
    logits = recommender(
        item["user_ids"][None], item["user_mask"][None], item["item_ids"][None], item["item_mask"][None]
    )
    assert logits.shape == (1, 4)
    assert logits.abs().max() <= 1 / recommender.temperature + 1e-4  # cosine / temperature


def test_adapter_round_trip_and_validation(recommender, tmp_path):
    state = adapter_state(recommender.encoder)
    changed = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(recommender.encoder, changed)
    assert all(torch.equal(adapter_state(recommender.encoder)[k], changed[k]) for k in state)
    save_adapter(recommender.encoder, tmp_path / "ckpt")
    load_adapter_state(recommender.encoder, state)
    load_saved_adapter(recommender.encoder, tmp_path / "ckpt")
    assert all(torch.equal(adapter_state(recommender.encoder)[k], changed[k]) for k in state)

    key = next(iter(state))
    with pytest.raises(AdapterStateError, match="shape"):
        load_adapter_state(recommender.encoder, {**state, key: torch.zeros(3)})
    with pytest.raises(AdapterStateError, match="NaN"):
        load_adapter_state(recommender.encoder, {**state, key: state[key] * float("nan")})
    with pytest.raises(AdapterStateError, match="missing"):
        load_adapter_state(recommender.encoder, {k: v for k, v in state.items() if k != key})
    assert state_bytes(state) == sum(v.numel() * 4 for v in state.values())


def test_local_training_lowers_the_loss_and_changes_only_adapters(recommender, table, sequences):
    base_before = {n: p.clone() for n, p in recommender.named_parameters() if not p.requires_grad}
    adapters_before = adapter_state(recommender.encoder)
    dataset = NextItemDataset(build_examples(sequences, 5), table, 3, 24, seed=0)
    config = TrainConfig(local_epochs=30, max_steps=0, batch_size=16, lr=1e-2)
    loader = make_loader(dataset, 16, seed=0)
    optimizer = make_optimizer(recommender, config)
    first = train_local(recommender, loader, optimizer, TrainConfig(local_epochs=1, max_steps=0, batch_size=16, lr=1e-2), torch.device("cpu"))
    last = train_local(recommender, loader, optimizer, config, torch.device("cpu"))
    assert last.steps == 30 and last.examples == 30 * len(dataset)
    assert last.loss < first.loss
    assert any(not torch.equal(adapters_before[k], v) for k, v in adapter_state(recommender.encoder).items())
    for n, p in recommender.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, base_before[n]), n


def test_max_steps_stops_early(recommender, table, sequences):
    dataset = NextItemDataset(build_examples(sequences, 5), table, 3, 24, seed=0)
    result = train_local(
        recommender, make_loader(dataset, 2, 0), make_optimizer(recommender, TrainConfig()),
        TrainConfig(local_epochs=5, max_steps=3, batch_size=2), torch.device("cpu"),
    )
    assert result.steps == 3 and result.examples == 6


def test_trimming_padding_changes_no_embedding(recommender, table):
    ids = torch.from_numpy(table.item_ids[:4].astype("int64"))
    mask = torch.from_numpy(table.item_mask[:4].astype("int64"))
    recommender.eval()
    with torch.no_grad():
        trimmed = recommender.embed(ids, mask)
        padded = torch.cat([ids, torch.zeros(4, 20, dtype=torch.long)], 1)
        padded_mask = torch.cat([mask, torch.zeros(4, 20, dtype=torch.long)], 1)
        assert torch.allclose(recommender.embed(padded, padded_mask), trimmed, atol=1e-6)


def test_ffa_lora_trains_and_sends_only_b_and_averages_exactly(table, sequences):
    settings = LoraSettings(r=2, alpha=4, freeze_a=True)
    model = build_recommender(TINY, settings)
    full = build_recommender(TINY, LoraSettings(r=2, alpha=4))
    sent = adapter_state(model.encoder)
    assert sent and all("lora_B" in k for k in sent)
    assert len(sent) * 2 == len(adapter_state(full.encoder))
    a_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}

    updates = []
    for seed in (0, 1):
        load_adapter_state(model.encoder, sent)
        data = NextItemDataset(build_examples(sequences, 5), table, 3, 24, seed=seed)
        train = TrainConfig(max_steps=2, batch_size=4, lr=5e-2)
        train_local(model, make_loader(data, 4, seed), make_optimizer(model, train), train, torch.device("cpu"))
        updates.append(adapter_state(model.encoder))
    assert all(torch.equal(p, a_before[n]) for n, p in model.named_parameters() if n in a_before)
    assert any(not torch.equal(updates[0][k], sent[k]) for k in sent)
