"""Updates on the wire as float16/int8 deltas: small, restored closely, malformed ones refused."""

from collections import OrderedDict

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from clients.mods import wire_encoding_mod
from fedrec import records
from fedrec.config import ConfigError, load_config
from fedrec.model.adapters import AdapterStateError
from fedrec.model.wire import SCALE_SUFFIX, decode_update, encode_update
from tests.privacy.test_user_level import (  # noqa: F401  (server_identity: autouse fixture)
    FakeGrid,
    make_strategy,
    server_identity,
)


def _states(seed=0, width=384):
    """Adapters of one LoRA r=8 layer of a ``width``-wide encoder (MiniLM: 384)."""
    g = torch.Generator().manual_seed(seed)
    received = OrderedDict(
        [
            ("a.lora_A.weight", torch.randn(8, width, generator=g)),
            ("a.lora_B.weight", torch.randn(width, 8, generator=g) * 0.01),
        ]
    )
    trained = OrderedDict((k, v + 1e-3 * torch.randn(v.shape, generator=g)) for k, v in received.items())
    return received, trained


@pytest.mark.parametrize(("wire_dtype", "bound"), [("float16", 2**-11), ("int8", 0.5 / 127)])
def test_restored_update_is_within_the_rounding_bound(wire_dtype, bound):
    received, trained = _states()
    restored = decode_update(encode_update(trained, received, wire_dtype), received, wire_dtype)
    for key in received:
        delta = trained[key] - received[key]
        error = (restored[key] - trained[key]).abs().max()
        assert error <= bound * delta.abs().max() * 1.01 + 1e-7
        assert error > 0  # it did round: the encoding is real
        assert restored[key].dtype == torch.float32


def test_bytes_shrink_two_and_four_fold():
    received, trained = _states()
    sizes = {
        dtype: ArrayRecord(encode_update(trained, received, dtype)).count_bytes()
        for dtype in ("float32", "float16", "int8")
    }
    assert sizes["float16"] < 0.55 * sizes["float32"]
    assert sizes["int8"] < 0.30 * sizes["float32"]


def test_malformed_payloads_are_refused():
    received, trained = _states()
    payload = encode_update(trained, received, "int8")
    del payload["a.lora_A.weight" + SCALE_SUFFIX]
    with pytest.raises(AdapterStateError, match="without a valid"):
        decode_update(payload, received, "int8")
    with pytest.raises(AdapterStateError, match="expected float16"):
        decode_update(encode_update(trained, received, "int8"), received, "float16")
    with pytest.raises(AdapterStateError, match="missing"):
        decode_update({"a.lora_A.weight": trained["a.lora_A.weight"].half()}, received, "float16")


def test_client_mod_encodes_and_server_averages_restored_adapters():
    received, trained = _states()
    msg = Message(
        RecordDict({records.ARRAYS: ArrayRecord(received), records.CONFIG: ConfigRecord({})}),
        dst_node_id=1,
        message_type="train",
    )

    def train(message, context):
        metrics = MetricRecord({records.NUM_EXAMPLES: 10, records.BYTES_UP: 0})
        return Message(RecordDict({records.ARRAYS: ArrayRecord(trained), records.METRICS: metrics}), reply_to=message)

    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={"wire-dtype": "int8"})
    reply = wire_encoding_mod(msg, context, train)
    sent = reply.content[records.ARRAYS]
    assert {t.dtype for k, t in sent.to_torch_state_dict().items() if not k.endswith(SCALE_SUFFIX)} == {torch.int8}
    assert reply.content[records.METRICS][records.BYTES_UP] == sent.count_bytes()

    strategy = make_strategy(wire_dtype="int8")
    (instruction,) = strategy.configure_train(1, ArrayRecord(received), ConfigRecord(), FakeGrid(1))
    reply_to_server = Message(reply.content, reply_to=instruction)
    arrays, _ = strategy.aggregate_train(1, [reply_to_server])
    for key, value in arrays.to_torch_state_dict().items():
        torch.testing.assert_close(value, trained[key], atol=1e-4, rtol=0)
    assert strategy.last_round[records.BYTES_UP_PER_CLIENT] == sent.count_bytes()


def test_wire_dtype_refuses_secagg_and_server_side_clipping():
    with pytest.raises(ConfigError, match="wire-dtype"):
        load_config({"wire-dtype": "int8", "secagg.enabled": True})
    with pytest.raises(ConfigError, match="wire-dtype"):
        load_config({"wire-dtype": "float16", "user-dp.mode": "server-fixed"})
    load_config({"wire-dtype": "int8", "user-dp.mode": "client-fixed"})
    with pytest.raises(ConfigError, match="wire-dtype"):
        load_config({"wire-dtype": "bfloat16"})
