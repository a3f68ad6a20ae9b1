"""simulations/transition_sweep.py: the prior's settings chosen on validation, scored on test."""

import json

import numpy as np
import pytest

from fedrec.checkpoint import save_checkpoint
from fedrec.config import ConfigError, load_config, to_run_config
from fedrec.item_transitions import (
    TRANSITIONS_FILE,
    load_transitions,
    local_transitions,
)
from fedrec.model.build import build_recommender
from fedrec.prepare import prepare
from fedrec.reevaluate import evaluate_run, load_run
from fedrec.results import RunRecord
from simulations import transition_sweep
from tests.conftest import toy_run_config


def _write_run(folder, **overrides):
    """A run folder as `fedrec simulate` writes it (one checkpoint), without the prior."""
    config = load_config(toy_run_config(folder, **overrides))
    prepare(config.data, config.eval)
    out = folder / "out"
    save_checkpoint(build_recommender(config.model, config.lora).encoder, out, 1)
    RunRecord(settings=to_run_config(config)).write(out)
    return out


@pytest.fixture()
def run_dir(tmp_path):
    return _write_run(tmp_path)


def test_counts_are_the_sum_of_what_each_client_holds(run_dir):
    model, _ = load_run(run_dir, None, {"runtime.threads": 1})
    clients = transition_sweep.client_sequences(model)
    assert len(clients) == model.prepared.num_users
    summed = transition_sweep.summed_counts(clients, model.prepared.num_items, 4)
    central = local_transitions(model.prepared.all_train_items, model.prepared.num_items, 4)
    np.testing.assert_array_equal(summed.toarray(), central.toarray())  # one user per client


def test_sweep_chooses_on_validation_and_matches_fedrec_evaluate(run_dir, capsys):
    assert transition_sweep.main(["--model", str(run_dir), "--threads", "1", "--save"]) == 0
    result = json.loads((run_dir / "evaluations" / "round-0001-transition-sweep.json").read_text())
    k = result["k"]
    tried = result["tried"]
    settings = len(transition_sweep.WINDOWS) * len(transition_sweep.LAST_ITEMS) * len(transition_sweep.DECAYS)
    assert len(tried) == len(transition_sweep.WEIGHTS) * settings
    best = max(tried, key=lambda t: t["valid"][f"ndcg@{k}"])
    chosen = result["chosen"]
    assert {key: chosen[key] for key in ("weight", "window", "last_items", "decay")} == {
        key: best[key] for key in ("weight", "window", "last_items", "decay")
    }
    assert len(result["alone"]) == settings
    assert result["alone_test"][f"hr@{k}"] != result["test"][f"hr@{k}"] or result["alone_test"][f"ndcg@{k}"] != result["test"][f"ndcg@{k}"]
    # the saved counts are the chosen window's, and `fedrec evaluate` with the chosen
    # settings reproduces the sweep's test figures through the library's own path
    saved = load_transitions(run_dir, load_run(run_dir)[0].prepared.num_items)
    assert saved is not None and saved.sum() > 0
    overrides = {
        "transitions.weight": chosen["weight"],
        "transitions.last-items": chosen["last_items"],
        "transitions.decay": chosen["decay"],
        "runtime.threads": 1,
    }
    official = evaluate_run(run_dir, split="test", overrides=overrides)["metrics"]
    for name in (f"hr@{k}", f"ndcg@{k}", f"hr@{k}_full"):
        assert official[name] == pytest.approx(result["test"][name], abs=1e-9)
    without = evaluate_run(run_dir, split="test", overrides={"runtime.threads": 1})["metrics"]
    assert without[f"ndcg@{k}"] == pytest.approx(result["without"]["test"][f"ndcg@{k}"], abs=1e-9)
    assert official[f"ndcg@{k}"] != without[f"ndcg@{k}"]  # the prior changed the ranking
    assert "chosen on validation" in capsys.readouterr().out
    # a second --save never overwrites the counts
    before = (run_dir / TRANSITIONS_FILE).read_bytes()
    assert transition_sweep.main(["--model", str(run_dir), "--threads", "1", "--save"]) == 0
    assert "not saved" in capsys.readouterr().out and (run_dir / TRANSITIONS_FILE).read_bytes() == before


def test_a_run_that_trained_on_the_validation_items_is_refused(tmp_path):
    out = _write_run(tmp_path, **{"train.include-valid-item": True})
    with pytest.raises(ConfigError, match="train.include-valid-item"):
        transition_sweep.main(["--model", str(out), "--threads", "1"])


def test_run_config_sets_evaluation_settings_and_names_the_file(run_dir):
    overrides = {"personal.enabled": True, "personal.steps": 5}
    assert not load_run(run_dir, None, {"runtime.threads": 1})[0].config.personal.enabled
    argv = ["--model", str(run_dir), "--threads", "1", "--run-config", "personal.enabled=true personal.steps=5"]
    assert transition_sweep.main(argv) == 0
    out = run_dir / "evaluations" / "round-0001-transition-sweep_personal.enabled=True_personal.steps=5.json"
    result = json.loads(out.read_text())
    assert result["overrides"] == overrides
    assert not (run_dir / "evaluations" / "round-0001-transition-sweep.json").exists()
    k = result["k"]
    # the model's own figures are those of `fedrec evaluate` with the same settings, not the run's
    personal = evaluate_run(run_dir, split="test", overrides={**overrides, "runtime.threads": 1})["metrics"]
    plain = evaluate_run(run_dir, split="test", overrides={"runtime.threads": 1})["metrics"]
    assert result["without"]["test"][f"ndcg@{k}"] == pytest.approx(personal[f"ndcg@{k}"], abs=1e-9)
    assert personal[f"ndcg@{k}"] != plain[f"ndcg@{k}"]


def test_run_config_refuses_a_training_setting(run_dir):
    with pytest.raises(ConfigError, match="lora.r"):
        transition_sweep.main(["--model", str(run_dir), "--threads", "1", "--run-config", "lora.r=4"])
