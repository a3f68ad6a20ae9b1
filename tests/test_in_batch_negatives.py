"""In-batch negatives: each user against every candidate of the batch, false negatives masked."""

import copy

import pytest
import torch
from torch.utils.data._utils.collate import default_collate

from fedrec.config import ConfigError, TrainConfig, load_config
from fedrec.training import BATCH_KEYS, make_optimizer, train_local
from tests.privacy.test_per_sample_gradients import fixed_examples, inputs, prepare


def test_logits_cover_the_whole_batch_and_mask_the_users_own_items(recommender, table, sequences):
    model = prepare(recommender).eval()
    batch = default_collate(fixed_examples(table, sequences, 6))
    logits, target = model.in_batch_logits(*inputs(batch, BATCH_KEYS), batch["user"])
    size, columns = batch["items"].shape
    assert logits.shape == (size, size * columns)
    assert target.tolist() == [b * columns for b in range(size)]
    # unmasked entries are the cosine logits of every (user, candidate) pair
    users = model.embed_users(batch["user_ids"], batch["user_mask"])
    candidates = model.embed_candidates(batch["item_ids"], batch["item_mask"], batch["items"]).reshape(size * columns, -1)
    want = users @ candidates.T / model.temperature
    flat = batch["items"].reshape(-1).tolist()
    assert batch["user"].tolist() == [0, 0, 0, 0, 0, 1]  # five rows of one user, as on a client
    for b in range(size):
        own = {int(batch["items"][b, 0])} | set(batch["history"][b][batch["history_mask"][b] == 1].tolist())
        # the same user's other positives (later items too) are the user's own items
        own |= {int(batch["items"][o, 0]) for o in range(size) if batch["user"][o] == batch["user"][b]}
        for j, item in enumerate(flat):
            if j != target[b] and item in own:
                assert logits[b, j] == float("-inf"), (b, j)
            else:
                assert torch.isclose(logits[b, j], want[b, j], atol=1e-5), (b, j)
    assert torch.isinf(logits).any(), "no false negative in the batch: the masking went untested"
    assert torch.isfinite(logits[torch.arange(size), target]).all()


def test_a_training_step_with_in_batch_negatives_moves_the_adapters(recommender, table, sequences):
    model = prepare(recommender)
    batch = default_collate(fixed_examples(table, sequences, 6))
    own, twin = TrainConfig(max_steps=1), copy.deepcopy(model)
    own_loss = train_local(twin, [batch], make_optimizer(twin, own), own, torch.device("cpu")).loss
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    config = TrainConfig(max_steps=1, in_batch_negatives=True)
    result = train_local(model, [batch], make_optimizer(model, config), config, torch.device("cpu"))
    assert result.steps == 1 and result.examples == 6
    # every row keeps its own negatives and gains others: its softmax loss can only grow
    assert result.loss > own_loss + 1e-3
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


def test_in_batch_negatives_are_refused_under_dp_sgd():
    with pytest.raises(ConfigError, match="train.in-batch-negatives"):
        load_config({"train.in-batch-negatives": True, "dp.enabled": True})
