import numpy as np

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
