"""Hard negatives: the pretrained text neighbours and how examples draw from them."""

import numpy as np
import pytest
import torch

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, load_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.hard_negatives import text_neighbours
from fedrec.local_round import run_local_round
from fedrec.model.encoder import load_encoder
from fedrec.model.pooling import unit_mean_pool
from fedrec.prepare import prepare
from tests.conftest import TINY, toy_run_config

POOL = 3


def _reference_neighbours(tokenizer, table) -> np.ndarray:
    """The same table from the bare pretrained BERT's own forward pass."""
    bert = load_encoder(TINY.name, vocab_size=len(tokenizer)).eval()
    ids = torch.from_numpy(table.item_ids.astype(np.int64))
    mask = torch.from_numpy(table.item_mask.astype(np.int64))
    with torch.no_grad():
        embeddings = unit_mean_pool(bert(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    similarity = embeddings @ embeddings.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(POOL, dim=1).indices.numpy()


def test_neighbours_are_the_pretrained_encoders_nearest_items(recommender, tokenizer, table):
    expected = _reference_neighbours(tokenizer, table)
    assert np.array_equal(text_neighbours(recommender.encoder, table, POOL), expected)
    assert not (expected == np.arange(len(expected))[:, None]).any()  # never the item itself


def test_trained_adapters_do_not_move_the_neighbours(recommender, tokenizer, table):
    ids = torch.from_numpy(table.item_ids.astype(np.int64))
    mask = torch.from_numpy(table.item_mask.astype(np.int64))
    before = recommender.embed(ids, mask)
    with torch.no_grad():
        for name, weight in recommender.encoder.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 1.0)
    assert not torch.allclose(recommender.embed(ids, mask), before, atol=1e-3)  # they do act
    assert np.array_equal(
        text_neighbours(recommender.encoder, table, POOL), _reference_neighbours(tokenizer, table)
    )


def _negatives(dataset: NextItemDataset) -> list[tuple[int, set[int]]]:
    """(positive, negatives) of every example."""
    out = []
    for i in range(len(dataset)):
        items = dataset[i]["items"].tolist()
        out.append((items[0], set(items[1:])))
    return out


def test_examples_draw_their_hard_negatives_from_the_positives_unseen_neighbours(table, sequences):
    neighbours = np.array([[(i + d) % 12 for d in (1, 2, 3, 4, 5, 6)] for i in range(12)])
    examples = build_examples(sequences, 5)
    dataset = NextItemDataset(examples, table, 4, 24, seed=0, neighbours=neighbours, hard_negatives=2)
    for example, (positive, negatives) in zip(examples, _negatives(dataset)):
        assert len(negatives) == 4 and not negatives & example.user_items
        unseen_pool = set(neighbours[positive].tolist()) - example.user_items
        assert len(negatives & unseen_pool) >= min(2, len(unseen_pool))
    # all four hard: every negative is an unseen neighbour wherever the pool has four
    every = NextItemDataset(examples, table, 4, 24, seed=0, neighbours=neighbours, hard_negatives=4)
    checked = 0
    for example, (positive, negatives) in zip(examples, _negatives(every)):
        unseen_pool = set(neighbours[positive].tolist()) - example.user_items
        if len(unseen_pool) >= 4:
            assert negatives <= unseen_pool
            checked += 1
    assert checked >= 5
    # a user whose own items fill the pool still gets four unseen negatives, drawn uniformly
    own = NextItemDataset(build_examples([np.arange(7)], 5), table, 4, 24, 0, neighbours, 4)
    for _, negatives in _negatives(own):
        assert len(negatives) == 4 and not negatives & set(range(7))


def test_without_hard_negatives_the_draws_are_unchanged(table, sequences):
    examples = build_examples(sequences, 5)
    plain = NextItemDataset(examples, table, 4, 24, seed=3)
    neighbours = np.zeros((12, POOL), dtype=np.int64)
    off = NextItemDataset(examples, table, 4, 24, seed=3, neighbours=neighbours, hard_negatives=0)
    assert _negatives(plain) == _negatives(off)


def test_bad_hard_negative_settings_are_refused_by_name(recommender, table):
    with pytest.raises(ConfigError, match="train.hard-negatives"):
        load_config({"train.hard-negatives": 5, "train.num-negatives": 4})
    with pytest.raises(ConfigError, match="train.hard-negative-pool"):
        load_config({"train.hard-negative-pool": 0})
    with pytest.raises(ValueError, match="train.hard-negative-pool=12"):
        text_neighbours(recommender.encoder, table, 12)  # 12 items: at most 11 others


def test_a_private_client_round_trains_with_hard_negatives(tmp_path):
    run_config = toy_run_config(
        tmp_path, **{"train.hard-negatives": 2, "train.hard-negative-pool": 5, "dp.enabled": True}
    )
    config = load_config(run_config)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    data = load_client_data(config, prepared, 0, 24)
    output = run_local_round(config, data, model.table, model.adapters(), server_round=1)
    assert output.privacy is not None and output.result.steps == output.privacy.steps > 0
