"""Per-round metrics as CSV and TensorBoard event files."""

import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedrec.results import RunRecord
from fedrec.tracking import TENSORBOARD_DIR, TensorBoardLog, write_rounds_csv

ROUNDS = [
    {"round": 1, "hr@10": 0.25, "train_loss": 1.5, "client_epsilons": {"3": 1.0}},
    {"round": 2, "hr@10": 0.5, "train_loss": 1.25, "epsilon_max": 2.0},
]


def test_csv_has_one_row_per_round_and_every_scalar(tmp_path):
    path = write_rounds_csv(ROUNDS, tmp_path)
    table = pd.read_csv(path)
    assert list(table.columns) == ["round", "epsilon_max", "hr@10", "train_loss"]
    assert table["round"].tolist() == [1, 2] and table["hr@10"].tolist() == [0.25, 0.5]
    assert pd.isna(table["epsilon_max"][0]) and table["epsilon_max"][1] == 2.0


def test_run_record_writes_the_csv_beside_metrics_json(tmp_path):
    record = RunRecord(settings={})
    for values in ROUNDS:
        record.add_round(values)
        record.write(tmp_path)
    assert pd.read_csv(tmp_path / "metrics.csv")["train_loss"].tolist() == [1.5, 1.25]


def test_tensorboard_events_hold_each_rounds_scalars(tmp_path):
    log = TensorBoardLog(tmp_path)
    for values in ROUNDS:
        log.log_round(values)
    log.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"hr_at_10", "train_loss", "epsilon_max"}
    assert [(e.step, e.value) for e in events.Scalars("hr_at_10")] == [(1, 0.25), (2, 0.5)]
