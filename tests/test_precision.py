"""Mixed precision (runtime.precision): bf16 autocast, float32 weights and ranking."""

import copy

import pytest
import torch

from fedrec.client_data import load_client_data
from fedrec.config import ConfigError, RuntimeConfig, load_config
from fedrec.examples import NextItemDataset, build_examples
from fedrec.global_model import GlobalModel
from fedrec.local_round import run_local_round
from fedrec.prepare import prepare
from fedrec.runtime import autocast_dtype
from fedrec.training import TrainConfig, make_loader, make_optimizer, train_local
from tests.conftest import toy_run_config

CPU = torch.device("cpu")


def test_precision_setting():
    assert autocast_dtype(RuntimeConfig(), CPU) is None  # auto: fp32 on CPU
    assert autocast_dtype(RuntimeConfig(precision="bf16"), CPU) is torch.bfloat16
    assert autocast_dtype(RuntimeConfig(precision="fp32"), torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="runtime.precision"):
        load_config({"runtime.precision": "fp16"})


def test_bf16_training_step_keeps_float32_weights_and_tracks_fp32(recommender, table, sequences):
    examples = build_examples(sequences, 5)
    train = TrainConfig(max_steps=1, batch_size=len(examples), lr=1e-2)
    results, grads = [], []
    for precision in (None, torch.bfloat16):
        model = copy.deepcopy(recommender)
        with torch.no_grad():  # non-zero lora_B, so that lora_A gets gradients too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.fill_(0.1)
        loader = make_loader(NextItemDataset(examples, table, 3, 24, seed=0), train.batch_size, seed=0)
        torch.manual_seed(0)  # the same dropout masks
        results.append(train_local(model, loader, make_optimizer(model, train), train, CPU, precision))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        assert all(p.dtype == torch.float32 for p in model.parameters())
    fp32, bf16 = results
    assert bf16.steps == 1 and bf16.loss == pytest.approx(fp32.loss, rel=0.05)
    assert bf16.loss != fp32.loss  # autocast really ran in bf16
    for name, grad in grads[0].items():
        assert grad.abs().max() > 0, name
        assert torch.nn.functional.cosine_similarity(grads[1][name].flatten(), grad.flatten(), dim=0) > 0.9, name


def test_private_bf16_round_and_evaluation(tmp_path):
    """DP-SGD (Opacus hooks) under bf16 autocast, and evaluation ranked in float32."""
    settings = toy_run_config(tmp_path, **{"runtime.precision": "bf16", "dp.enabled": True, "dp.noise-multiplier": 1.0})
    config = load_config(settings)
    prepared = prepare(config.data, config.eval)
    model = GlobalModel(config, prepared)
    data = load_client_data(config, prepared, 0, 24)
    out = run_local_round(config, data, model.table, model.adapters(), server_round=1)
    assert out.privacy is not None and out.privacy.epsilon > 0 and out.result.steps >= 1
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.adapters.values())
    bf16_metrics = model.evaluate()
    fp32 = GlobalModel(load_config({**settings, "runtime.precision": "fp32"}), prepared)
    fp32_metrics = fp32.evaluate()
    assert abs(bf16_metrics["hr@10"] - fp32_metrics["hr@10"]) <= 0.15  # 24 users: a few may flip
