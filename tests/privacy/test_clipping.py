"""``dp.clipping``: per-part clipping gives each trained part (LoRA, item identities,
sequence tower) its own share of the clipping norm, through Opacus' per-layer
clipping; the sensitivity of one example stays ``dp.max-grad-norm``."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from fedrec.config import TrainConfig, load_config
from fedrec.errors import ConfigError
from fedrec.model.adapters import trained_part
from fedrec.privacy.accounting import AccountantState
from fedrec.privacy.config import PrivacyConfig
from fedrec.privacy.dp_sgd import clipping_norms, detach_private, make_private
from fedrec.training import BATCH_KEYS, make_optimizer
from tests.privacy.test_per_sample_gradients import (
    inputs,
    per_example_gradients,
    prepare,
)
from tests.test_sequence_tower import (
    batch_with_vectors,
    tower_model,
    with_trained_output,
)

SIZE = 5
CLIP = 1.0


def clipped_by_hand(per_example: dict[str, torch.Tensor], clipping: str) -> dict[str, torch.Tensor]:
    """The mean over the examples of each example's gradient clipped as ``clipping`` says."""
    if clipping == "flat":
        total = sum(g.flatten(1).square().sum(1) for g in per_example.values()).sqrt()
        factor = {name: (CLIP / total).clamp(max=1.0) for name in per_example}
    else:
        parts = [trained_part(name) for name in per_example]
        share = {part: CLIP / math.sqrt(len(set(parts)) * parts.count(part)) for part in parts}
        factor = {
            name: (share[trained_part(name)] / g.flatten(1).norm(dim=1)).clamp(max=1.0)
            for name, g in per_example.items()
        }
    return {name: torch.einsum("i,i...->...", factor[name], g) / SIZE for name, g in per_example.items()}


def dp_sgd_gradients(model, batch, clipping: str) -> dict[str, torch.Tensor]:
    """The gradients Opacus hands the optimizer after clipping (no noise) for ``batch``."""
    model.train()
    optimizer = make_optimizer(model, TrainConfig())
    examples = [{k: batch[k][i] for k in BATCH_KEYS if k in batch} for i in range(SIZE)]
    config = PrivacyConfig(enabled=True, max_grad_norm=CLIP, clipping=clipping)
    wrapped, private_optimizer, _, _ = make_private(
        model, optimizer, DataLoader(examples, batch_size=SIZE), config, 0.0, AccountantState(), seed=0
    )
    logits = wrapped(*inputs(batch, BATCH_KEYS))
    nn.functional.cross_entropy(logits, torch.zeros(SIZE, dtype=torch.long)).backward()
    private_optimizer.pre_step()  # clip, accumulate, add (zero) noise, divide by the batch size
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    detach_private(wrapped)
    return grads


def part_norm(grads: dict[str, torch.Tensor], part: str) -> float:
    return math.sqrt(sum(float(g.square().sum()) for n, g in grads.items() if trained_part(n) == part))


@pytest.mark.parametrize("clipping", ["flat", "per-part"])
def test_opacus_clips_each_example_as_configured(table, sequences, clipping):
    model = with_trained_output(prepare(tower_model()))
    batch = batch_with_vectors(model, table, sequences, SIZE)
    model.train()
    expected = clipped_by_hand(per_example_gradients(model, batch, BATCH_KEYS), clipping)
    actual = dp_sgd_gradients(model, batch, clipping)
    assert set(actual) == set(expected) and {trained_part(n) for n in actual} == {"lora", "item_identity", "sequence_tower"}
    for name, want in expected.items():
        assert (actual[name] - want).abs().max() <= 1e-4 * want.abs().max() + 1e-9, name


def test_per_part_clipping_keeps_the_adapters_signal_that_the_tower_takes_under_flat(table, sequences):
    # an untrained tower (zero output projection), as every run starts: its output
    # projection's gradients are large, as measured on MovieLens (docs/results.md)
    model = prepare(tower_model())
    batch = batch_with_vectors(model, table, sequences, SIZE)
    flat = dp_sgd_gradients(model, batch, "flat")
    per_part = dp_sgd_gradients(model, batch, "per-part")
    assert part_norm(per_part, "lora") > 3 * part_norm(flat, "lora")
    assert part_norm(per_part, "sequence_tower") < part_norm(flat, "sequence_tower") / 3


def test_the_norms_sum_in_squares_to_the_clipping_norm():
    model = tower_model()
    optimizer = make_optimizer(model, TrainConfig())
    norms = clipping_norms(model, optimizer, PrivacyConfig(enabled=True, max_grad_norm=2.0, clipping="per-part"))
    tensors = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(norms) == len(tensors) and math.sqrt(sum(c * c for c in norms)) == pytest.approx(2.0)
    names = {id(p): n for n, p in model.named_parameters()}
    by_part: dict[str, float] = {}
    for p, c in zip(tensors, norms, strict=True):
        part = trained_part(names[id(p)])
        by_part[part] = by_part.get(part, 0.0) + c * c
    assert by_part == pytest.approx({"lora": 4 / 3, "item_identity": 4 / 3, "sequence_tower": 4 / 3})
    assert clipping_norms(model, optimizer, PrivacyConfig(enabled=True, max_grad_norm=2.0)) == 2.0


def test_an_unknown_clipping_is_refused_by_name():
    with pytest.raises(ConfigError, match="dp.clipping"):
        load_config({"dp.clipping": "per-layer"})
    assert load_config({"dp.clipping": "per-part"}).dp.clipping == "per-part"

