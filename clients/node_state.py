"""Where a client keeps what it must remember between rounds (accountant, own lora_B).

Within a run, Flower keeps each node's ``context.state`` across rounds; that is
read first. Each piece is also written to a file after every round (atomically),
and read back when the in-memory state is empty:

* on a deployed device (``client-data=device``, or any node with a ``state-dir``),
  in the folder its node config names (``flower-supernode --node-config
  "state-dir='/var/lib/fedrec'"``, default ``~/.local/state/fedrec``): it
  survives restarts and later runs;
* otherwise (simulation), in ``<out-dir>/client-state/``, read back only when the
  run is resumed (``resume=true``), so a resumed run continues where each client
  was, and a fresh run starts afresh.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from fedrec.config import FedRecConfig
from fedrec.deploy.device_data import STATE_DIR, device_state_dir


def state_file(context: Context, config: FedRecConfig, name: str) -> tuple[Path, bool]:
    """The file ``name`` of this node's state, and whether to read it when the
    in-memory state is empty."""
    if context.node_config.get(STATE_DIR) or config.federation.client_data == "device":
        return device_state_dir(context.node_config) / name, True
    out_dir = Path(config.federation.out_dir).expanduser()
    return out_dir / "client-state" / name, config.federation.resume
