"""FedSA-LoRA (``lora.local-b``): the client's own lora_B, kept in its node state between rounds.

It never leaves the client: the train reply carries only what
:func:`fedrec.model.adapters.adapter_state` selects. The node state lives as long
as the run on its SuperNode (or simulated node); a restarted device starts again
from lora_B = 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, Context

from fedrec import records


def load_local_adapters(context: Context) -> dict[str, torch.Tensor] | None:
    """What this client kept after its last round, or None before its first."""
    if records.LOCAL_ADAPTERS not in context.state.array_records:
        return None
    return context.state.array_records[records.LOCAL_ADAPTERS].to_torch_state_dict()


def save_local_adapters(context: Context, adapters: Mapping[str, torch.Tensor]) -> None:
    """Keep ``adapters`` for this client's next round (nothing when there are none)."""
    if adapters:
        context.state[records.LOCAL_ADAPTERS] = ArrayRecord(dict(adapters))
