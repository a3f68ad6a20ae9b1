"""Leave-one-out split, implicit feedback and user filtering on hand-made tables."""

import logging

import numpy as np
import pandas as pd
import pytest

from fedrec.data.interactions import DataError
from fedrec.split import (
    filter_min_interactions,
    implicit_feedback,
    last_timestamp_ties,
    leave_one_out,
)


def table(rows, extra=None):
    frame = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    frame["rating"] = frame["rating"].astype("float32")
    frame["timestamp"] = frame["timestamp"].astype("int64")
    if extra:
        for name, values in extra.items():
            frame[name] = values
    return frame


def items_by_user(frame):
    return {u: g["item_id"].tolist() for u, g in frame.groupby("user_id", sort=False)}


def test_split_is_chronological_per_user():
    rows = [
        ("u1", "c", 5, 30), ("u2", "x", 5, 5), ("u1", "a", 5, 10), ("u1", "d", 5, 40),
        ("u2", "y", 5, 6), ("u1", "b", 5, 20), ("u2", "z", 5, 7),
    ]  # fmt: skip
    split = leave_one_out(table(rows))
    assert items_by_user(split.train) == {"u1": ["a", "b"], "u2": ["x"]}
    assert split.valid.set_index("user_id")["item_id"].to_dict() == {"u1": "c", "u2": "y"}
    assert split.test.set_index("user_id")["item_id"].to_dict() == {"u1": "d", "u2": "z"}
    assert split.train["position"].tolist() == [0, 1, 0]
    assert split.valid.set_index("user_id")["position"].to_dict() == {"u1": 2, "u2": 1}
    assert split.test.set_index("user_id")["position"].to_dict() == {"u1": 3, "u2": 2}
    assert split.train["position"].dtype == np.int64


def test_split_keeps_extra_columns_and_loses_nothing():
    rows = [("u", str(i), 1, i) for i in range(6)]
    frame = table(rows, extra={"item_idx": [10, 11, 12, 13, 14, 15]})
    split = leave_one_out(frame)
    assert split.test["item_idx"].tolist() == [15]
    combined = pd.concat([split.train, split.valid, split.test])
    assert sorted(combined["item_id"]) == sorted(frame["item_id"])
    assert list(combined.columns) == [*frame.columns, "position"]


TIED = [  # u1's last three interactions share timestamp 50; file order is 9, 10, 2
    ("u1", "1", 5, 10), ("u1", "9", 5, 50), ("u1", "10", 5, 50), ("u1", "2", 5, 50),
]  # fmt: skip


def test_row_tie_break_keeps_file_order():
    split = leave_one_out(table(TIED), tie_break="row")
    assert split.train["item_id"].tolist() == ["1", "9"]
    assert split.valid["item_id"].tolist() == ["10"]
    assert split.test["item_id"].tolist() == ["2"]


def test_item_tie_break_is_numeric_for_digit_ids():
    split = leave_one_out(table(TIED), tie_break="item")
    # Numerically 2 < 9 < 10 (lexicographically "10" < "2" < "9" would end on "9").
    assert split.train["item_id"].tolist() == ["1", "2"]
    assert split.valid["item_id"].tolist() == ["9"]
    assert split.test["item_id"].tolist() == ["10"]


def test_item_tie_break_is_lexicographic_otherwise():
    rows = [(u, "b" + i if i != "1" else "a", r, t) for u, i, r, t in TIED]  # a, b9, b10, b2
    split = leave_one_out(table(rows), tie_break="item")
    assert split.valid["item_id"].tolist() == ["b2"]
    assert split.test["item_id"].tolist() == ["b9"]
    assert split.train["item_id"].tolist() == ["a", "b10"]


def test_item_tie_break_only_applies_within_equal_timestamps():
    rows = [("u", "3", 1, 1), ("u", "1", 1, 2), ("u", "2", 1, 3)]
    split = leave_one_out(table(rows), tie_break="item")
    assert split.train["item_id"].tolist() == ["3"]
    assert split.test["item_id"].tolist() == ["2"]


def test_random_tie_break_is_seeded_and_respects_time():
    rows = [(f"u{u}", str(i), 1, 100 if i else 1) for u in range(40) for i in range(4)]
    frame = table(rows)
    first = leave_one_out(frame, tie_break="random", seed=3)
    again = leave_one_out(frame, tie_break="random", seed=3)
    other = leave_one_out(frame, tie_break="random", seed=4)
    pd.testing.assert_frame_equal(first.test, again.test)
    assert not first.test["item_id"].equals(other.test["item_id"])
    # Ties are shuffled: the test item is not always the last row of the file.
    assert first.test["item_id"].nunique() > 1
    # Item "0" has the earliest timestamp, so it is always the first training item.
    assert (first.train.groupby("user_id")["item_id"].first() == "0").all()


def test_tie_break_must_be_known():
    with pytest.raises(ValueError, match=r"tie_break must be one of"):
        leave_one_out(table(TIED), tie_break="newest")


def test_users_with_fewer_than_three_interactions_are_named():
    rows = [
        ("u1", "a", 1, 1),
        ("u1", "b", 1, 2),
        ("u1", "c", 1, 3),
        ("u2", "a", 1, 1),
        ("u2", "b", 1, 2),
    ]
    with pytest.raises(
        DataError, match=r"user 'u2' has 2 interaction\(s\).*filter_min_interactions"
    ):
        leave_one_out(table(rows))


def test_huge_timestamp_range_still_sorts_correctly():
    big, low = np.iinfo(np.int64).max, np.iinfo(np.int64).min
    rows = [
        ("u1", "a", 1, big), ("u1", "b", 1, 0), ("u1", "c", 1, low),
        ("u2", "x", 1, 5), ("u2", "y", 1, big), ("u2", "z", 1, 4),
        ("u3", "p", 1, 1), ("u3", "q", 1, 2), ("u3", "r", 1, 3),
    ]  # fmt: skip
    split = leave_one_out(table(rows))
    assert split.test.set_index("user_id")["item_id"].to_dict() == {"u1": "a", "u2": "y", "u3": "r"}
    assert items_by_user(split.train) == {"u1": ["c"], "u2": ["z"], "u3": ["p"]}


def test_implicit_feedback_filters_ratings_and_keeps_first_chronological_repeat():
    rows = [
        ("u1", "a", 5, 30),  # repeat of the pair below, but later in time: dropped
        ("u1", "b", 2, 10),  # below min_rating
        ("u1", "a", 4, 20),
        ("u2", "a", 4, 5),
        ("u1", "c", 4, 20),
        ("u1", "c", 5, 20),  # same pair, same time: the earlier row wins
    ]
    kept = implicit_feedback(table(rows), min_rating=4)
    assert kept[["user_id", "item_id", "rating", "timestamp"]].values.tolist() == [
        ["u1", "a", 4.0, 20], ["u2", "a", 4.0, 5], ["u1", "c", 4.0, 20],
    ]  # fmt: skip
    assert list(kept.index) == [0, 1, 2]


def test_implicit_feedback_without_threshold_keeps_all_ratings():
    rows = [("u1", "a", 1, 1), ("u1", "b", 0, 2), ("u1", "a", 5, 3)]
    assert implicit_feedback(table(rows), None)["item_id"].tolist() == ["a", "b"]


def test_filter_min_interactions_drops_and_logs(caplog):
    rows = [
        ("u1", "a", 1, 1),
        ("u1", "b", 1, 2),
        ("u1", "c", 1, 3),
        ("u2", "a", 1, 1),
        ("u3", "a", 1, 1),
    ]
    with caplog.at_level(logging.INFO, logger="fedrec.split"):
        kept = filter_min_interactions(table(rows), 3)
    assert kept["user_id"].tolist() == ["u1", "u1", "u1"]
    assert "dropped 2 of 3 users (2 interactions)" in caplog.text


def test_last_timestamp_ties_counts_users_not_rows():
    rows = [
        ("u1", "a", 1, 5), ("u1", "b", 1, 5), ("u1", "c", 1, 5),
        ("u2", "a", 1, 5), ("u2", "b", 1, 6),
        ("u3", "a", 1, 1), ("u3", "b", 1, 9), ("u3", "c", 1, 9),
    ]  # fmt: skip
    assert last_timestamp_ties(table(rows)) == 2


def test_float_timestamps_sort_by_value():
    frame = pd.DataFrame(
        {
            "user_id": ["u"] * 3,
            "item_id": ["a", "b", "c"],
            "rating": 1.0,
            "timestamp": [1.5, 1.2, 3.0],
        }
    )
    split = leave_one_out(frame)
    assert split.train["item_id"].tolist() == ["b"]
    assert split.valid["item_id"].tolist() == ["a"]
    assert split.test["item_id"].tolist() == ["c"]
