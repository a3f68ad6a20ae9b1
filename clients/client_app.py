"""fedrec's Flower ClientApp: train the received LoRA adapters on local interactions."""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.local_adapters import load_local_adapters, save_local_adapters
from clients.mods import user_dp_clipping_mod, wire_encoding_mod
from clients.privacy_state import load_accountant, save_accountant
from clients.secure_aggregation import SECAGG_MODS
from fedrec import records
from fedrec.client_data import ClientData, load_client_data
from fedrec.config import FedRecConfig, load_config
from fedrec.deploy.device_data import (
    ITEMS_PATH,
    DeviceDataError,
    check_catalogue,
    device_partition_id,
    device_state_dir,
    device_token_table,
    load_device_data,
)
from fedrec.deploy.device_state import save_last_round
from fedrec.item_counts import account_release, local_item_counts, noised
from fedrec.item_transitions import local_transitions
from fedrec.local_round import evaluate_local, run_local_round
from fedrec.model.build import token_table
from fedrec.prepare import prepare
from fedrec.privacy.budget import BudgetExhausted
from fedrec.tokens import TokenTable

log = logging.getLogger("fedrec.client")

app = ClientApp()


def _partition_id(config: FedRecConfig, node_config: dict) -> int:
    """This node's partition id: a simulated node's ``partition-id``, a device's
    :func:`device_partition_id` (the id in its seeds, state files and replies)."""
    if config.federation.client_data == "device":
        return device_partition_id(node_config)
    return int(node_config["partition-id"])


def _training_inputs(config: FedRecConfig, msg: Message, context: Context) -> tuple[ClientData, TokenTable]:
    """This client's sequences and the catalogue's tokens.

    Simulation: its partition of the run's prepared dataset. Deployed device
    (``client-data=device``): its own files, checked against the server's catalogue.
    """
    node_config = context.node_config
    if config.federation.client_data == "device":
        device = load_device_data(config, node_config)
        check_catalogue(
            device.catalogue,
            msg.content[records.CONFIG].get(records.CATALOGUE_DIGEST),
            str(node_config[ITEMS_PATH]),
        )
        table = device_token_table(device.catalogue, config, device_state_dir(node_config))
        return device.client, table
    prepared = prepare(config.data, config.eval)
    data = load_client_data(
        config, prepared, _partition_id(config, node_config), int(node_config["num-partitions"])
    )
    return data, token_table(prepared, config.model)


@app.train(mods=[wire_encoding_mod, *SECAGG_MODS, user_dp_clipping_mod])
def train(msg: Message, context: Context) -> Message:
    """Set the global adapters, train locally, reply with adapters and metrics.

    With ``proximal-mu`` in the round's config (Flower's ``FedProx``, or
    ``federation.proximal-mu`` with another server optimizer) the local loss
    carries FedProx's proximal term. Under DP-SGD the client's accountant
    continues from its earlier rounds, and a
    client whose budget this round would exceed replies with an error
    (code ``records.BUDGET_EXHAUSTED``) instead of training. A device whose data
    cannot be trained on replies with ``records.DEVICE_DATA_INVALID`` and the reason.
    """
    config = load_config(context.run_config)
    try:
        data, table = _training_inputs(config, msg, context)
    except DeviceDataError as err:
        log.error("cannot train on this device's data: %s", err)
        return Message(Error(code=records.DEVICE_DATA_INVALID, reason=str(err)), reply_to=msg)
    partition_id = data.partition_id
    server_round = int(msg.content[records.CONFIG][records.SERVER_ROUND])
    proximal_mu = float(msg.content[records.CONFIG].get(records.PROXIMAL_MU, 0.0))
    accountant = (
        load_accountant(context, config, partition_id) if config.dp.enabled else None
    )
    try:
        output = run_local_round(
            config,
            data,
            table,
            msg.content[records.ARRAYS].to_torch_state_dict(),
            server_round,
            accountant,
            proximal_mu,
            load_local_adapters(context, config, partition_id),
        )
    except BudgetExhausted as refusal:
        log.warning("partition %d: %s", partition_id, refusal)
        return Message(Error(code=records.BUDGET_EXHAUSTED, reason=str(refusal)), reply_to=msg)
    if config.federation.client_data == "device":
        save_last_round(
            device_state_dir(context.node_config), output.adapters, server_round, context.run_id
        )
    save_local_adapters(context, config, partition_id, output.local_adapters)
    arrays = ArrayRecord(output.adapters)
    metrics = {
        records.NUM_EXAMPLES: output.result.examples,
        records.TRAIN_LOSS: output.result.loss,
        records.TRAIN_STEPS: output.result.steps,
        records.BYTES_UP: arrays.count_bytes(),
        records.PARTITION_ID: partition_id,
    }
    if output.privacy is not None:
        save_accountant(context, config, partition_id, output.privacy.state)
        # Only what DP covers leaves the device: the loss and the realised Poisson
        # batch sizes are functions of the examples, so the loss is withheld and the
        # weight is the expected number of examples (n is treated as public).
        privacy = output.privacy
        del metrics[records.TRAIN_LOSS]
        metrics[records.NUM_EXAMPLES] = privacy.steps * privacy.sample_rate * output.num_examples
        metrics[records.EPSILON] = output.privacy.epsilon
        metrics[records.DELTA] = output.privacy.delta
        metrics[records.NOISE_MULTIPLIER] = output.privacy.noise_multiplier
    content = RecordDict({records.ARRAYS: arrays, records.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Rank this client's held-out items with the global adapters (and, under
    ``lora.local-b``, the lora_B it kept from its last round); reply with metrics."""
    config = load_config(context.run_config)
    if config.federation.client_data == "device":
        reason = "on-device evaluation is not implemented; the server evaluates (fraction-evaluate=0)"
        return Message(Error(code=records.DEVICE_DATA_INVALID, reason=reason), reply_to=msg)
    prepared = prepare(config.data, config.eval)
    partition_id = _partition_id(config, context.node_config)
    data = load_client_data(config, prepared, partition_id, int(context.node_config["num-partitions"]))
    sent = msg.content[records.CONFIG].get(records.ITEM_COUNTS) if records.CONFIG in msg.content else None
    metrics = evaluate_local(
        config,
        prepared,
        data,
        msg.content[records.ARRAYS].to_torch_state_dict(),
        None if sent is None else np.asarray(sent, dtype=np.float64),
        load_local_adapters(context, config, partition_id),
    )
    metrics[records.NUM_EXAMPLES] = len(data.users)
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this client's item counts, noised on the device (``popularity.*``).

    Under DP the release enters the client's accountant before anything leaves
    (:func:`fedrec.item_counts.release_entry`); a client whose budget it would
    exceed replies with ``records.BUDGET_EXHAUSTED`` instead.
    """
    config = load_config(context.run_config)
    try:
        data, table = _training_inputs(config, msg, context)
    except DeviceDataError as err:
        log.error("cannot count this device's items: %s", err)
        return Message(Error(code=records.DEVICE_DATA_INVALID, reason=str(err)), reply_to=msg)
    counts = local_item_counts(data.sequences, len(table.item_ids))
    metrics: dict[str, float] = {records.PARTITION_ID: data.partition_id}
    if config.dp.enabled:
        state = load_accountant(context, config, data.partition_id)
        try:  # the counts' sum is the number of training examples
            state, metrics[records.EPSILON], metrics[records.DELTA] = account_release(
                state, config, int(counts.sum())
            )
        except BudgetExhausted as refusal:
            log.warning("partition %d: %s", data.partition_id, refusal)
            return Message(Error(code=records.BUDGET_EXHAUSTED, reason=str(refusal)), reply_to=msg)
        save_accountant(context, config, data.partition_id, state)
    reply = noised(counts, config.popularity.noise)
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord({records.ITEM_COUNTS: torch.from_numpy(reply)}),
            records.METRICS: MetricRecord(metrics),
        }
    )
    return Message(content, reply_to=msg)



@app.query(records.TRANSITIONS_ACTION)
def transitions(msg: Message, context: Context) -> Message:
    """Reply with this client's exact item-to-item transition counts (``transitions.*``).

    Not private (:mod:`fedrec.item_transitions`): settings that combine the prior with
    ``dp.enabled``, user-level DP or SecAgg+ do not load, and a client whose settings
    have it off (``transitions.weight`` 0) refuses.
    """
    config = load_config(context.run_config)
    if not config.transitions.enabled:
        return Message(
            Error(code=records.TRANSITIONS_REFUSED, reason="transitions.weight is 0 in this client's settings"),
            reply_to=msg,
        )
    try:
        data, table = _training_inputs(config, msg, context)
    except DeviceDataError as err:
        log.error("cannot count this device's transitions: %s", err)
        return Message(Error(code=records.DEVICE_DATA_INVALID, reason=str(err)), reply_to=msg)
    counts = local_transitions(data.sequences, len(table.item_ids), config.transitions.window)
    content = RecordDict(
        {
            records.ARRAYS: ArrayRecord(
                {
                    records.TRANSITION_ROWS: torch.from_numpy(counts.row.astype(np.int64)),
                    records.TRANSITION_COLS: torch.from_numpy(counts.col.astype(np.int64)),
                    records.TRANSITION_COUNTS: torch.from_numpy(counts.data.astype(np.float64)),
                }
            ),
            records.METRICS: MetricRecord({records.PARTITION_ID: data.partition_id}),
        }
    )
    return Message(content, reply_to=msg)

@app.query(records.IDENTIFY_ACTION)
def identify(msg: Message, context: Context) -> Message:
    """Reply with this node's partition id: the key the server's seeded sampling
    orders nodes by (:mod:`server.sampling`), stable across runs where node ids are not.

    A simulated node's ``partition-id``; a device's :func:`device_partition_id`, the
    id it already reports with every update. Reads no data.
    """
    partition_id = _partition_id(load_config(context.run_config), context.node_config)
    return Message(
        RecordDict({records.METRICS: MetricRecord({records.PARTITION_ID: partition_id})}), reply_to=msg
    )
