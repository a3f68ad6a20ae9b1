"""What fedrec's ClientApp needs to take part in secure aggregation (SecAgg+).

Two mods, applied to the train handler in this order (``SECAGG_MODS``):

* :func:`secagg_mod` runs Flower's ``secaggplus_mod`` on messages of the SecAgg+
  workflow (those carrying its ``secaggplus_configs`` record) and passes every
  other message through untouched. (Flower's mod on its own fails on a plain
  train message, so it cannot be left on when secagg is off.) Three of the four
  SecAgg+ stages are answered by the mod alone; in the stage that collects the
  masked vectors it calls the train handler, then quantizes and masks its reply.
* :func:`legacy_fit_mod` lets the unchanged train handler serve Flower's legacy
  "fit" layout, which the SecAgg+ workflow speaks: it turns ``fitins.parameters``
  plus the adapter names of the fit config into the handler's ``arrays`` and
  ``config`` records, and the handler's reply into ``fitres.*`` records.

So local training runs through the same handler and ``run_local_round`` with
secagg on or off.
"""

from __future__ import annotations

import logging
from functools import partial

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import (
    Code,
    FitRes,
    NDArrays,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
)
from flwr.compat.common import recorddict_compat as compat

from fedrec import records
from fedrec.model.adapter_arrays import from_ndarrays, split_keys, to_ndarrays

log = logging.getLogger("fedrec.client.secagg")


def is_legacy_fit(msg: Message) -> bool:
    """Whether a message carries legacy fit instructions (``fitins.*``)."""
    return msg.has_content() and records.LEGACY_FIT_ARRAYS in msg.content.array_records


def legacy_fit_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Serve a legacy fit message with the message-API train handler ``call_next``."""
    if not is_legacy_fit(msg):
        return call_next(msg, context)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    config = dict(fitins.config)
    if records.ADAPTER_KEYS not in config:
        raise ValueError(
            f"legacy fit instructions without '{records.ADAPTER_KEYS}' in their config: "
            "the server must name the adapters (run server.secure_aggregation.SecAggFedRec)"
        )
    keys = split_keys(str(config.pop(records.ADAPTER_KEYS)))
    adapters = from_ndarrays(keys, parameters_to_ndarrays(fitins.parameters))
    incoming = msg.content
    msg.content = RecordDict(
        {records.ARRAYS: ArrayRecord(adapters), records.CONFIG: ConfigRecord(config)}
    )
    try:
        reply = call_next(msg, context)
    finally:
        msg.content = incoming
    if reply.has_error():
        return reply
    metrics = dict(reply.content[records.METRICS])
    trained = reply.content[records.ARRAYS].to_torch_state_dict()
    fitres = FitRes(
        status=Status(code=Code.OK, message="Success"),
        parameters=ndarrays_to_parameters(to_ndarrays(trained, keys)),
        num_examples=metrics.pop(records.NUM_EXAMPLES),  # a float under DP-SGD
        metrics=metrics,
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


class _ErrorReply(Exception):
    """The train handler replied with an error: hand it to the server as it is."""

    def __init__(self, reply: Message) -> None:
        super().__init__(reply.error.reason)
        self.reply = reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; any other message passes through.

    An error reply of the train handler (a DP-SGD client whose budget is spent,
    say) reaches the server with its own code, and the client drops out of the
    round.
    """
    if not msg.has_content() or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    try:
        return secaggplus_mod(msg, context, partial(_fit_and_check, call_next))
    except _ErrorReply as error:
        return error.reply


def _fit_and_check(call_next: ClientAppCallable, msg: Message, context: Context) -> Message:
    """Train, then check the reply before SecAgg+ quantizes and masks it.

    The server cannot inspect a masked update, so a non-finite one is refused
    here (the client drops out of the round instead of corrupting the sum), and
    values that quantization will clip are reported.
    """
    reply = call_next(msg, context)
    if reply.has_error():
        raise _ErrorReply(reply)
    state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitres.parameters)
    if not all(np.isfinite(a).all() for a in arrays):
        raise ValueError(
            "the trained adapters hold NaN or Inf; not sending them to secure aggregation "
            "(this client drops out of the round)"
        )
    warn_if_clipped(arrays, fitres.num_examples, state)
    return reply


def warn_if_clipped(arrays: NDArrays, num_examples: int, state: SecAggPlusState) -> bool:
    """Log (and return True) when SecAgg+ will clip this client's weighted adapters.

    SecAgg+ multiplies the adapters by num_examples / max_weight, then clips them
    to +-clipping_range before quantizing: clipped values bias the aggregate.
    """
    ratio = num_examples / state.max_weight
    largest = max((float(abs(a).max()) for a in arrays if a.size), default=0.0)
    clipped = largest * ratio > state.clipping_range
    if ratio > 1:
        log.warning(
            "num-examples=%d exceeds secagg.max-weight=%s; raise secagg.max-weight",
            num_examples,
            state.max_weight,
        )
    if clipped:
        log.warning(
            "adapter values up to %.3g (x weight %.3g) exceed secagg.clipping-range=%s and are "
            "clipped before quantization, biasing the aggregate; raise secagg.clipping-range",
            largest,
            ratio,
            state.clipping_range,
        )
    return clipped


# The train handler's mods, outermost first: ``@app.train(mods=SECAGG_MODS)``.
SECAGG_MODS = [secagg_mod, legacy_fit_mod]
