"""The on-device user embedding: private vector and recency term (fedrec.model.personal_vector)."""

import dataclasses

import numpy as np
import pytest
import torch

from fedrec.config import ConfigError, PersonalConfig, load_config
from fedrec.evaluation import encode_items, encode_users, model_scorer
from fedrec.model.personal_vector import (
    fit_personal_vectors,
    history_weights,
    personalise,
    recent_items_mean,
)
from tests.conftest import TINY

TEMPERATURE = 0.05


def _unit(rows, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(rows, dim, generator=generator), dim=1)


@pytest.fixture()
def space():
    """Unit item and user embeddings and chronological histories of 4 users."""
    items, users = _unit(30, 8, seed=0), _unit(4, 8, seed=1)
    histories = [np.array([3, 7, 1, 12]), np.array([0, 5]), np.array([29, 28, 27, 26, 25, 24]), np.array([9])]
    return users, items, histories


def _positive_nll(users, items, histories):
    """Mean negative log-likelihood of each user's items against the rest (the fit's data term)."""
    losses = []
    for user, history in zip(users, histories):
        logits = items @ user / TEMPERATURE
        negatives = np.setdiff1d(np.arange(len(items)), history)
        for positive in history:
            losses.append(-(logits[positive] - torch.logsumexp(logits[[positive, *negatives]], 0)))
    return float(torch.stack(losses).mean())


def test_the_private_vector_ranks_the_users_own_items_higher(space):
    users, items, histories = space
    fitted = fit_personal_vectors(users, items, histories, PersonalConfig(enabled=True), TEMPERATURE)
    assert _positive_nll(fitted, items, histories) < _positive_nll(users, items, histories) - 0.5
    torch.testing.assert_close(fitted.norm(dim=1), torch.ones(4))
    # the l2 weight keeps the vector near the shared embedding: a heavy one barely moves it
    held = fit_personal_vectors(users, items, histories, PersonalConfig(enabled=True, l2=1e4), TEMPERATURE)
    assert (held * users).sum(1).min() > 0.999 > (fitted * users).sum(1).min()


def test_each_user_is_fitted_as_alone_on_their_device(space):
    users, items, histories = space
    together = fit_personal_vectors(users, items, histories, PersonalConfig(enabled=True), TEMPERATURE)
    for row in range(len(users)):
        alone = fit_personal_vectors(users[row : row + 1], items, histories[row : row + 1], PersonalConfig(enabled=True), TEMPERATURE)
        torch.testing.assert_close(alone[0], together[row], atol=1e-5, rtol=1e-5)


def test_history_weights_halve_every_half_life_back_from_the_last_item():
    weights = history_weights([np.array([3, 1, 2]), np.array([4, 0, 4])], 5, half_life=1.0)
    torch.testing.assert_close(weights[0], torch.tensor([0.0, 0.5, 1.0, 0.25, 0.0]))
    torch.testing.assert_close(weights[1], torch.tensor([0.5, 0.0, 0.0, 0.0, 1.0]))  # a repeat: its latest
    torch.testing.assert_close(history_weights([np.array([3, 1, 2])], 5, half_life=0.0)[0], torch.tensor([0.0, 1, 1, 1, 0]))


def test_a_half_life_fits_the_vector_to_the_recent_items_more_than_the_old(space):
    users, items, histories = space
    even = fit_personal_vectors(users, items, histories, PersonalConfig(enabled=True), TEMPERATURE)
    recent = fit_personal_vectors(users, items, histories, PersonalConfig(enabled=True, half_life=1.0), TEMPERATURE)
    newest, oldest = [histories[2][-2:]], [histories[2][:2]]
    # user 2's history of 6: its last two items gain likelihood, its first two lose it
    assert _positive_nll(recent[2:3], items, newest) < _positive_nll(even[2:3], items, newest) - 0.1
    assert _positive_nll(recent[2:3], items, oldest) > _positive_nll(even[2:3], items, oldest) + 0.1
    # a single item has nothing to weigh against: the same fit
    torch.testing.assert_close(recent[3], even[3])


def test_no_history_keeps_the_shared_embedding_and_every_item_stays_finite(space):
    users, items, _ = space
    everything = np.arange(len(items))
    fitted = fit_personal_vectors(users[:2], items, [np.array([], dtype=np.int64), everything], PersonalConfig(enabled=True), TEMPERATURE)
    torch.testing.assert_close(fitted[0], users[0])
    assert torch.isfinite(fitted).all()


def test_recency_term_adds_the_similarity_to_the_last_items(space):
    users, items, histories = space
    config = PersonalConfig(recent_items=2, recent_weight=0.4)
    torch.testing.assert_close(recent_items_mean(items, histories, 2)[0], (items[1] + items[12]) / 2)
    personal = personalise(users, items, histories, config, TEMPERATURE)
    # scores are proportional to: shared score + 0.4 x mean similarity to the last two items
    knn = torch.stack([(items @ items[torch.as_tensor(h[-2:])].T).mean(1) for h in histories])
    expected = users @ items.T + 0.4 * knn
    scale = (personal @ items.T) / expected
    torch.testing.assert_close(scale, scale[:, :1].expand_as(scale), atol=1e-5, rtol=1e-4)
    # nothing turned on: the shared embedding, unit norm
    torch.testing.assert_close(personalise(users * 3, items, histories, PersonalConfig(), TEMPERATURE), users)


def test_model_scorer_personalises_each_user_from_their_history(recommender, table):
    device = torch.device("cpu")
    histories = [np.array([0, 1, 2]), np.array([5, 6]), np.array([9, 10, 11, 3])]
    config = PersonalConfig(enabled=True, steps=20, recent_items=2)
    scores = model_scorer(recommender, table, histories, TINY.history_items, TINY.max_user_tokens, device, config)(np.arange(3))
    items = encode_items(recommender, table, device)
    shared = encode_users(recommender, table, histories, TINY.history_items, TINY.max_user_tokens, device)
    expected = personalise(shared, items, histories, config, recommender.temperature) @ items.T
    np.testing.assert_allclose(scores, expected.numpy(), atol=1e-5)
    plain = model_scorer(recommender, table, histories, TINY.history_items, TINY.max_user_tokens, device)(np.arange(3))
    assert np.abs(plain - scores).max() > 1e-2


def test_personal_settings_are_validated_by_name():
    config = load_config({"personal.enabled": True, "personal.recent-items": 3, "personal.l2": 0.5})
    assert config.personal == dataclasses.replace(PersonalConfig(), enabled=True, recent_items=3, l2=0.5)
    assert config.personal.active and not PersonalConfig().active
    for key, value in (("personal.steps", 0), ("personal.recent-items", -1), ("personal.lr", 0.0), ("personal.half-life", -1.0)):
        with pytest.raises(ConfigError, match=key):
            load_config({key: value})
