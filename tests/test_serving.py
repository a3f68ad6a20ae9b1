"""Serving a trained run: merged adapters, item index, top-k, explanations, HTTP."""

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from fedrec.checkpoint import save_checkpoint
from fedrec.cli import main
from fedrec.config import ConfigError, TransitionConfig, load_config, to_run_config
from fedrec.evaluation import (
    encode_items,
    encode_users,
    evaluate_scorer,
    histories_for,
    model_scorer,
)
from fedrec.item_counts import save_item_counts
from fedrec.item_transitions import (
    local_transitions,
    save_transitions,
    transition_prior,
)
from fedrec.model.adapters import adapter_state, load_adapter_state
from fedrec.model.build import build_recommender, token_table
from fedrec.model.personal_vector import personalise
from fedrec.prepare import prepare
from fedrec.results import RunRecord
from fedrec.serving import (
    EmptyHistoryError,
    Recommender,
    RunDirectoryError,
    ServingError,
    UnknownItemError,
    UnknownUserError,
)
from fedrec.serving.index import index_path
from tests.conftest import toy_run_config


def _trained_adapters(model, seed):
    """Adapters moved away from their zero-B initialisation, so merging matters."""
    generator = torch.Generator().manual_seed(seed)
    state = adapter_state(model.encoder)
    moved = {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
    load_adapter_state(model.encoder, moved)
    return model


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder as `fedrec simulate` writes it: metrics.json and two checkpoints."""
    folder = tmp_path_factory.mktemp("serving")
    config = load_config(toy_run_config(folder))
    prepare(config.data, config.eval)
    out = folder / "out"
    for server_round in (1, 3):
        model = _trained_adapters(build_recommender(config.model, config.lora), seed=server_round)
        save_checkpoint(model.encoder, out, server_round)
    RunRecord(settings=to_run_config(config)).write(out)
    return out


@pytest.fixture(scope="module")
def reference(run_dir):
    """The unmerged PEFT model of round 3, rebuilt independently of fedrec.serving."""
    config = load_config(json.loads((run_dir / "metrics.json").read_text())["settings"])
    prepared = prepare(config.data, config.eval)
    model = _trained_adapters(build_recommender(config.model, config.lora), seed=3)
    return config, prepared, model, token_table(prepared, config.model)


@pytest.fixture(scope="module")
def recommender(run_dir):
    return Recommender.from_run(run_dir)


def _known_items(prepared, user_idx):
    train = prepared.all_train_items[user_idx]
    held_out = [prepared.holdout(s)["item_idx"].to_numpy()[user_idx] for s in ("valid", "test")]
    return np.concatenate([train, held_out])


def test_merged_index_equals_the_unmerged_adapted_model(recommender, reference):
    _, _, model, table = reference
    expected = encode_items(model, table, torch.device("cpu"))
    assert recommender.trained.server_round == 3  # the newest checkpoint
    torch.testing.assert_close(recommender.items, expected, atol=1e-5, rtol=1e-4)
    # the adapters changed the embeddings: round 1 or the base model would differ
    base = encode_items(build_recommender(reference[0].model, reference[0].lora), table, torch.device("cpu"))
    assert (recommender.items - base).abs().max() > 1e-2


def test_user_top_k_is_the_brute_force_ranking_without_seen_items(recommender, reference):
    config, prepared, model, table = reference
    user_id = str(prepared.users["user_id"].iloc[2])
    known = _known_items(prepared, 2)
    items = encode_items(model, table, torch.device("cpu"))
    user = encode_users(
        model, table, [known], config.model.history_items, config.model.max_user_tokens, torch.device("cpu")
    )[0]
    scores = (items @ user).numpy()
    scores[known] = -np.inf
    expected = np.argsort(-scores, kind="stable")[:5]

    found = recommender.for_user(user_id, k=5)
    assert [r.item_id for r in found] == prepared.items["item_id"].iloc[expected].tolist()
    np.testing.assert_allclose([r.score for r in found], scores[expected], atol=1e-5)
    assert not {r.item_id for r in found} & set(prepared.items["item_id"].iloc[known])


def test_explanations_name_the_most_similar_history_items(recommender, reference):
    _, prepared, _, _ = reference
    user_id = str(prepared.users["user_id"].iloc[0])
    history = recommender.history_of(user_id)
    titles = prepared.items["title"].tolist()
    for rec in recommender.for_user(user_id, k=3):
        item = recommender.item_index_of[rec.item_id]
        similarity = (recommender.items[history] @ recommender.items[item]).numpy()
        best = [titles[history[j]] for j in np.argsort(-similarity)[:2]]
        assert list(rec.because) == best


def test_new_user_from_ids_or_from_titles_matches_a_known_user(recommender, reference):
    _, prepared, _, _ = reference
    user_id = str(prepared.users["user_id"].iloc[1])
    history = recommender.history_of(user_id)
    ids = prepared.items["item_id"].iloc[history].tolist()
    titles = prepared.items["title"].iloc[history].tolist()
    as_user = recommender.for_user(user_id, k=4)
    assert recommender.for_history(item_ids=ids, k=4) == as_user
    # titles typed as free text tokenize exactly as the catalogue's titles, and are excluded
    torch.testing.assert_close(recommender.user_vector(np.zeros(0, np.int64), titles), recommender.user_vector(history))
    assert recommender.for_history(texts=[t.upper() for t in titles], k=4) == as_user


def test_bad_requests_raise_errors_that_name_the_input(recommender):
    with pytest.raises(UnknownUserError, match="nobody"):
        recommender.for_user("nobody")
    with pytest.raises(UnknownItemError, match="i999"):
        recommender.for_history(item_ids=["i1", "i999"])
    with pytest.raises(EmptyHistoryError):
        recommender.for_history()
    with pytest.raises(ServingError, match="k must be"):
        recommender.for_history(item_ids=["i1"], k=0)


def test_item_index_is_cached_on_disk_and_rebuilt_when_stale(run_dir, recommender):
    path = index_path(recommender.trained)
    assert path.exists()
    np.testing.assert_array_equal(np.load(path), recommender.items.numpy())
    meta = path.with_suffix(".json")
    description = json.loads(meta.read_text())
    np.save(path, np.zeros_like(np.load(path)))  # a stale index of another catalogue
    meta.write_text(json.dumps({**description, "catalogue_digest": "0" * 16}))
    rebuilt = Recommender.from_run(run_dir)
    torch.testing.assert_close(rebuilt.items, recommender.items)
    assert json.loads(meta.read_text()) == description


def test_older_round_and_int8_quantization(run_dir, recommender):
    older = Recommender.from_run(run_dir, server_round=1)
    assert older.trained.server_round == 1
    assert (older.items - recommender.items).abs().max() > 1e-2
    quantized = Recommender.from_run(run_dir, quantization="int8")
    linear = [m for m in quantized.trained.model.modules() if type(m).__name__ == "Linear"]
    assert len(linear) == 12 and all(type(m) is not torch.nn.Linear for m in linear)  # all int8
    cosine = (quantized.items * recommender.items).sum(1)
    assert cosine.min() > 0.9, cosine.min()
    assert index_path(quantized.trained) != index_path(recommender.trained)


def test_serving_the_mean_of_several_rounds(run_dir, recommender, reference):
    """average_rounds=(1, 3) serves the merged mean of both rounds' adapters, from its own index file."""
    config, _, round3_model, table = reference
    averaged = Recommender.from_run(run_dir, average_rounds=(3, 1))
    assert averaged.trained.server_round == 3 and averaged.trained.averaged_rounds == (1, 3)
    round1 = adapter_state(_trained_adapters(build_recommender(config.model, config.lora), seed=1).encoder)
    round3 = adapter_state(round3_model.encoder)
    mean = build_recommender(config.model, config.lora)
    load_adapter_state(mean.encoder, {k: (round1[k] + round3[k]) / 2 for k in round3})
    torch.testing.assert_close(averaged.items, encode_items(mean, table, torch.device("cpu")), atol=1e-5, rtol=1e-4)
    assert (averaged.items - recommender.items).abs().max() > 1e-2
    assert index_path(averaged.trained) != index_path(recommender.trained)
    with pytest.raises(ValueError, match="not both"):
        Recommender.from_run(run_dir, server_round=3, average_rounds=(1, 3))
    with pytest.raises(RunDirectoryError, match="round 2"):
        Recommender.from_run(run_dir, average_rounds=(2, 3))


PERSONAL = {"personal.enabled": True, "personal.steps": 30, "personal.recent-items": 2}


def test_personal_user_vector_is_fitted_from_the_users_items(run_dir, recommender, reference):
    _, prepared, _, _ = reference
    personal = Recommender.from_run(run_dir, overrides=PERSONAL)
    user_id = str(prepared.users["user_id"].iloc[2])
    known = _known_items(prepared, 2)
    settings = personal.trained.config.personal
    expected = personalise(recommender.user_vector(known)[None], recommender.items, [known], settings, 0.05)[0]
    torch.testing.assert_close(personal.user_vector(known), expected)
    scores = (personal.items @ expected).numpy()
    scores[known] = -np.inf
    found = personal.for_user(user_id, k=5)
    assert [r.item_id for r in found] == prepared.items["item_id"].iloc[np.argsort(-scores, kind="stable")[:5]].tolist()
    assert (expected - recommender.user_vector(known)).abs().max() > 1e-2


def test_popularity_prior_is_added_to_the_served_scores(run_dir, recommender, reference):
    _, prepared, _, _ = reference
    with pytest.raises(RunDirectoryError, match="item-counts.npy"):
        Recommender.from_run(run_dir, overrides={"popularity.weight": 0.1})
    counts = np.zeros(prepared.num_items)
    counts[:: 3] = np.arange(len(counts[:: 3])) * 10.0
    save_item_counts(run_dir, counts)
    try:
        popular = Recommender.from_run(run_dir, overrides={"popularity.weight": 0.1})
        user_id = str(prepared.users["user_id"].iloc[2])
        known = _known_items(prepared, 2)
        scores = (recommender.items @ recommender.user_vector(known)).numpy() + 0.1 * np.log1p(counts)
        scores[known] = -np.inf
        expected = np.argsort(-scores, kind="stable")[:5]
        found = popular.for_user(user_id, k=5)
        assert [r.item_id for r in found] == prepared.items["item_id"].iloc[expected].tolist()
        np.testing.assert_allclose([r.score for r in found], scores[expected], atol=1e-5)
        assert [r.item_id for r in found] != [r.item_id for r in recommender.for_user(user_id, k=5)]
    finally:
        (run_dir / "item-counts.npy").unlink()



def test_transition_prior_is_added_to_the_served_scores(run_dir, recommender, reference):
    _, prepared, _, _ = reference
    settings = {"transitions.weight": 0.2, "transitions.last-items": 5}
    with pytest.raises(RunDirectoryError, match="item-transitions.npz"):
        Recommender.from_run(run_dir, overrides=settings)
    counts = local_transitions(prepared.all_train_items, prepared.num_items, 4)
    save_transitions(run_dir, counts, 4)
    try:
        served = Recommender.from_run(run_dir, overrides=settings)
        user_id = str(prepared.users["user_id"].iloc[2])
        known = _known_items(prepared, 2)
        prior = transition_prior(counts, TransitionConfig(weight=0.2, last_items=5))([known])[0].numpy()
        scores = (recommender.items @ recommender.user_vector(known)).numpy() + prior
        scores[known] = -np.inf
        expected = np.argsort(-scores, kind="stable")[:5]
        found = served.for_user(user_id, k=5)
        assert [r.item_id for r in found] == prepared.items["item_id"].iloc[expected].tolist()
        np.testing.assert_allclose([r.score for r in found], scores[expected], atol=1e-5)
        assert [r.item_id for r in found] != [r.item_id for r in recommender.for_user(user_id, k=5)]
        # a new user given by item ids gets the prior of that history
        ids = prepared.items["item_id"].iloc[known[-3:]].astype(str).tolist()
        history = np.asarray(known[-3:])
        new_scores = (recommender.items @ recommender.user_vector(history)).numpy()
        new_scores += transition_prior(counts, TransitionConfig(weight=0.2, last_items=5))([history])[0].numpy()
        new_scores[history] = -np.inf
        assert [r.item_id for r in served.for_history(ids, k=3)] == prepared.items["item_id"].iloc[
            np.argsort(-new_scores, kind="stable")[:3]
        ].tolist()
    finally:
        (run_dir / "item-transitions.npz").unlink()

def test_only_evaluation_settings_change_after_training(run_dir):
    with pytest.raises(ConfigError, match=r"'lora.r'.*cannot change after training"):
        Recommender.from_run(run_dir, overrides={"lora.r": 8, "personal.enabled": True})


def test_fedrec_evaluate_scores_a_checkpoint_again_and_writes_json(run_dir, reference, tmp_path):
    config, prepared, model, table = reference
    out = tmp_path / "personal.json"
    args = ["evaluate", "--model", str(run_dir), "--split", "valid", "--out", str(out)]
    assert main([*args, "--run-config", "personal.enabled=true personal.steps=30 personal.recent-items=2"]) == 0
    written = json.loads(out.read_text())
    assert written["round"] == 3 and written["split"] == "valid" and written["overrides"]["personal.enabled"] is True
    settings = load_config({**to_run_config(config), **PERSONAL}).personal
    histories = histories_for(prepared, "valid")
    scorer = model_scorer(model, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu"), settings)
    expected = evaluate_scorer(scorer, prepared, "valid", config.eval.k, beyond=True)
    for name in ("hr@10", "ndcg@10", "hr@10_full", "coverage@10"):
        assert written["metrics"][name] == pytest.approx(expected[name], abs=1e-6), name
    assert main(["evaluate", "--model", str(run_dir), "--run-config", "train.lr=1"]) == 2


def test_fedrec_evaluate_round_zero_is_the_pretrained_model(run_dir, reference, tmp_path):
    """--round 0 ranks with no adapters: the base model, not the newest checkpoint."""
    config, prepared, round3_model, table = reference
    out = tmp_path / "round0.json"
    assert main(["evaluate", "--model", str(run_dir), "--round", "0", "--split", "valid", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["round"] == 0
    base = build_recommender(config.model, config.lora)
    histories = histories_for(prepared, "valid")
    scorer = model_scorer(base, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu"))
    expected = evaluate_scorer(scorer, prepared, "valid", config.eval.k, beyond=True)
    for name in ("hr@10", "ndcg@10", "hr@10_full", "coverage@10"):
        assert written["metrics"][name] == pytest.approx(expected[name], abs=1e-6), name
    round3 = model_scorer(round3_model, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu"))
    trained = evaluate_scorer(round3, prepared, "valid", config.eval.k, beyond=True)
    assert any(trained[name] != written["metrics"][name] for name in ("ndcg@10", "ndcg@10_full", "mrr_full"))


def test_fedrec_evaluate_averages_the_checkpoints_of_several_rounds(run_dir, reference, capsys):
    """--average-rounds 1,3 scores the element-wise mean of both rounds' adapters."""
    config, prepared, round3_model, table = reference
    assert main(["evaluate", "--model", str(run_dir), "--average-rounds", "1,3", "--split", "valid"]) == 0
    out = run_dir / "evaluations" / "round-0003-mean-of-0001-0003-valid.json"
    assert str(out) in capsys.readouterr().out
    written = json.loads(out.read_text())
    assert written["round"] == 3 and written["averaged_rounds"] == [1, 3]
    round1 = adapter_state(_trained_adapters(build_recommender(config.model, config.lora), seed=1).encoder)
    round3 = adapter_state(round3_model.encoder)
    mean = build_recommender(config.model, config.lora)
    load_adapter_state(mean.encoder, {k: (round1[k] + round3[k]) / 2 for k in round3})
    histories = histories_for(prepared, "valid")
    expected = evaluate_scorer(
        model_scorer(mean, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu")),
        prepared, "valid", config.eval.k, beyond=True,
    )
    for name in ("hr@10", "ndcg@10", "hr@10_full", "ndcg@10_full", "mrr_full"):
        assert written["metrics"][name] == pytest.approx(expected[name], abs=1e-6), name
    last = evaluate_scorer(
        model_scorer(round3_model, table, histories, config.model.history_items, config.model.max_user_tokens, torch.device("cpu")),
        prepared, "valid", config.eval.k, beyond=True,
    )
    assert any(last[name] != written["metrics"][name] for name in ("ndcg@10", "ndcg@10_full", "mrr_full"))
    assert main(["evaluate", "--model", str(run_dir), "--average-rounds", "1,2"]) == 2
    assert "round 2" in capsys.readouterr().err
    assert main(["evaluate", "--model", str(run_dir), "--round", "3", "--average-rounds", "1,3"]) == 2
    assert main(["evaluate", "--model", str(run_dir), "--average-rounds", "3,3"]) == 2


def test_run_directory_errors_name_the_folder(tmp_path, run_dir):
    with pytest.raises(RunDirectoryError, match="no metrics.json"):
        Recommender.from_run(tmp_path)
    with pytest.raises(RunDirectoryError, match="round 2"):
        Recommender.from_run(run_dir, server_round=2)


def _request(url, body=None):
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    request = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_endpoint_in_a_real_process(run_dir, recommender):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        [sys.executable, "-m", "fedrec.cli", "serve", "--model", str(run_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        line = server.stdout.readline()
        assert line.startswith("serving"), line
        base = line.split()[4]
        assert _request(f"{base}/health") == (
            200,
            {
                "status": "ok",
                "items": 40,
                "round": 3,
                "averaged_rounds": [],
                "quantization": "none",
                "local_adapters": "",
                "new_items": 0,
            },
        )

        user_id = str(recommender.trained.prepared.users["user_id"].iloc[0])
        status, body = _request(f"{base}/users/{user_id}/recommendations?k=3")
        assert status == 200
        assert body["recommendations"] == [r.to_json() for r in recommender.for_user(user_id, 3)]

        status, body = _request(f"{base}/recommendations", {"items": ["i2", "i4"], "texts": ["Film 6"], "k": 2})
        assert status == 200 and len(body["recommendations"]) == 2
        assert not {"i2", "i4"} & {r["item_id"] for r in body["recommendations"]}

        assert _request(f"{base}/users/nobody/recommendations")[0] == 404
        status, body = _request(f"{base}/recommendations", {"items": ["i999"]})
        assert status == 422 and "i999" in body["error"]
        assert _request(f"{base}/recommendations", {"items": []})[0] == 422
        assert _request(f"{base}/users/{user_id}/recommendations?k=zero")[0] == 400
        assert _request(f"{base}/recommendations", b"{not json")[0] == 400
        assert _request(f"{base}/recommendations", {"items": "i2"})[0] == 400
        assert _request(f"{base}/nowhere")[0] == 404
        assert server.poll() is None, "a bad request must not stop the server"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_fedrec_evaluate_reports_the_headline_figures_at_eval_k(run_dir, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--model", str(run_dir), "--round", "0", "--run-config", "eval.k=3"]) == 0
    printed = capsys.readouterr().out
    assert "hr@3 " in printed and "ndcg@3_full " in printed and "hr@10" not in printed
