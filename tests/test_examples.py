import numpy as np
import pytest

from fedrec.examples import NextItemDataset, build_examples


def test_examples_predict_the_next_item_from_the_recent_past(sequences):
    examples = build_examples(sequences, history_items=3)
    assert len(examples) == 5 + 3 + 4
    fourth = examples[3]  # user 0, position 4
    assert fourth.positive == 4
    assert fourth.history.tolist() == [3, 2, 1]


def test_negatives_are_distinct_and_unseen(sequences, table):
    examples = build_examples(sequences, history_items=3)
    dataset = NextItemDataset(examples, table, num_negatives=4, max_user_tokens=24, seed=0)
    for index in range(len(dataset)):
        item = dataset[index]
        candidates = [
            int(np.flatnonzero((table.item_ids == row.numpy()).all(1))[0]) for row in item["item_ids"]
        ]
        assert candidates[0] == examples[index].positive
        negatives = candidates[1:]
        assert len(set(negatives)) == 4
        assert not set(negatives) & examples[index].user_items
        assert item["user_ids"].shape == (24,) and item["item_ids"].shape == (5, 12)


def test_unlisted_items_are_never_drawn_as_negatives(sequences, table):
    examples = build_examples(sequences, history_items=3)
    unlisted = frozenset({10, 11})  # the only items no user has, so the uniform draw would hit them
    dataset = NextItemDataset(examples, table, num_negatives=2, max_user_tokens=24, seed=0, unlisted=unlisted)
    drawn = {int(i) for _ in range(20) for index in range(len(dataset)) for i in dataset[index]["items"][1:]}
    assert drawn and not drawn & unlisted
    crowded = NextItemDataset(examples, table, num_negatives=5, max_user_tokens=24, seed=0, unlisted=unlisted)
    with pytest.raises(ValueError, match="2 unlisted while training"):
        crowded[0]  # user 0 has 6 of 12 items: 6 are left, 2 of them unlisted
