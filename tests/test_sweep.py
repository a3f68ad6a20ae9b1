"""The privacy-budget sweep: grid, user-level noise planning, outputs, resuming."""

import csv
import json
import math

import pytest

from fedrec import records
from fedrec.cli import main
from fedrec.config import ConfigError, load_config, to_run_config
from fedrec.privacy.config import UserLevelDPConfig
from fedrec.privacy.user_level import user_level_epsilon
from simulations.runner import SimulationError, resolve_settings
from simulations.sweep import (
    COLUMNS,
    NO_DP,
    Cell,
    Grid,
    Sampling,
    SweepError,
    SweepFailed,
    cell_overrides,
    expand_grid,
    parse_grid,
    plot_utility,
    run_sweep,
    user_noise_multiplier,
)
from tests.conftest import toy_run_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------- grid


def test_parse_grid_sorts_dedups_and_reads_inf():
    grid = parse_grid("8, 1,inf,4,1", "record,user", "lora,ffa", "0,1")
    assert grid.epsilons == (1.0, 4.0, 8.0, math.inf)
    assert grid.modes == ("record", "user") and grid.schemes == ("lora", "ffa") and grid.seeds == (0, 1)


@pytest.mark.parametrize(
    "args, named",
    [
        (("1,abc", "record", "lora", "0"), "--epsilons: 'abc'"),
        (("0,1", "record", "lora", "0"), "--epsilons: 0 must be > 0"),
        ((" , ", "record", "lora", "0"), "--epsilons: empty"),
        (("1", "record,item", "lora", "0"), "--modes: item not one of record, user"),
        (("1", "record", "dora", "0"), "--schemes: dora"),
        (("1", "record", "lora", "0,x"), "--seeds"),
    ],
)
def test_bad_arguments_name_the_argument(args, named):
    with pytest.raises(SweepError, match=named):
        parse_grid(*args)


def test_grid_runs_no_dp_once_per_scheme_and_seed_shared_by_modes():
    cells = expand_grid(Grid((1.0, 4.0, math.inf), ("record", "user"), ("lora", "ffa"), (0, 1)))
    # per seed and scheme: 2 finite epsilons x 2 modes + 1 no-DP cell
    assert len(cells) == 2 * 2 * (2 * 2 + 1)
    assert len({c.id for c in cells}) == len(cells)
    no_dp = [c for c in cells if c.mode == NO_DP]
    assert {(c.scheme, c.seed) for c in no_dp} == {("lora", 0), ("lora", 1), ("ffa", 0), ("ffa", 1)}
    assert all(math.isinf(c.epsilon) for c in no_dp) and len(no_dp) == 4
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # whole seeds first
    assert Cell("record", "ffa", 1, 0.5).id == "record-eps0.5-ffa-seed1"
    assert Cell(NO_DP, "lora", 0, math.inf).id == "nodp-lora-seed0"


def test_cell_overrides_switch_dp_mode_and_scheme():
    record = cell_overrides(Cell("record", "lora", 3, 4.0), "server-fixed", None)
    assert record == {"seed": 3, "lora.freeze-a": False, "dp.enabled": True, "user-dp.mode": "off",
                      "dp.target-epsilon": 4.0}
    user = cell_overrides(Cell("user", "ffa", 0, 4.0), "client-fixed", 1.7)
    assert user == {"seed": 0, "lora.freeze-a": True, "dp.enabled": False, "user-dp.mode": "client-fixed",
                    "user-dp.noise-multiplier": 1.7}
    none = cell_overrides(Cell(NO_DP, "lora", 0, math.inf), "server-fixed", None)
    assert none["dp.enabled"] is False and none["user-dp.mode"] == "off"


@pytest.mark.parametrize("mode", ["server-fixed", "server-adaptive"])
def test_user_noise_multiplier_is_the_smallest_meeting_the_target(mode):
    sampling = Sampling(num_clients=200, per_round=50, rounds=5)
    config = UserLevelDPConfig(mode=mode)
    z = user_noise_multiplier(4.0, config, sampling)

    def eps(multiplier):
        changed = UserLevelDPConfig(mode, multiplier, config.clipping_norm, config.delta)
        return user_level_epsilon(changed, sampling.sample_rate, sampling.rounds, sampling.num_clients)[0]

    assert eps(z) <= 4.0 < eps(0.99 * z)


# ---------------------------------------------------------------- a sweep


class FakeSimulate:
    """Writes a metrics.json as the ServerApp would, counting the runs per cell."""

    def __init__(self, fail=()):
        self.calls = []
        self.fail = set(fail)

    def __call__(self, preset, overrides, out_dir, stream=True):
        self.calls.append(out_dir.name)
        if out_dir.name in self.fail:
            self.fail.discard(out_dir.name)
            raise SimulationError(f"{out_dir.name} crashed")
        config, _ = resolve_settings(preset, overrides, out_dir)
        rounds = []
        for r in range(1, config.federation.num_server_rounds + 1):
            values = {records.ROUND: r, "hr@10": 0.1 * r + 0.01 * config.federation.seed,
                      "ndcg@10": 0.05 * r, "hr@10_full": 0.02, "ndcg@10_full": 0.01, records.SECONDS: 1.5}
            if config.dp.enabled:
                values[records.EPSILON_MAX_RUN] = config.dp.target_epsilon * r / 2
            if config.user_dp.enabled:
                values[records.USER_EPSILON] = 0.9 * r
                values[records.USER_DELTA] = 0.005
            rounds.append(values)
        results = {"settings": to_run_config(config), "baselines": {"pretrained": {"hr@10": 0.05, "ndcg@10": 0.02}},
                   "rounds": rounds}
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(results))
        return results


@pytest.fixture()
def base(tmp_path):
    overrides = toy_run_config(tmp_path)
    del overrides["out-dir"]  # each cell has its own
    return overrides


def read_csv(path):
    with path.open() as file:
        return list(csv.DictReader(file))


def test_sweep_writes_table_and_plot_and_resumes(tmp_path, base):
    grid = Grid((2.0, math.inf), ("record", "user"), ("lora",), (0, 1))
    fake = FakeSimulate()
    out = tmp_path / "sweep"
    rows = run_sweep("smoke", out, grid, base, simulate_fn=fake)

    assert len(fake.calls) == 6 and len(rows) == 6  # 2 seeds x (record, user, no DP)
    table = read_csv(out / "sweep.csv")
    assert list(table[0]) == list(COLUMNS)
    by_cell = {r["cell"]: r for r in table}
    nodp = by_cell["nodp-lora-seed1"]
    assert nodp["target_epsilon"] == "inf" and nodp["epsilon"] == "inf" and nodp["mode"] == NO_DP
    record = by_cell["record-eps2-lora-seed0"]
    assert float(record["epsilon"]) == 2.0  # the last round's epsilon_max_run
    assert record["delta"] == "" and record["noise_multiplier"] == ""  # delta 1/(10 n) per client
    assert float(record["hr@10"]) == pytest.approx(0.2) and record["rounds"] == "2"
    user = by_cell["user-eps2-lora-seed1"]
    assert float(user["epsilon"]) == pytest.approx(1.8) and float(user["delta"]) == 0.005
    assert float(user["noise_multiplier"]) > 0
    assert float(user["hr@10"]) == pytest.approx(0.21)
    assert (out / "cells" / "user-eps2-lora-seed1" / "metrics.json").exists()
    strict = json.loads((out / "sweep.json").read_text(), parse_constant=pytest.fail)
    assert {c["cell"]: c["target_epsilon"] for c in strict["cells"]}["nodp-lora-seed0"] is None
    assert (out / "utility_vs_epsilon.png").read_bytes()[:8] == PNG_MAGIC

    again = run_sweep("smoke", out, grid, base, simulate_fn=fake)
    assert len(fake.calls) == 6  # nothing ran again
    assert [r["cell"] for r in again] == [r["cell"] for r in rows]
    assert again[0]["wall_seconds"] == rows[0]["wall_seconds"]

    partial = out / "cells" / "record-eps2-lora-seed1" / "metrics.json"
    results = json.loads(partial.read_text())
    results["rounds"] = results["rounds"][:1]  # a run that stopped after round 1
    partial.write_text(json.dumps(results))
    run_sweep("smoke", out, grid, base, simulate_fn=fake)
    assert fake.calls[6:] == ["record-eps2-lora-seed1"]


def test_changed_settings_rerun_the_cells(tmp_path, base):
    grid = Grid((math.inf,), ("record",), ("lora",), (0,))
    fake = FakeSimulate()
    run_sweep("smoke", tmp_path / "s", grid, base, simulate_fn=fake)
    run_sweep("smoke", tmp_path / "s", grid, {**base, "train.lr": 0.01}, simulate_fn=fake)
    assert fake.calls == ["nodp-lora-seed0"] * 2


def test_a_crashed_cell_fails_the_sweep_after_the_others_and_reruns_alone(tmp_path, base):
    grid = Grid((1.0, 4.0, math.inf), ("record",), ("lora", "ffa"), (0,))
    fake = FakeSimulate(fail={"record-eps4-lora-seed0"})
    out = tmp_path / "sweep"
    with pytest.raises(SweepFailed, match="1 of 6 cells failed \\(record-eps4-lora-seed0\\)"):
        run_sweep("smoke", out, grid, base, simulate_fn=fake)
    assert len(read_csv(out / "sweep.csv")) == 5
    assert (out / "utility_vs_epsilon.png").exists()
    rows = run_sweep("smoke", out, grid, base, simulate_fn=fake)
    assert fake.calls[6:] == ["record-eps4-lora-seed0"] and len(rows) == 6


def test_settings_the_sweep_controls_are_refused_in_run_config(tmp_path, base):
    with pytest.raises(SweepError, match=r"--run-config: seed, dp\.target-epsilon"):
        run_sweep("smoke", tmp_path, Grid((1.0,), ("record",), ("lora",), (0,)),
                  {**base, "seed": 1, "dp.target-epsilon": 3.0}, simulate_fn=FakeSimulate())


def test_user_dp_mode_in_run_config_picks_the_user_level_variant(tmp_path, base):
    fake = FakeSimulate()
    run_sweep("smoke", tmp_path, Grid((8.0,), ("user",), ("lora",), (0,)),
              {**base, "user-dp.mode": "client-fixed"}, simulate_fn=fake)
    settings = json.loads((tmp_path / "cells" / "user-eps8-lora-seed0" / "metrics.json").read_text())["settings"]
    assert settings["user-dp.mode"] == "client-fixed" and settings["dp.enabled"] is False


def test_audit_runs_once_per_cell_and_fills_its_columns(tmp_path, base, monkeypatch):
    from fedrec.privacy import audit

    audited = []

    class Result:
        def __init__(self, out_dir):
            self.values = {"round": 2, "auc": 0.61, "auc_pretrained": 0.5, "auc_stderr": 0.04}
            (out_dir / audit.AUDIT_FILE).write_text(json.dumps(self.values))

        def to_json(self):
            return self.values

    def fake_audit(out_dir):
        audited.append(out_dir.name)
        return Result(out_dir)

    monkeypatch.setattr(audit, "audit_run", fake_audit)
    grid = Grid((4.0, math.inf), ("record",), ("lora",), (0,))
    out = tmp_path / "sweep"
    run_sweep("smoke", out, grid, base, audit=True, simulate_fn=FakeSimulate())
    assert audited == ["record-eps4-lora-seed0", "nodp-lora-seed0"]
    row = read_csv(out / "sweep.csv")[0]
    assert (row["audit_auc"], row["audit_auc_pretrained"], row["audit_auc_stderr"]) == ("0.61", "0.5", "0.04")
    rows = run_sweep("smoke", out, grid, base, audit=False, simulate_fn=FakeSimulate())
    assert len(audited) == 2 and rows[1]["audit_auc"] == 0.61  # an earlier audit is still reported


@pytest.mark.parametrize("epsilons", [(math.inf,), (1.0, 8.0)])
def test_plot_with_only_infinity_or_without_it(tmp_path, epsilons):
    rows = [
        {"cell": f"c{i}", "mode": NO_DP if math.isinf(e) else "record", "scheme": "lora", "seed": s,
         "target_epsilon": e, "hr@10": 0.1 + s / 100, "ndcg@10": 0.05}
        for i, (e, s) in enumerate((e, s) for e in epsilons for s in (0, 1))
    ]
    plot_utility(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC


def test_cli_reports_a_bad_argument(capsys):
    assert main(["sweep", "--epsilons", "1,lots"]) == 2
    assert "--epsilons: 'lots'" in capsys.readouterr().err


def test_the_popularity_prior_is_off_in_cells_unless_asked_for(tmp_path, base):
    """The default preset turns the prior on; a sweep of DP budgets turns it off
    (ε = 1 cannot afford the release), unless --run-config sets it."""
    fake = FakeSimulate()
    grid = Grid((1.0,), ("record",), ("lora",), (0,))
    run_sweep("default", tmp_path / "default", grid, base, simulate_fn=fake)
    run_sweep("default", tmp_path / "asked", grid, {**base, "popularity.weight": 0.1}, simulate_fn=fake)
    weight = {
        name: json.loads((tmp_path / name / "cells" / "record-eps1-lora-seed0" / "metrics.json").read_text())[
            "settings"
        ]["popularity.weight"]
        for name in ("default", "asked")
    }
    assert weight == {"default": 0.0, "asked": 0.1}
    assert resolve_settings("default", base, None)[0].popularity.weight == 0.05  # the preset's own
    with pytest.raises(ConfigError, match="popularity.weight.*user-level DP"):
        load_config({"popularity.weight": 0.05, "user-dp.mode": "server-fixed"})
