"""fedrec's ClientApp plus a mod that corrupts the update of nodes told to (node config ``fault``).

Used only by tests/deploy: a device that sends NaN adapters (``fault=nan``), an
absurdly large update (``fault=norm``) or adapters with a key missing
(``fault=keys``). Nodes without ``fault`` behave as fedrec's own ClientApp.
"""

from flwr.app import ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from clients import client_app as fedrec_client
from fedrec import records


def corrupt_update(msg: Message, context: Context, call_next) -> Message:
    reply = call_next(msg, context)
    fault = context.node_config.get("fault")
    if not fault or reply.has_error() or records.ARRAYS not in reply.content:
        return reply
    arrays = reply.content[records.ARRAYS].to_torch_state_dict()
    first = next(iter(arrays))
    if fault == "nan":
        arrays[first] = arrays[first].clone().fill_(float("nan"))
    elif fault == "norm":
        arrays = {k: v * 1e6 for k, v in arrays.items()}
    elif fault == "keys":
        del arrays[first]
    reply.content[records.ARRAYS] = ArrayRecord(arrays)
    return reply


app = ClientApp(mods=[corrupt_update])
app.train()(fedrec_client.train)
app.evaluate()(fedrec_client.evaluate)
