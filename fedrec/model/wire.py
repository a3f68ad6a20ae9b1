"""Adapter updates on the wire in fewer bits: float16 or int8 deltas, restored before averaging.

With ``wire-dtype=float32`` (the default) a client sends its trained adapters as
they are. With ``float16`` or ``int8`` it sends the *update* (trained minus the
adapters it received) in that type, and the server adds it back to the global
adapters it sent before validating and averaging, so FedAvg always works in
float32. An update is some 100x smaller than the weights, so encoding the update
rather than the weights keeps the relative rounding error of fp16 (2^-11) and
int8 (1/254 of the tensor's largest change) on the change itself.

int8 is symmetric per tensor: ``q = round(delta / s)``, ``s = max|delta| / 127``;
``s`` travels beside ``q`` as a one-element float32 array named ``<key>#scale``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from fedrec.model.adapters import AdapterStateError

WIRE_DTYPES = ("float32", "float16", "int8")
SCALE_SUFFIX = "#scale"
INT8_LEVELS = 127


def encode_update(
    trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor], wire_dtype: str
) -> OrderedDict[str, torch.Tensor]:
    """What a client sends for ``trained`` adapters, given the ``received`` global ones."""
    if wire_dtype == "float32":
        return OrderedDict(trained)
    payload: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in trained.items():
        delta = value.float() - received[key].float()
        if wire_dtype == "float16":
            payload[key] = delta.half()
            continue
        scale = float(delta.abs().max()) / INT8_LEVELS or 1.0
        payload[key] = torch.round(delta / scale).clamp(-INT8_LEVELS, INT8_LEVELS).to(torch.int8)
        payload[key + SCALE_SUFFIX] = torch.tensor([scale], dtype=torch.float32)
    return payload


def decode_update(
    payload: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor], wire_dtype: str
) -> OrderedDict[str, torch.Tensor]:
    """The client's adapters in float32, from its payload and the global adapters it got.

    Raises AdapterStateError when the payload is not a ``wire_dtype`` encoding of
    these adapters (missing or extra keys, wrong dtype, a bad scale).
    """
    if wire_dtype == "float32":
        return OrderedDict(payload)
    expected = {torch.float16: "float16", torch.int8: "int8"}
    keys = [k for k in payload if not k.endswith(SCALE_SUFFIX)]
    if sorted(keys) != sorted(global_state):
        missing = sorted(set(global_state) - set(keys))
        extra = sorted(set(keys) - set(global_state))
        raise AdapterStateError(f"{wire_dtype} update: missing {missing[:3]}, unexpected {extra[:3]}")
    decoded: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, base in global_state.items():
        value = payload[key]
        if expected.get(value.dtype) != wire_dtype:
            raise AdapterStateError(f"'{key}' arrived as {value.dtype}, expected {wire_dtype}")
        if value.shape != base.shape:
            raise AdapterStateError(f"'{key}' has shape {tuple(value.shape)}, expected {tuple(base.shape)}")
        delta = value.float()
        if wire_dtype == "int8":
            scale = payload.get(key + SCALE_SUFFIX)
            if scale is None or scale.numel() != 1 or not torch.isfinite(scale).all() or scale.item() <= 0:
                raise AdapterStateError(f"'{key}': int8 update without a valid '{key}{SCALE_SUFFIX}'")
            delta = delta * scale.float()
        decoded[key] = base.float() + delta
    return decoded
