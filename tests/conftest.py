"""Shared fixtures: a tiny random BERT recommender and a token table of a toy catalogue."""

import os

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrec import records
from fedrec.config import LoraSettings, ModelConfig
from fedrec.model.build import build_recommender
from fedrec.model.encoder import load_tokenizer
from fedrec.tokens import build_token_table

# Every simulation the tests start (in this process or in `flwr run` children) gets a
# private Ray instance, whatever cluster a leftover /tmp/ray/ray_current_cluster names.
os.environ.setdefault("RAY_ADDRESS", "local")

TINY = ModelConfig(name="tiny-random", max_item_tokens=12, max_user_tokens=24, history_items=5)
LORA = LoraSettings(r=4, alpha=8)

TITLES = [f"Movie {chr(65 + i)} ({1990 + i})" for i in range(12)]
TEXTS = [f"{t}. Genres: {'Comedy' if i % 2 else 'Drama'}" for i, t in enumerate(TITLES)]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(TINY.name)


@pytest.fixture(scope="session")
def table(tokenizer):
    return build_token_table(tokenizer, TEXTS, TITLES, TINY.max_item_tokens)


@pytest.fixture()
def recommender():
    return build_recommender(TINY, LORA)


@pytest.fixture()
def sequences():
    return [np.array([0, 1, 2, 3, 4, 5]), np.array([6, 7, 8, 9]), np.array([1, 3, 5, 7, 9])]


def write_toy_dataset(folder, num_users=24, num_items=40, seed=0):
    """A small CSV dataset with item text: (interactions.csv, items.csv)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        taste = rng.integers(0, 2)
        pool = np.arange(taste, num_items, 2)  # users prefer odd or even items
        items = rng.choice(pool, size=int(rng.integers(6, 12)), replace=False)
        for t, item in enumerate(items):
            rows.append((f"u{user}", f"i{item}", float(rng.integers(1, 6)), 1_000_000 + 100 * t))
    interactions = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    genres = ["Comedy", "Drama"]
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(num_items)],
            "title": [f"Film {i}" for i in range(num_items)],
            "text": [f"Film {i}. Genres: {genres[i % 2]}" for i in range(num_items)],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    interactions.to_csv(folder / "interactions.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return folder / "interactions.csv", folder / "items.csv"


def toy_run_config(folder, **overrides):
    """Run-config overrides that point fedrec at the toy dataset with a tiny model."""
    inter, items = write_toy_dataset(folder / "data")
    config = {
        "data.name": "csv",
        "data.path": str(inter),
        "data.items-path": str(items),
        "data.cache-dir": str(folder / "cache"),
        "eval.num-negatives": 9,
        "model.name": "tiny-random",
        "model.max-item-tokens": 12,
        "model.max-user-tokens": 24,
        "train.batch-size": 8,
        "train.max-steps": 2,
        "lora.r": 4,
        "out-dir": str(folder / "out"),
    }
    config.update(overrides)
    return config


@pytest.fixture()
def task_identity(monkeypatch):
    """Flower stamps messages with the running task's ids; set them as a ServerApp would."""
    for name, value in (("_run_id", 7), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture()
def toy_prepared(tmp_path):
    """(config, prepared data) of the toy dataset with the tiny model, cached under tmp_path."""
    from fedrec.config import load_config
    from fedrec.prepare import prepare

    config = load_config(toy_run_config(tmp_path))
    return config, prepare(config.data, config.eval)


def toy_server(folder, **overrides):
    """(config, prepared data, token table, server's GlobalModel) of the toy dataset with
    the tiny model and these run-config overrides."""
    from fedrec.config import load_config
    from fedrec.global_model import GlobalModel
    from fedrec.model.build import token_table
    from fedrec.prepare import prepare

    config = load_config(toy_run_config(folder, **overrides))
    prepared = prepare(config.data, config.eval)
    return config, prepared, token_table(prepared, config.model), GlobalModel(config, prepared)


def client_round_evaluated_by_server(config, prepared, table, server, start):
    """Partition 0's first round on the adapters ``start``; the server then takes its
    upload (its own validation accepts it) and evaluates it. Returns the round's output."""
    from fedrec.client_data import load_client_data
    from fedrec.local_round import run_local_round

    out = run_local_round(config, load_client_data(config, prepared, 0, 24), table, start, server_round=1)
    server.set_adapters(out.adapters)
    metrics = server.evaluate("test")
    assert 0.0 <= metrics["hr@10"] <= 1.0 and metrics["num_users"] == 24
    return out


class InProcessGrid:
    """A Grid whose nodes are the ClientApp's query handlers (popularity counts,
    transition counts) called in this process."""

    def __init__(self, run_config, num_nodes):
        self.contexts = {
            node: Context(
                run_id=7,
                node_id=node,
                node_config={"partition-id": node, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run_config,
            )
            for node in range(num_nodes)
        }
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        from clients.client_app import query, transitions

        replies = []
        for message in messages:
            self.sent.append(message.metadata.message_type)
            handler = transitions if message.metadata.message_type.endswith(records.TRANSITIONS_ACTION) else query
            replies.append(handler(message, self.contexts[message.metadata.dst_node_id]))
        return replies
