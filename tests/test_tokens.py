import numpy as np

from fedrec.tokens import TokenTable, history_tokens


def test_item_tokens_are_padded_and_masked(table):
    assert table.item_ids.shape == (12, 12)
    assert table.item_mask.shape == (12, 12)
    assert (table.item_ids[table.item_mask == 0] == table.pad_id).all()
    assert (table.item_ids[:, 0] == table.cls_id).all()


def test_history_text_is_most_recent_first_and_cut(table, tokenizer):
    ids, mask = history_tokens(table, [2, 0], max_tokens=40)
    text = tokenizer.decode(ids[mask == 1], skip_special_tokens=True)
    assert text.index("movie c") < text.index("movie a")
    short, short_mask = history_tokens(table, list(range(12)), max_tokens=10)
    assert short_mask.sum() == 10
    assert short[0] == table.cls_id and short[9] == table.sep_id


def test_empty_history_is_cls_sep(table):
    ids, mask = history_tokens(table, [], max_tokens=8)
    assert ids[:2].tolist() == [table.cls_id, table.sep_id] and mask.sum() == 2


def test_save_load_round_trip(table, tmp_path):
    path = tmp_path / "tokens.npz"
    table.save(path)
    loaded = TokenTable.load(path)
    np.testing.assert_array_equal(loaded.item_ids, table.item_ids)
    assert [t.tolist() for t in loaded.title_tokens] == [t.tolist() for t in table.title_tokens]
    assert (loaded.cls_id, loaded.sep_id, loaded.pad_id) == (table.cls_id, table.sep_id, table.pad_id)
