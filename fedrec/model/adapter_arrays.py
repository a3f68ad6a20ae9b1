"""Adapters as a list of NumPy arrays in a named order (Flower's legacy ``Parameters``).

Flower's legacy workflows, which SecAgg+ needs, carry unnamed arrays; the names
travel beside them, so both ends agree on which array is which adapter.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch

KEY_SEPARATOR = ","  # PEFT adapter names never contain one


def adapter_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The fixed order in which adapters travel as arrays: sorted by name."""
    return sorted(state)


def join_keys(keys: Sequence[str]) -> str:
    """Adapter names as one config string (legacy configs hold only scalars)."""
    return KEY_SEPARATOR.join(keys)


def split_keys(text: str) -> list[str]:
    return text.split(KEY_SEPARATOR) if text else []


def to_ndarrays(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> list[np.ndarray]:
    """The adapters named by ``keys``, in that order, as NumPy arrays."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise KeyError(f"adapter state lacks {missing[:3]} ({len(missing)} of {len(keys)} names)")
    return [state[k].detach().cpu().numpy() for k in keys]


def from_ndarrays(
    keys: Sequence[str],
    arrays: Sequence[np.ndarray],
    dtypes: Mapping[str, torch.dtype] | None = None,
) -> OrderedDict[str, torch.Tensor]:
    """An adapter state dict from arrays in the order of ``keys`` (cast to ``dtypes`` if given)."""
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} arrays for {len(keys)} adapter names")
    state = OrderedDict()
    for key, array in zip(keys, arrays):
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        state[key] = tensor.to(dtypes[key]) if dtypes is not None else tensor
    return state
