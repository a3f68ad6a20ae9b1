"""ClientApp mods: clip the update for user-level DP when asked; shrink it for the wire.

Flower's client-side DP wrappers (``user-dp.mode`` client-fixed, client-adaptive;
see server/user_dp.py) put a clipping norm in every train message's config and
expect the client to clip its update (``reply - received``) to it, which
Flower's ``fixedclipping_mod`` / ``adaptiveclipping_mod`` do. Those mods fail a
message without the clipping norm, and the ClientApp's mods are fixed when it
is built, while a run may have user-level DP off or clipped on the server.
:func:`user_dp_clipping_mod` therefore applies Flower's mod only to train
messages that carry the clipping norm, and passes every other message through.

Put it last among the train mods (nearest the train function), so that it clips
the update before any other mod (SecAgg+ masking, say) changes it::

    @app.train(mods=[user_dp_clipping_mod])
    def train(msg, context): ...
"""

from __future__ import annotations

from collections.abc import Mapping

from flwr.app import ArrayRecord, Context, Message, MessageType
from flwr.clientapp.mod import adaptiveclipping_mod, fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from fedrec import records
from fedrec.config import RunConfigValue, load_config
from fedrec.model.wire import encode_update


def asks_for_clipping(msg: Message) -> bool:
    """Whether ``msg`` is a train message with the clipping norm of a client-side DP wrapper."""
    is_train = msg.metadata.message_type.split(".")[0] == MessageType.TRAIN
    return is_train and any(
        KEY_CLIPPING_NORM in config for config in msg.content.config_records.values()
    )


def user_dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's clipping mod for ``user-dp.mode`` when the server sent a clipping norm.

    client-adaptive uses ``adaptiveclipping_mod`` (it also reports whether the
    update was clipped); any other mode ``fixedclipping_mod``.
    """
    if not asks_for_clipping(msg):
        return call_next(msg, context)
    if load_config(context.run_config).user_dp.mode == "client-adaptive":
        return adaptiveclipping_mod(msg, context, call_next)
    return fixedclipping_mod(msg, context, call_next)


def wire_encoding_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Send the update as ``wire-dtype`` (float16/int8) instead of float32 adapters.

    Put it first among the train mods (outermost), so that it encodes what the
    others (user-level DP clipping) produced. Error replies pass unchanged.
    """
    reply = call_next(msg, context)
    wire_dtype = load_config(context.run_config).federation.wire_dtype
    if wire_dtype == "float32" or reply.has_error() or records.ARRAYS not in reply.content:
        return reply
    payload = ArrayRecord(
        encode_update(
            reply.content[records.ARRAYS].to_torch_state_dict(),
            msg.content[records.ARRAYS].to_torch_state_dict(),
            wire_dtype,
        )
    )
    reply.content[records.ARRAYS] = payload
    if records.METRICS in reply.content:
        reply.content[records.METRICS][records.BYTES_UP] = payload.count_bytes()
    return reply


def run_config_mod(run_config: Mapping[str, RunConfigValue]) -> Mod:
    """A mod that hands the handler ``run_config`` (Flower's ``run_simulation`` has none).

    The handler gets a copy of its Context that shares the node's state (Flower
    forbids changing the run config in place). For in-process harnesses: tests
    and benchmarks; ``flwr run`` supplies the run config itself.
    """

    def with_run_config(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        configured = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config=context.node_config,
            state=context.state,
            run_config=dict(run_config),
        )
        return call_next(msg, configured)

    return with_run_config
