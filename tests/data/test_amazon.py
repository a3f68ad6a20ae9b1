"""Amazon reviews in the 2014/2018 and 2023 schemas, plain and gzipped."""

import gzip
import json

import pytest

from fedrec.data.amazon import DESCRIPTION_CHARS, load_amazon_reviews
from fedrec.data.interactions import DataError


def write_lines(path, records, *, gz=False, raw_lines=()):
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records] + list(raw_lines)
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


LEGACY_REVIEWS = [
    {"reviewerID": "A1", "asin": "B001", "overall": 5.0, "unixReviewTime": 1400000000},
    {"reviewerID": "A2", "asin": "B002", "overall": 3.0, "unixReviewTime": 1400000100},
    {"reviewerID": "A1", "asin": "B003", "overall": 4.0, "unixReviewTime": 1400000200},
]


def test_legacy_schema_with_python_literal_meta(tmp_path):
    reviews = write_lines(tmp_path / "reviews_Books_5.json", LEGACY_REVIEWS)
    long_description = "word " * 100
    meta = write_lines(
        tmp_path / "meta_Books.json",
        [
            # 2014 metadata: Python dict literals, nested category paths, string description.
            str(
                {
                    "asin": "B001",
                    "title": "Dune",
                    "categories": [["Books", "Sci-Fi"], ["Books", "Classics"]],
                    "description": long_description,
                }
            ),
            # 2018 metadata: JSON, flat category list, description as a list with HTML.
            {
                "asin": "B002",
                "title": "Emma",
                "category": ["Books", "Romance"],
                "description": ["<b>A &amp; B</b>", "classic."],
            },
            {"asin": "B003", "title": "", "category": [], "description": ""},  # nothing to embed
            {"asin": "B999", "title": "Not reviewed"},
        ],
    )
    data = load_amazon_reviews(reviews, meta)
    assert data.name == "amazon-reviews_Books_5"
    assert data.interactions["user_id"].tolist() == ["A1", "A2"]  # B003 has no usable metadata
    assert data.interactions["timestamp"].tolist() == [1400000000, 1400000100]
    items = data.items.set_index("item_id")
    assert set(items.index) == {"B001", "B002"}
    dune = items.loc["B001", "text"]
    expected_description = long_description[:DESCRIPTION_CHARS].rstrip()
    assert dune == f"Dune. Categories: Books, Sci-Fi, Classics. {expected_description}"
    assert items.loc["B002", "text"] == "Emma. Categories: Books, Romance. A & B classic."


def test_2023_schema_gzipped_with_millisecond_timestamps(tmp_path):
    reviews = write_lines(
        tmp_path / "Toys.jsonl.gz",
        [
            {
                "user_id": "U1",
                "asin": "C1-red",
                "parent_asin": "C1",
                "rating": 4.0,
                "timestamp": 1588687728923,
            },
            {"user_id": "U2", "asin": "C2", "rating": 2.0, "timestamp": 1588687729000},
        ],
        gz=True,
    )
    meta = write_lines(
        tmp_path / "meta_Toys.jsonl.gz",
        [
            {
                "parent_asin": "C1",
                "title": "Robot",
                "categories": ["Toys", "Robots"],
                "description": ["Beeps.", "Walks."],
                "main_category": "Toys & Games",
            },
            {
                "parent_asin": "C2",
                "title": "Ball",
                "categories": [],
                "description": [],
                "main_category": "Sports",
            },
        ],
        gz=True,
    )
    data = load_amazon_reviews(reviews, meta)
    assert data.interactions["item_id"].tolist() == ["C1", "C2"]  # parent_asin, else asin
    assert data.interactions["timestamp"].tolist() == [1588687728, 1588687729]
    items = data.items.set_index("item_id")
    assert items.loc["C1", "text"] == "Robot. Categories: Toys, Robots. Beeps. Walks."
    assert items.loc["C2", "text"] == "Ball. Categories: Sports"


def test_meta_is_required(tmp_path):
    reviews = write_lines(tmp_path / "r.json", LEGACY_REVIEWS)
    with pytest.raises(DataError, match=r"r\.json: .*data\.items_path"):
        load_amazon_reviews(reviews, None)


def test_invalid_json_line_is_named(tmp_path):
    reviews = write_lines(tmp_path / "r.json", LEGACY_REVIEWS[:1], raw_lines=["", "{not json"])
    meta = write_lines(tmp_path / "m.json", [{"asin": "B001", "title": "Dune"}])
    with pytest.raises(DataError, match=r"r\.json, line 3: not a JSON object"):
        load_amazon_reviews(reviews, meta)


def test_bad_rating_is_named_with_its_line(tmp_path):
    bad = dict(LEGACY_REVIEWS[1], overall="five")
    reviews = write_lines(tmp_path / "r.json", [LEGACY_REVIEWS[0], bad])
    meta = write_lines(tmp_path / "m.json", [{"asin": "B001", "title": "Dune"}])
    with pytest.raises(DataError, match=r"r\.json, line 2, column 'overall'.*'five'"):
        load_amazon_reviews(reviews, meta)


def test_unrecognised_schema_lists_expected_fields(tmp_path):
    reviews = write_lines(tmp_path / "r.json", [{"who": "x"}])
    meta = write_lines(tmp_path / "m.json", [{"asin": "B001", "title": "Dune"}])
    with pytest.raises(DataError, match=r"r\.json, line 1: unrecognised review record.*reviewerID"):
        load_amazon_reviews(reviews, meta)


def test_meta_for_other_items_is_an_error(tmp_path):
    reviews = write_lines(tmp_path / "r.json", LEGACY_REVIEWS)
    meta = write_lines(tmp_path / "m.json", [{"asin": "Z1", "title": "Other"}])
    with pytest.raises(DataError, match=r"m\.json: describes none of the reviewed items"):
        load_amazon_reviews(reviews, meta)
