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
