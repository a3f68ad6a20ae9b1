"""Serving a catalogue that grew after training (``--new-items``): new items are
appended with zero identity vectors, scored from their text, recommendable, and
the run's own index is reused untouched."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from fedrec.checkpoint import save_checkpoint
from fedrec.cli import main
from fedrec.config import load_config, to_run_config
from fedrec.data.interactions import DataError
from fedrec.item_counts import save_item_counts
from fedrec.model.adapters import adapter_state, load_adapter_state
from fedrec.model.build import build_recommender
from fedrec.prepare import prepare
from fedrec.results import RunRecord
from fedrec.serving import Recommender
from fedrec.serving.index import index_path, new_items_index_path
from tests.conftest import toy_run_config

TABLE_KEY = "base_model.model.item_identity.table.weight"


@pytest.fixture(scope="module", params=[0, 3], ids=["full-table", "low-rank"])
def run_dir(request, tmp_path_factory):
    """A run trained with item identities: moved adapters and a non-zero identity table."""
    folder = tmp_path_factory.mktemp("new-items")
    config = load_config(toy_run_config(folder, **{"model.item-ids": True, "model.item-id-rank": request.param}))
    prepared = prepare(config.data, config.eval)
    model = build_recommender(config.model, config.lora, prepared.num_items)
    generator = torch.Generator().manual_seed(5)
    state = adapter_state(model.encoder)
    load_adapter_state(model.encoder, {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in state.items()})
    out = folder / "out"
    save_checkpoint(model.encoder, out, 2)
    RunRecord(settings=to_run_config(config)).write(out)
    return out


def _write(path, rows):
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture()
def new_items(tmp_path):
    """Two new items; n1 has the very text of the run's item i3."""
    return _write(
        tmp_path / "new.csv",
        {
            "item_id": ["n1", "n2"],
            "title": ["Film 3 (remastered)", "Brand New Film"],
            "text": ["Film 3. Genres: Drama", "Brand New Film. Genres: Comedy"],
        },
    )


def test_new_items_are_appended_and_scored_from_their_text_alone(run_dir, new_items):
    served = Recommender.from_run(run_dir)
    grown = Recommender.from_run(run_dir, new_items=new_items)
    run_items = served.num_items
    assert grown.num_items == run_items + 2
    assert grown.item_ids[run_items:] == ["n1", "n2"] and grown.titles[-1] == "Brand New Film"
    # the run's items keep their indices and embeddings
    torch.testing.assert_close(grown.items[:run_items], served.items)
    # the new items' identity vectors are zero, the run's are as trained
    model = grown.trained.model
    identity = model.item_identity
    with torch.no_grad():
        assert identity(torch.arange(run_items, run_items + 2)).abs().max() == 0
        assert identity(torch.arange(run_items)).abs().max() > 0
    # n1 reads exactly as i3 but has no identity vector: its row is i3's text embedding alone
    i3 = grown.item_index_of["i3"]
    tokens = grown.trained.table
    ids = torch.from_numpy(tokens.item_ids[[i3]].astype(np.int64))
    mask = torch.from_numpy(tokens.item_mask[[i3]].astype(np.int64))
    with torch.no_grad():
        text_only = model.embed_items(ids, mask, torch.tensor([run_items]))  # a zero row of the grown table
        with_identity = model.embed_items(ids, mask, torch.tensor([i3]))
    torch.testing.assert_close(grown.items[run_items], text_only[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grown.items[i3], with_identity[0], atol=1e-5, rtol=1e-4)
    assert (grown.items[run_items] - grown.items[i3]).abs().max() > 1e-2  # i3's identity moved it


def test_new_items_are_recommended_and_can_be_a_new_users_history(run_dir, new_items):
    grown = Recommender.from_run(run_dir, new_items=new_items)
    user_id = str(grown.trained.prepared.users["user_id"].iloc[0])
    history = grown.history_of(user_id)
    everything = grown.for_user(user_id, k=grown.num_items)
    assert {"n1", "n2"} <= {r.item_id for r in everything}
    assert len(everything) == grown.num_items - len(np.unique(history))
    scores = (grown.items @ grown.user_vector(history)).numpy()
    by_id = {r.item_id: r.score for r in everything}
    np.testing.assert_allclose([by_id["n1"], by_id["n2"]], scores[-2:], atol=1e-5)
    # a new user who has n2: it is excluded, and its title explains the recommendations
    found = grown.for_history(item_ids=["i4", "n2"], k=3)
    assert "n2" not in {r.item_id for r in found}
    assert any("Brand New Film" in r.because for r in found)


def test_new_items_get_no_popularity_prior(run_dir, new_items):
    prepared = Recommender.from_run(run_dir).trained.prepared
    save_item_counts(run_dir, np.full(prepared.num_items, 50.0))
    try:
        grown = Recommender.from_run(run_dir, overrides={"popularity.weight": 0.1}, new_items=new_items)
        prior = grown.trained.item_prior
        assert prior.shape == (prepared.num_items + 2,)
        np.testing.assert_allclose(prior[: prepared.num_items].numpy(), 0.1 * np.log1p(50.0), rtol=1e-6)
        assert prior[prepared.num_items :].abs().max() == 0
    finally:
        (run_dir / "item-counts.npy").unlink()


def test_the_runs_index_is_reused_and_the_new_items_cached_beside_it(run_dir, new_items, tmp_path):
    served = Recommender.from_run(run_dir)
    run_index = index_path(served.trained)
    before = run_index.stat().st_mtime_ns
    grown = Recommender.from_run(run_dir, new_items=new_items)
    assert run_index.stat().st_mtime_ns == before  # not re-encoded, not overwritten
    added = new_items_index_path(grown.trained)
    np.testing.assert_array_equal(np.load(added), grown.items[served.num_items :].numpy())
    # other new items: another file, the first one kept
    other = _write(tmp_path / "other.csv", {"item_id": ["n9"], "text": ["Another Film. Genres: Drama"]})
    again = Recommender.from_run(run_dir, new_items=other)
    assert new_items_index_path(again.trained) != added and added.exists()
    assert again.titles[-1] == "Another Film. Genres: Drama"  # the text doubles as the title
    assert json.loads(added.with_suffix(".json").read_text())["new_items"] == grown.trained.new_items_digest


def test_bad_new_items_files_are_refused_by_file_and_line(run_dir, tmp_path):
    clash = _write(tmp_path / "clash.csv", {"item_id": ["n1", "i7"], "text": ["A. Genres: Drama", "B. Genres: Drama"]})
    with pytest.raises(DataError, match=r"clash\.csv, line 3: item 'i7' is already in the run's catalogue"):
        Recommender.from_run(run_dir, new_items=clash)
    no_text = _write(tmp_path / "no_text.csv", {"item_id": ["n1"], "title": ["A"]})
    with pytest.raises(DataError, match=r"no_text\.csv.*text"):
        Recommender.from_run(run_dir, new_items=no_text)
    twice = _write(tmp_path / "twice.csv", {"item_id": ["n1", "n1"], "text": ["A", "B"]})
    with pytest.raises(DataError, match=r"twice\.csv.*n1"):
        Recommender.from_run(run_dir, new_items=twice)


def test_fedrec_recommend_with_new_items(run_dir, new_items, capsys):
    capsys.readouterr()
    grown = Recommender.from_run(run_dir, new_items=new_items)
    argv = ["recommend", "--model", str(run_dir), "--items", "i4", "n2", "--k", "50", "--json", "--new-items", str(new_items)]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["item_id"] for r in printed] == [r.item_id for r in grown.for_history(["i4", "n2"], k=50)]
    assert "n1" in {r["item_id"] for r in printed} and "n2" not in {r["item_id"] for r in printed}


def test_fedrec_recommend_refuses_a_bad_new_items_file_by_name(run_dir, tmp_path, capsys):
    clash = _write(tmp_path / "clash.csv", {"item_id": ["i2"], "text": ["A. Genres: Drama"]})
    argv = ["recommend", "--model", str(run_dir), "--user", "u1", "--new-items", str(clash)]
    assert main(argv) == 2
    assert "clash.csv, line 2: item 'i2' is already in the run's catalogue" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "missing.csv")]) == 2
    assert "missing.csv" in capsys.readouterr().err


def test_an_int8_encoder_serves_the_grown_catalogue(run_dir, new_items):
    fp32 = Recommender.from_run(run_dir, new_items=new_items)
    int8 = Recommender.from_run(run_dir, quantization="int8", new_items=new_items)
    assert int8.num_items == fp32.num_items
    cosine = (int8.items[-2:] * fp32.items[-2:]).sum(1)
    assert cosine.min() > 0.9, cosine
