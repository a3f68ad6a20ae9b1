import math

import numpy as np
import pytest

from fedrec.metrics import ranking_metrics, target_ranks


def test_ranks_are_pessimistic_on_ties():
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    target = np.array([0.5, 1.0])
    assert target_ranks(scores, target).tolist() == [2, 3]


def test_hand_computed_metrics():
    ranks = np.array([0, 1, 9, 10])  # last one misses the top 10
    m = ranking_metrics(ranks, k=10)
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["recall@10"] == pytest.approx(0.75)
    ndcg = (1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(11)) / 4
    assert m["ndcg@10"] == pytest.approx(ndcg)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11) / 4)
    assert m["precision@10"] == pytest.approx(0.075)
    assert m["f1@10"] == pytest.approx(0.75 * 2 * 0.1 / 1.1)


def test_full_suffix():
    m = ranking_metrics(np.array([0]), k=5, full=True)
    assert m["hr@5_full"] == 1.0 and m["ndcg@5_full"] == 1.0 and "hr@5" not in m


def test_empty_is_an_error():
    with pytest.raises(ValueError):
        ranking_metrics(np.array([]), k=10)


def test_activity_quartiles_put_the_lightest_users_first():
    from fedrec.metrics import activity_quartiles

    quartile = activity_quartiles(np.array([50, 3, 8, 1, 20, 7, 2, 100]))
    assert quartile.tolist() == [4, 2, 3, 1, 3, 2, 1, 4]


def test_beyond_accuracy_by_hand():
    from fedrec.metrics import beyond_accuracy

    popularity = np.array([10, 0, 5, 1, 4])
    top = np.array([[0, 2], [0, 3], [0, 2], [2, 0]])  # items 0, 2, 3 recommended
    values = beyond_accuracy(
        top,
        popularity,
        target_items=np.array([1, 3, 4, 4]),
        sampled_ranks=np.array([0, 5, 1, 3]),
        full_ranks=np.array([0, 9, 2, 3]),
        activity=np.array([1, 2, 3, 4]),
        k=2,
    )
    assert values["coverage@2"] == 3 / 5
    assert values["popularity@2"] == (10 * 4 + 5 * 3 + 1) / 8
    assert values["popularity_test"] == (0 + 1 + 4 + 4) / 4
    assert values["popularity_ratio@2"] == values["popularity@2"] / values["popularity_test"]
    assert [values[f"hr@2_q{q}"] for q in range(1, 5)] == [1.0, 0.0, 1.0, 0.0]
    assert [values[f"hr@2_full_q{q}"] for q in range(1, 5)] == [1.0, 0.0, 0.0, 0.0]
