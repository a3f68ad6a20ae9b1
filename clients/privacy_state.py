"""Where a client keeps its privacy accountant between rounds.

Within a run, Flower keeps each node's ``context.state`` across rounds; the
accountant's history lives there. It is also written to a file after every
private round (atomically), and read back when the in-memory state is empty:

* on a deployed device (``client-data=device``, or any node with a ``state-dir``),
  in the folder its node config names (``flower-supernode --node-config
  "state-dir='/var/lib/fedrec'"``, default ``~/.local/state/fedrec``): the history
  survives restarts and later runs, so epsilon keeps accumulating over everything
  the device ever trained;
* otherwise (simulation), in ``<out-dir>/client-state/``, read back only when the
  run is resumed (``resume=true``), so a resumed run continues each client's
  epsilon instead of restarting it, and a fresh run starts from zero.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.deploy.device_data import STATE_DIR, device_state_dir
from fedrec.privacy.accounting import AccountantState


def _state_file(context: Context, config: FedRecConfig, partition_id: int) -> tuple[Path, bool]:
    """The state file, and whether to read it when the in-memory state is empty."""
    name = f"dp-accountant-{partition_id}.json"
    if context.node_config.get(STATE_DIR) or config.federation.client_data == "device":
        return device_state_dir(context.node_config) / name, True
    out_dir = Path(config.federation.out_dir).expanduser()
    return out_dir / "client-state" / name, config.federation.resume


def load_accountant(context: Context, config: FedRecConfig, partition_id: int) -> AccountantState:
    """The client's accountant so far (an empty one before its first private round)."""
    if records.DP_STATE in context.state.config_records:
        return AccountantState.from_config_record(context.state.config_records[records.DP_STATE])
    path, read = _state_file(context, config, partition_id)
    if read and path.exists():
        return AccountantState.load(path)
    return AccountantState(config.dp.accountant)


def save_accountant(
    context: Context, config: FedRecConfig, partition_id: int, state: AccountantState
) -> None:
    """Keep ``state`` for the next round, in memory and on disk."""
    context.state[records.DP_STATE] = state.to_config_record()
    path, _ = _state_file(context, config, partition_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    state.save(path)
