"""Row-level parsing and the errors that point at the bad file, line and value."""

import re

import numpy as np
import pandas as pd
import pytest

from fedrec.data.interactions import DataError
from fedrec.data.validation import (
    check_unique,
    parse_ids,
    parse_interactions,
    parse_timestamps,
    read_delimited,
    read_parquet,
    table_from_records,
)


def write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_parses_typed_columns_and_keeps_ids_as_strings(tmp_path):
    path = write(
        tmp_path / "r.csv",
        "user_id,item_id,rating,timestamp\n"
        "007,42, 4.5 ,881250949\n"
        "u2,x-1,1,2020-01-01T00:00:00Z\n"
        "u3,x-2,2,2020-01-01\n",
    )
    frame = parse_interactions(read_delimited(path))
    assert frame["user_id"].tolist() == ["007", "u2", "u3"]
    assert frame["item_id"].tolist() == ["42", "x-1", "x-2"]
    assert frame["rating"].dtype == np.float32
    assert frame["rating"].tolist() == [4.5, 1.0, 2.0]
    assert frame["timestamp"].dtype == np.int64
    assert frame["timestamp"].tolist() == [881250949, 1577836800, 1577836800]
    assert list(frame.index) == [0, 1, 2]


def test_bad_number_names_file_line_column_and_value(tmp_path):
    path = write(
        tmp_path / "r.csv",
        "user_id,item_id,rating,timestamp\nu1,i1,4,10\nu1,i2,4,11\nu1,i3,four,12\nu1,i4,x,13\n",
    )
    with pytest.raises(DataError) as error:
        parse_interactions(read_delimited(path))
    message = str(error.value)
    assert f"{path}, line 4" in message  # header is line 1
    assert "'rating'" in message and "'four'" in message
    assert "1 more rows" in message


def test_blank_lines_are_skipped_but_counted(tmp_path):
    path = write(
        tmp_path / "r.csv", "user_id,item_id,rating,timestamp\nu1,i1,4,10\n\nu1,i2,4,soon\n\n"
    )
    with pytest.raises(DataError, match=re.escape(f"{path}, line 4")):
        parse_interactions(read_delimited(path))


def test_blank_lines_do_not_become_rows(tmp_path):
    path = write(
        tmp_path / "r.csv", "user_id,item_id,rating,timestamp\nu1,i1,4,10\n\nu2,i2,3,11\n\n"
    )
    assert parse_interactions(read_delimited(path))["user_id"].tolist() == ["u1", "u2"]


def test_empty_id_is_reported_with_its_line(tmp_path):
    path = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\nu1,i1,4,10\n  ,i2,4,11\n")
    with pytest.raises(DataError, match=r"line 3, column 'user_id': expected a non-empty id"):
        parse_interactions(read_delimited(path))


def test_unparsable_timestamp_is_reported(tmp_path):
    path = write(tmp_path / "r.csv", "user_id,item_id,rating,timestamp\nu1,i1,4,yesterday\n")
    with pytest.raises(DataError, match=r"line 2, column 'timestamp'.*'yesterday'"):
        parse_interactions(read_delimited(path))


def test_missing_column_names_file_and_column(tmp_path):
    path = write(tmp_path / "r.csv", "user_id,item_id,timestamp\nu1,i1,10\n")
    with pytest.raises(
        DataError, match=re.escape(f"{path}: missing required column(s) ['rating']")
    ):
        parse_interactions(read_delimited(path))


@pytest.mark.parametrize("content", ["", "user_id,item_id,rating,timestamp\n"])
def test_file_without_data_rows_is_an_error_naming_it(tmp_path, content):
    path = write(tmp_path / "empty.csv", content)
    with pytest.raises(DataError, match=re.escape(str(path))):
        read_delimited(path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        read_delimited(tmp_path / "nope.csv")


def test_wrong_field_count_names_file(tmp_path):
    path = write(tmp_path / "r.tsv", "1\t2\t3\t4\n1\t2\t3\t4\t5\n")
    with pytest.raises(DataError, match=re.escape(f"{path}: malformed table")):
        read_delimited(path, sep="\t", names=["a", "b", "c", "d"])


def test_headerless_files_count_from_line_one_and_accept_multichar_separator(tmp_path):
    path = write(tmp_path / "ratings.dat", "1::10::5::100\n2::20::x::200\n")
    table = read_delimited(path, sep="::", names=["user_id", "item_id", "rating", "timestamp"])
    assert table.frame["item_id"].tolist() == ["10", "20"]
    with pytest.raises(DataError, match=r"ratings\.dat, line 2, column 'rating'"):
        parse_interactions(table)


def test_undecodable_file_suggests_encoding(tmp_path):
    path = tmp_path / "r.csv"
    path.write_bytes("user_id,item_id,rating,timestamp\nü,i,1,2\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"cannot decode as utf-8"):
        read_delimited(path)


def test_parquet_locations_are_rows_and_typed_columns_convert(tmp_path):
    path = tmp_path / "r.parquet"
    pd.DataFrame(
        {
            "user_id": [1, 2, 3],
            "item_id": [10.0, 20.0, 30.0],
            "rating": [1.0, np.nan, 3.0],
            "timestamp": pd.to_datetime(
                ["1970-01-01 00:00:05", "2020-01-01 00:00:00", "2020-01-02 00:00:00"]
            ),
        }
    ).to_parquet(path)
    table = read_parquet(path)
    assert parse_ids(table, "item_id").tolist() == ["10", "20", "30"]
    assert parse_timestamps(table, "timestamp").tolist() == [5, 1577836800, 1577923200]
    with pytest.raises(DataError, match=re.escape(f"{path}, row 2, column 'rating'")):
        parse_interactions(table)


def test_millisecond_timestamps_floor_to_seconds(tmp_path):
    table = table_from_records(
        tmp_path / "x.jsonl", {"t": [1588687728923, "1588687728999"]}, [1, 3]
    )
    assert parse_timestamps(table, "t", unit="ms").tolist() == [1588687728, 1588687728]


def test_missing_record_value_reports_its_json_line(tmp_path):
    path = tmp_path / "x.jsonl"
    table = table_from_records(path, {"t": [1, None]}, [2, 5])
    with pytest.raises(DataError, match=re.escape(f"{path}, line 5, column 't'") + ".*empty value"):
        parse_timestamps(table, "t")


def test_check_unique_reports_the_repeat(tmp_path):
    path = write(tmp_path / "items.csv", "item_id,text\na,x\nb,y\na,z\n")
    table = read_delimited(path)
    with pytest.raises(DataError, match=r"line 4, column 'item_id'.*repeats.*'a'"):
        check_unique(table, parse_ids(table, "item_id"), "item_id")
