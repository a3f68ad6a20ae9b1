"""The real MovieLens-100K, fetched from the recbole wheel on PyPI (skipped offline)."""

import pytest

from fedrec.data.interactions import DataError
from fedrec.data.movielens import ensure_ml100k, load_ml100k
from fedrec.split import (
    filter_min_interactions,
    implicit_feedback,
    last_timestamp_ties,
    leave_one_out,
)

# Users whose latest timestamp is shared with another of their interactions, as
# measured on the recbole 1.2.1 copy of ML-100K (quoted in fedrec/split.py).
ML100K_LAST_TIMESTAMP_TIES = 415


@pytest.mark.network
def test_real_ml100k_counts_and_timestamp_ties(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    try:
        folder = ensure_ml100k(cache)
    except DataError as error:
        pytest.skip(f"ML-100K could not be fetched: {error}")
    data = load_ml100k(folder)
    assert len(data.interactions) == 100_000
    assert data.interactions["user_id"].nunique() == 943
    assert data.interactions["item_id"].nunique() == 1682
    assert len(data.items) == 1682
    toy = data.items.set_index("item_id").loc["1"]
    assert toy["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert not data.items["text"].str.contains(r"\bnan\b", case=False).any()

    assert last_timestamp_ties(data.interactions) == ML100K_LAST_TIMESTAMP_TIES
    interactions = filter_min_interactions(implicit_feedback(data.interactions, None), 3)
    by_row = leave_one_out(interactions, "row").test.set_index("user_id")["item_id"]
    by_item = leave_one_out(interactions, "item").test.set_index("user_id")["item_id"]
    changed = int((by_row != by_item.reindex(by_row.index)).sum())
    # The tie-break changes the test item of some, and only of tied, users.
    assert 0 < changed <= ML100K_LAST_TIMESTAMP_TIES
