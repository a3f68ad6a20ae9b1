"""fedrec's Flower ClientApp: train the received LoRA adapters on local interactions."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedrec import records
from fedrec.client_data import load_client_data
from fedrec.config import load_config
from fedrec.local_round import evaluate_local, run_local_round
from fedrec.model.build import token_table
from fedrec.prepare import prepare

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Set the global adapters, train locally, reply with adapters and metrics."""
    config = load_config(context.run_config)
    prepared = prepare(config.data, config.eval)
    data = load_client_data(
        config,
        prepared,
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
    )
    output = run_local_round(
        config,
        data,
        token_table(prepared, config.model),
        msg.content[records.ARRAYS].to_torch_state_dict(),
        int(msg.content[records.CONFIG][records.SERVER_ROUND]),
    )
    arrays = ArrayRecord(output.adapters)
    metrics = MetricRecord(
        {
            records.NUM_EXAMPLES: output.result.examples,
            records.TRAIN_LOSS: output.result.loss,
            records.TRAIN_STEPS: output.result.steps,
            records.BYTES_UP: arrays.count_bytes(),
        }
    )
    return Message(RecordDict({records.ARRAYS: arrays, records.METRICS: metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Rank this client's held-out items with the global adapters; reply with metrics."""
    config = load_config(context.run_config)
    prepared = prepare(config.data, config.eval)
    data = load_client_data(
        config,
        prepared,
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
    )
    metrics = evaluate_local(
        config, prepared, data, msg.content[records.ARRAYS].to_torch_state_dict()
    )
    metrics[records.NUM_EXAMPLES] = len(data.users)
    return Message(RecordDict({records.METRICS: MetricRecord(metrics)}), reply_to=msg)
