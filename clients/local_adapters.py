"""FedSA-LoRA (``lora.local-b``): the client's own lora_B, kept between rounds.

It never leaves the client: the train reply carries only what
:func:`fedrec.model.adapters.adapter_state` selects. It is kept in the node's
``context.state`` and in a file (:mod:`clients.node_state`), so a restarted
device, or a resumed simulation, continues from its own lora_B instead of zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Context

from clients.node_state import state_file
from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.deploy.device_state import atomic_write


def _file_name(partition_id: int) -> str:
    return f"local-adapters-{partition_id}.pt"


def load_local_adapters(
    context: Context, config: FedRecConfig, partition_id: int
) -> dict[str, torch.Tensor] | None:
    """What this client kept after its last round, or None before its first."""
    if records.LOCAL_ADAPTERS in context.state.array_records:
        return context.state.array_records[records.LOCAL_ADAPTERS].to_torch_state_dict()
    path, read = state_file(context, config, _file_name(partition_id))
    if read and path.exists():
        return torch.load(path, weights_only=True)
    return None


def save_local_adapters(
    context: Context, config: FedRecConfig, partition_id: int, adapters: Mapping[str, torch.Tensor]
) -> None:
    """Keep ``adapters`` for this client's next round, in memory and on disk (nothing
    when there are none)."""
    if not adapters:
        return
    context.state[records.LOCAL_ADAPTERS] = ArrayRecord(dict(adapters))
    path, _ = state_file(context, config, _file_name(partition_id))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(dict(adapters), tmp))
