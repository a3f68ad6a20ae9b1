"""LoRA adapters (PEFT): the only weights that are trained and cross the wire."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from transformers import PreTrainedModel

from fedrec.config import LoraSettings
from fedrec.model.item_identity import MODULE_NAME as ITEM_IDENTITY
from fedrec.model.sequence_tower import MODULE_NAME as SEQUENCE_TOWER


class AdapterStateError(ValueError):
    """An adapter state dict does not match the model's adapters."""


WHOLE_MODULES = (ITEM_IDENTITY, SEQUENCE_TOWER)
"""Encoder attributes trained, sent and averaged whole beside the LoRA adapters (PEFT
``modules_to_save``), when the model has them: item identities, the sequence tower."""
LORA = "lora"
"""The part every other trainable parameter (the adapters' matrices) belongs to."""


def trained_part(parameter_name: str) -> str:
    """Which part of the model a trainable parameter belongs to: one of
    :data:`WHOLE_MODULES` (item identities, sequence tower), else :data:`LORA`."""
    return next((module for module in WHOLE_MODULES if module in parameter_name), LORA)


KEEPS_B_LOCAL = "fedrec_keeps_b_local"
"""Attribute set on a PEFT model whose lora_B matrices stay on the client (FedSA-LoRA)."""


def lora_config(settings: LoraSettings, modules_to_save: list[str] | None = None) -> LoraConfig:
    """The PEFT ``LoraConfig`` for fedrec's settings (plus whole modules trained beside them)."""
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_module_list,
        layers_to_transform=settings.layer_list,
        bias="none",
        modules_to_save=modules_to_save,
    )


def add_lora(encoder: PreTrainedModel, settings: LoraSettings) -> PeftModel:
    """Wrap the encoder with LoRA adapters; every base weight is frozen.

    The adapters are initialised from a fixed seed so that all parties start from
    the same global adapter. With ``settings.freeze_a`` (FFA-LoRA, Sun et al. 2024)
    only the ``lora_B`` matrices are trainable: every party keeps the same seeded
    ``lora_A``, so averaging the B matrices averages the products B·A exactly.
    With ``settings.local_b`` (FedSA-LoRA) both are trained but only ``lora_A``
    travels: :func:`adapter_state` leaves ``lora_B`` out and
    :func:`local_adapter_state` holds it.

    An item-identity table (``model.item-ids``) or a sequence tower
    (``model.sequence-layers``) on the encoder becomes a PEFT ``modules_to_save``
    module: trained, saved and exchanged with the adapters.
    """
    extra = [name for name in WHOLE_MODULES if hasattr(encoder, name)] or None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = get_peft_model(encoder, lora_config(settings, extra))
    trainable = "lora_B" if settings.freeze_a else "lora_"
    for name, param in model.named_parameters():
        param.requires_grad = trainable in name or "modules_to_save" in name
    setattr(model, KEEPS_B_LOCAL, settings.local_b)
    return model


def _keeps_b_local(model: PeftModel) -> bool:
    return bool(getattr(model, KEEPS_B_LOCAL, False))


def _a_is_frozen(model: PeftModel) -> bool:
    return not any(p.requires_grad for n, p in model.named_parameters() if "lora_A" in n)


def adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The trainable adapter weights, detached on CPU, keyed as PEFT saves them.

    Under FFA-LoRA (frozen ``lora_A``) only the ``lora_B`` weights, under FedSA-LoRA
    (``lora.local-b``) everything but them: what travels.
    """
    state = get_peft_model_state_dict(model)
    if _a_is_frozen(model):
        state = {k: v for k, v in state.items() if "lora_A" not in k}
    if _keeps_b_local(model):
        state = {k: v for k, v in state.items() if "lora_B" not in k}
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())


def local_adapter_state(model: PeftModel) -> OrderedDict[str, torch.Tensor]:
    """The adapter weights that stay on the client: FedSA-LoRA's ``lora_B``
    (empty when every adapter is shared)."""
    if not _keeps_b_local(model):
        return OrderedDict()
    state = _kept_on_client(get_peft_model_state_dict(model))
    return OrderedDict((k, v.detach().cpu().clone()) for k, v in state.items())


def _kept_on_client(state: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    return OrderedDict((k, v) for k, v in state.items() if "lora_B" in k)


def load_local_adapter_state(model: PeftModel, state: dict[str, torch.Tensor] | None) -> None:
    """Set the client's own ``lora_B`` (FedSA-LoRA) from what it kept after its last round;
    None: PEFT's initial zeros, as on its first round. Always called, because one model
    object serves many clients in turn. A no-op when every adapter is shared."""
    if not _keeps_b_local(model):
        if state:
            raise AdapterStateError("local adapters given, but this model shares every adapter (lora.local-b=false)")
        return
    current = get_peft_model_state_dict(model)
    expected = _kept_on_client(current)
    if state is None:
        state = {k: torch.zeros_like(v) for k, v in expected.items()}
    check_adapter_state(expected, state)
    # PEFT loads modules_to_save (the item-identity table) from the same dict, so the
    # rest of the adapters go in unchanged beside the client's lora_B
    set_peft_model_state_dict(model, {**current, **state})


def check_adapter_state(
    expected: OrderedDict[str, torch.Tensor], received: dict[str, torch.Tensor]
) -> None:
    """Raise :class:`AdapterStateError` unless keys, shapes and values are sane."""
    missing = sorted(set(expected) - set(received))
    extra = sorted(set(received) - set(expected))
    if missing or extra:
        raise AdapterStateError(
            f"adapter keys differ: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    for key, tensor in received.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise AdapterStateError(
                f"adapter '{key}' has shape {tuple(tensor.shape)}, "
                f"expected {tuple(expected[key].shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterStateError(f"adapter '{key}' holds NaN or Inf")


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Set the model's adapters from a state dict, after checking it matches."""
    check_adapter_state(adapter_state(model), state)
    set_peft_model_state_dict(model, state)


def save_adapter(model: PeftModel, folder: Path) -> None:
    """Save the adapters in PEFT's ``save_pretrained`` format."""
    model.save_pretrained(str(folder))


def load_saved_adapter(model: PeftModel, folder: Path) -> None:
    """Load adapters written by :func:`save_adapter` into ``model``."""
    load_saved_adapter_mean(model, [folder])


def load_saved_adapter_mean(model: PeftModel, folders: Sequence[Path]) -> None:
    """Load the element-wise mean of adapters written by :func:`save_adapter`.

    With the global adapters of a run's last rounds this is tail (Polyak)
    averaging of the global model; one folder loads that checkpoint as saved.
    """
    from safetensors.torch import load_file

    if not folders:
        raise ValueError("no adapter folders to load")
    wanted = adapter_state(model)  # under FFA-LoRA lora_A is fixed and not loaded
    total: dict[str, torch.Tensor] = {}
    for folder in folders:
        weights = Path(folder) / "adapter_model.safetensors"
        if not weights.exists():
            raise FileNotFoundError(f"no adapter weights at {weights}")
        saved = load_file(str(weights))
        check_adapter_state(wanted, {k: v for k, v in saved.items() if k in wanted})
        for key in wanted:
            total[key] = total[key] + saved[key] if key in total else saved[key].clone()
    load_adapter_state(model, {k: v / len(folders) for k, v in total.items()})


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes of the tensors in a state dict."""
    return sum(t.numel() * t.element_size() for t in state.values())
