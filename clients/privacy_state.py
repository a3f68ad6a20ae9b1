"""Where a client keeps its privacy accountant between rounds: ``context.state``
and a file (:mod:`clients.node_state`). On a device the history survives restarts
and later runs, so epsilon keeps accumulating over everything the device ever
trained; a resumed simulation continues each client's epsilon instead of
restarting it.
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context

from clients.node_state import state_file
from fedrec import records
from fedrec.config import FedRecConfig
from fedrec.privacy.accounting import AccountantState


def _state_file(context: Context, config: FedRecConfig, partition_id: int) -> tuple[Path, bool]:
    return state_file(context, config, f"dp-accountant-{partition_id}.json")


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
