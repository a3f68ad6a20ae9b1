"""load_dataset picks the right loader and names the setting at fault."""

import json

import pytest

from fedrec.data import registry
from fedrec.data.interactions import DataError
from fedrec.data.registry import KNOWN_DATASETS, load_dataset


def recbole_folder(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t1\t5\t10\n"
    )
    (folder / "ml-100k.item").write_text(
        "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n1\tHeat\t1995\tAction\n"
    )
    return folder


def test_unknown_name_lists_known_names(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("ml-7m", None, tmp_path)
    assert "'ml-7m'" in str(error.value)
    assert all(name in str(error.value) for name in KNOWN_DATASETS)


@pytest.mark.parametrize("name", ["ml-1m", "ml-20m", "amazon", "csv", "parquet", "table"])
def test_missing_path_names_the_setting(tmp_path, name):
    with pytest.raises(DataError, match=rf"'{name}' needs data\.path"):
        load_dataset(name, None, tmp_path)


def test_ml100k_without_path_fetches_into_the_cache(tmp_path, monkeypatch):
    fetched = []

    def fake_ensure(cache_dir):
        fetched.append(cache_dir)
        return recbole_folder(cache_dir / "ml-100k")

    monkeypatch.setattr(registry, "ensure_ml100k", fake_ensure)
    data = load_dataset("ML-100K", None, tmp_path / "cache")
    assert fetched == [tmp_path / "cache"]
    assert data.items["text"].tolist() == ["Heat (1995). Genres: Action"]


def test_ml100k_folder_detects_recbole_layout(tmp_path):
    data = load_dataset("ml-100k", str(recbole_folder(tmp_path / "rb")), tmp_path / "cache")
    assert data.items["title"].tolist() == ["Heat (1995)"]


def test_ml100k_folder_detects_grouplens_layout(tmp_path):
    folder = tmp_path / "gl"
    folder.mkdir()
    (folder / "u.data").write_text("1\t1\t5\t10\n")
    (folder / "u.item").write_text("1|Heat (1995)|||x|" + "|".join(["0"] * 18 + ["1"]) + "\n")
    data = load_dataset("ml-100k", str(folder), tmp_path / "cache")
    assert data.items["text"].tolist() == ["Heat (1995). Genres: Western"]


def test_ml100k_folder_without_known_files(tmp_path):
    with pytest.raises(DataError, match=r"holds neither RecBole files.*nor GroupLens files"):
        load_dataset("ml-100k", str(tmp_path), tmp_path / "cache")


def test_ml1m_dispatches_to_dat_loader(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::7::4::100\n")
    (tmp_path / "movies.dat").write_text("7::Sabrina (1995)::Comedy|Romance\n")
    data = load_dataset("ml-1m", str(tmp_path), tmp_path / "cache")
    assert data.items["text"].tolist() == ["Sabrina (1995). Genres: Comedy, Romance"]


def test_ml20m_needs_a_folder(tmp_path):
    path = tmp_path / "ratings.csv"
    path.write_text("x")
    with pytest.raises(DataError, match=r"is not a folder; set it to the unpacked ml-20m folder"):
        load_dataset("ml-20m", str(path), tmp_path / "cache")


def test_csv_with_items_path(tmp_path):
    inter = tmp_path / "i.csv"
    inter.write_text("user_id,item_id,rating,timestamp\nu,a,1,2\n")
    items = tmp_path / "items.csv"
    items.write_text("item_id,text\na,Alpha\n")
    data = load_dataset("csv", str(inter), tmp_path / "cache", items_path=str(items))
    assert data.items["text"].tolist() == ["Alpha"]


def test_amazon_with_meta(tmp_path):
    reviews = tmp_path / "r.json"
    reviews.write_text(
        json.dumps({"reviewerID": "A", "asin": "B", "overall": 5, "unixReviewTime": 9})
    )
    meta = tmp_path / "m.json"
    meta.write_text(json.dumps({"asin": "B", "title": "Book"}))
    data = load_dataset("amazon", str(reviews), tmp_path / "cache", items_path=str(meta))
    assert data.items["text"].tolist() == ["Book"]


def test_items_path_rejected_where_unused(tmp_path):
    with pytest.raises(DataError, match=r"data\.items_path is only used by"):
        load_dataset("ml-1m", str(tmp_path), tmp_path / "cache", items_path="x.csv")
