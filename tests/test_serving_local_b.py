"""Serving a FedSA-LoRA (``lora.local-b``) run on a device with the lora_B it kept."""

import json

import pytest
import torch

from fedrec.checkpoint import save_checkpoint
from fedrec.cli import main
from fedrec.config import load_config, to_run_config
from fedrec.evaluation import encode_items
from fedrec.model.adapters import (
    adapter_state,
    load_adapter_state,
    load_local_adapter_state,
    local_adapter_state,
)
from fedrec.model.build import build_recommender, token_table
from fedrec.prepare import prepare
from fedrec.results import RunRecord
from fedrec.serving import Recommender, RunDirectoryError
from fedrec.serving.index import index_path
from tests.conftest import toy_run_config

CPU = torch.device("cpu")


def _moved(state, seed):
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.5 * torch.randn(v.shape, generator=generator) for k, v in state.items()}


@pytest.fixture(scope="module")
def fedsa_run(tmp_path_factory):
    """A lora.local-b run folder (shared adapters only, as the server saves them), one
    device's kept lora_B file, and the unmerged model that device trains with."""
    folder = tmp_path_factory.mktemp("fedsa-serving")
    config = load_config(toy_run_config(folder, **{"lora.local-b": True, "fraction-evaluate": 1.0}))
    prepared = prepare(config.data, config.eval)
    model = build_recommender(config.model, config.lora)
    load_adapter_state(model.encoder, _moved(adapter_state(model.encoder), seed=1))
    out = folder / "out"
    save_checkpoint(model.encoder, out, 2)
    RunRecord(settings=to_run_config(config)).write(out)
    own_b = _moved(local_adapter_state(model.encoder), seed=2)
    load_local_adapter_state(model.encoder, own_b)
    path = folder / "local-adapters-0.pt"
    torch.save(own_b, path)
    return out, path, model, token_table(prepared, config.model)


def test_the_device_ranks_with_its_own_lora_b_merged_and_indexed_apart(fedsa_run):
    out, path, model, table = fedsa_run
    shared = Recommender.from_run(out)  # first: its index must not be reused below
    own = Recommender.from_run(out, local_adapters=path)
    torch.testing.assert_close(own.items, encode_items(model, table, CPU), atol=1e-5, rtol=1e-4)
    assert (own.items - shared.items).abs().max() > 1e-2  # lora_B = 0 ranks otherwise
    assert index_path(own.trained) != index_path(shared.trained)
    assert own.trained.local_adapters and not shared.trained.local_adapters


def test_fedrec_recommend_takes_the_local_adapters(fedsa_run, capsys):
    out, path, _, _ = fedsa_run
    own = Recommender.from_run(out, local_adapters=path)
    user = next(iter(own.user_index_of))
    capsys.readouterr()
    assert main(["recommend", "--model", str(out), "--user", user, "--k", "3", "--local-adapters", str(path), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == [r.to_json() for r in own.for_user(user, 3)]
    assert printed != [r.to_json() for r in Recommender.from_run(out).for_user(user, 3)]  # scores differ


def test_a_wrong_local_adapters_file_is_named(fedsa_run, tmp_path):
    out, path, _, _ = fedsa_run
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(RunDirectoryError, match="garbage.pt"):
        Recommender.from_run(out, local_adapters=garbage)
    wrong = tmp_path / "wrong-shape.pt"
    torch.save({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in torch.load(path).items()}, wrong)
    with pytest.raises(RunDirectoryError, match="wrong-shape.pt"):
        Recommender.from_run(out, local_adapters=wrong)
    plain = tmp_path / "plain"
    config = load_config(toy_run_config(tmp_path))
    model = build_recommender(config.model, config.lora)
    save_checkpoint(model.encoder, plain, 1)
    RunRecord(settings=to_run_config(config)).write(plain)
    with pytest.raises(RunDirectoryError, match="without lora.local-b"):
        Recommender.from_run(plain, local_adapters=path)
