"""Generic CSV/Parquet tables with inline or separate item text."""

import pandas as pd
import pytest

from fedrec.data.interactions import DataError
from fedrec.data.tabular import load_table


def write(path, text):
    path.write_text(text)
    return path


def test_inline_text_without_rating_and_with_iso_dates(tmp_path):
    path = write(
        tmp_path / "events.csv",
        "user_id,item_id,timestamp,text\n"
        "u1,a,2021-03-04T05:06:07Z,Alpha text\n"
        "u2,a,1614834367,Alpha text\n"
        'u1,b,1614834368,"Beta, with comma"\n',
    )
    data = load_table(path, None)
    assert data.name == "events"
    assert data.interactions["rating"].tolist() == [1.0, 1.0, 1.0]
    assert data.interactions["timestamp"].tolist() == [1614834367, 1614834367, 1614834368]
    items = data.items.set_index("item_id")
    assert items.loc["b", "text"] == "Beta, with comma"
    assert items.loc["a", "title"] == "Alpha text"  # no title column: text doubles as title
    assert len(data.items) == 2


def test_inline_text_may_be_given_once_per_item(tmp_path):
    path = write(
        tmp_path / "events.csv",
        "user_id,item_id,rating,timestamp,title,text\nu1,a,5,1,Alpha,Alpha text\nu2,a,4,2,,\n",
    )
    items = load_table(path, None).items
    assert items.to_dict("records") == [{"item_id": "a", "title": "Alpha", "text": "Alpha text"}]


def test_conflicting_inline_text_names_line(tmp_path):
    path = write(
        tmp_path / "events.csv",
        "user_id,item_id,rating,timestamp,text\nu1,a,5,1,One\nu2,b,4,2,Two\nu3,a,4,3,Other\n",
    )
    with pytest.raises(
        DataError, match=r"events\.csv, line 4: item 'a' has a different text than on line 2"
    ):
        load_table(path, None)


def test_item_without_any_inline_text_names_line(tmp_path):
    path = write(
        tmp_path / "events.csv", "user_id,item_id,rating,timestamp,text\nu1,a,5,1,One\nu2,b,4,2,\n"
    )
    with pytest.raises(DataError, match=r"line 3: item 'b' has no text"):
        load_table(path, None)


def test_no_text_anywhere_is_an_error(tmp_path):
    path = write(tmp_path / "events.csv", "user_id,item_id,rating,timestamp\nu1,a,5,1\n")
    with pytest.raises(DataError, match=r"events\.csv: no item text.*data\.items_path"):
        load_table(path, None)


def test_parquet_interactions_with_item_table(tmp_path):
    inter = tmp_path / "events.parquet"
    pd.DataFrame(
        {"user_id": [1, 2], "item_id": [10, 11], "rating": [4.0, 2.0], "timestamp": [5, 6]}
    ).to_parquet(inter)
    items = write(
        tmp_path / "items.csv", "item_id,title,text\n10,Ten,Ten text\n11,,Eleven text\n12,Spare,x\n"
    )
    data = load_table(inter, items)
    assert data.interactions["user_id"].tolist() == ["1", "2"]
    assert data.interactions["item_id"].tolist() == ["10", "11"]
    catalogue = data.items.set_index("item_id")
    assert catalogue.loc["10", "title"] == "Ten"
    assert catalogue.loc["11", "title"] == "Eleven text"
    assert len(catalogue) == 3


def test_item_table_takes_precedence_over_inline_text(tmp_path):
    inter = write(
        tmp_path / "events.csv", "user_id,item_id,rating,timestamp,text\nu1,a,5,1,inline\n"
    )
    items = write(tmp_path / "items.csv", "item_id,text\na,from table\n")
    assert load_table(inter, items).items["text"].tolist() == ["from table"]


def test_item_table_errors_name_file_and_line(tmp_path):
    inter = write(tmp_path / "events.csv", "user_id,item_id,rating,timestamp\nu1,a,5,1\n")
    duplicate = write(tmp_path / "dup.csv", "item_id,text\na,x\na,y\n")
    with pytest.raises(DataError, match=r"dup\.csv, line 3, column 'item_id'"):
        load_table(inter, duplicate)
    empty_text = write(tmp_path / "blank.csv", "item_id,text\nb,x\na,  \n")
    with pytest.raises(DataError, match=r"blank\.csv, line 3, column 'text'"):
        load_table(inter, empty_text)
    no_text = write(tmp_path / "notext.csv", "item_id,title\na,x\n")
    with pytest.raises(DataError, match=r"notext\.csv: missing required column\(s\) \['text'\]"):
        load_table(inter, no_text)


def test_interacted_item_missing_from_item_table(tmp_path):
    inter = write(
        tmp_path / "events.csv", "user_id,item_id,rating,timestamp\nu1,a,5,1\nu1,zzz,5,2\n"
    )
    items = write(tmp_path / "items.csv", "item_id,text\na,x\n")
    with pytest.raises(DataError, match=r"no catalogue entry.*zzz"):
        load_table(inter, items)


def test_unknown_suffix_is_rejected(tmp_path):
    path = write(tmp_path / "events.xlsx", "whatever")
    with pytest.raises(DataError, match=r"events\.xlsx: unknown table format '\.xlsx'"):
        load_table(path, None)


def test_bad_timestamp_in_csv_names_line(tmp_path):
    path = write(
        tmp_path / "events.csv", "user_id,item_id,timestamp,text\nu1,a,1,x\nu1,b,3rd of May,y\n"
    )
    with pytest.raises(DataError, match=r"events\.csv, line 3, column 'timestamp'.*'3rd of May'"):
        load_table(path, None)
