"""Privacy-budget sweep: utility (and optionally an empirical audit) against epsilon.

The grid is target epsilon x DP mode x adapter scheme x seed:

* ``record``: record-level DP-SGD on every client, ``dp.enabled=true
  dp.target-epsilon=EPS`` (each client plans its noise to spend EPS by the last round).
* ``user``: user-level DP-FedAvg, ``user-dp.mode`` (``server-fixed`` unless the
  base ``--run-config`` names another) with the noise multiplier that makes the
  user-level epsilon after the last round EPS, found from
  :func:`fedrec.privacy.user_level.user_level_epsilon` (the function that
  reports ``user_epsilon``) with the run's clients per round and rounds.
* ``inf``: no DP at all. Run once per scheme and seed and shared by both modes
  (drawn at the right end of every line of the plot).
* schemes: ``lora`` (``lora.freeze-a=false``) and ``ffa`` (FFA-LoRA, ``true``).

Each cell is one :func:`simulations.runner.simulate` run into
``OUT/cells/<cell-id>/`` (its Flower log in ``flwr.log`` there). After every cell
``OUT/sweep.csv`` and ``OUT/sweep.json`` are rewritten atomically, so a sweep
that stops can be run again with the same command: a cell whose metrics.json
has every round, with the same settings, is not run again; any other is rerun
from scratch. ``OUT/utility_vs_epsilon.png`` is drawn at the end.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrec import records
from fedrec.config import FedRecConfig, RunConfigValue, to_run_config
from fedrec.partition import resolve_num_partitions
from fedrec.prepare import prepare
from fedrec.privacy.config import UserLevelDPConfig
from fedrec.privacy.user_level import user_delta, user_level_epsilon
from fedrec.results import METRICS_FILE
from simulations.runner import SimulationError, resolve_settings, simulate

log = logging.getLogger("fedrec.simulations.sweep")

RECORD, USER, NO_DP = "record", "user", "none"
MODES = (RECORD, USER)
SCHEMES = {"lora": False, "ffa": True}  # scheme -> lora.freeze-a
DEFAULT_USER_MODE = "server-fixed"

CELLS_DIR = "cells"
CELL_FILE = "cell.json"
CSV_FILE = "sweep.csv"
JSON_FILE = "sweep.json"
PLOT_FILE = "utility_vs_epsilon.png"

# Settings each cell sets itself; naming them in --run-config is an error.
CONTROLLED = ("seed", "lora.freeze-a", "dp.enabled", "dp.target-epsilon", "user-dp.noise-multiplier",
              "out-dir", "resume")
# Settings the runner rewrites (absolute paths): not compared when deciding to rerun.
PATH_SETTINGS = ("out-dir", "data.cache-dir", "data.path", "data.items-path")

UTILITY = (
    records.metric_name("hr", 10),
    records.metric_name("ndcg", 10),
    records.metric_name("hr", 10, full=True),
    records.metric_name("ndcg", 10, full=True),
)
COLUMNS = ("cell", "mode", "scheme", "seed", "target_epsilon", "epsilon", "delta", "noise_multiplier",
           *UTILITY, "rounds", "wall_seconds", "audit_auc", "audit_auc_pretrained", "audit_auc_stderr")

Simulate = Callable[..., dict[str, Any]]


class SweepError(ValueError):
    """A sweep argument is invalid; the message names it."""


class SweepFailed(RuntimeError):
    """Some cells failed; the others' results were written."""


# ------------------------------------------------------------------ the grid


@dataclass(frozen=True)
class Grid:
    """The values a sweep crosses."""

    epsilons: tuple[float, ...]
    modes: tuple[str, ...]
    schemes: tuple[str, ...]
    seeds: tuple[int, ...]


def _items(text: str, argument: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise SweepError(f"{argument}: empty; give a comma-separated list")
    return list(dict.fromkeys(items))  # drop repeats, keep order


def parse_epsilons(text: str) -> tuple[float, ...]:
    """``"1,4,8,inf"`` -> (1.0, 4.0, 8.0, inf): positive numbers, ``inf`` meaning no DP."""
    values = []
    for item in _items(text, "--epsilons"):
        try:
            value = math.inf if item.lower() in ("inf", "∞") else float(item)
        except ValueError:
            raise SweepError(f"--epsilons: '{item}' is not a number or 'inf'") from None
        if not value > 0:
            raise SweepError(f"--epsilons: {item} must be > 0 ('inf' runs without DP)")
        values.append(value)
    return tuple(sorted(set(values)))


def parse_choices(text: str, allowed: Sequence[str], argument: str) -> tuple[str, ...]:
    """Comma-separated names, each one of ``allowed``."""
    chosen = _items(text, argument)
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise SweepError(f"{argument}: {', '.join(unknown)} not one of {', '.join(allowed)}")
    return tuple(chosen)


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> (0, 1)."""
    try:
        return tuple(int(s) for s in _items(text, "--seeds"))
    except ValueError:
        raise SweepError(f"--seeds: '{text}' is not a comma-separated list of integers") from None


def parse_grid(epsilons: str, modes: str, schemes: str, seeds: str) -> Grid:
    """The grid from the command line's comma-separated lists."""
    return Grid(
        parse_epsilons(epsilons),
        parse_choices(modes, MODES, "--modes"),
        parse_choices(schemes, tuple(SCHEMES), "--schemes"),
        parse_seeds(seeds),
    )


@dataclass(frozen=True)
class Cell:
    """One run of the sweep."""

    mode: str
    """record, user, or none (epsilon = inf)."""
    scheme: str
    seed: int
    epsilon: float
    """Target epsilon; inf without DP."""

    @property
    def id(self) -> str:
        if self.mode == NO_DP:
            return f"nodp-{self.scheme}-seed{self.seed}"
        return f"{self.mode}-eps{self.epsilon:g}-{self.scheme}-seed{self.seed}"


def expand_grid(grid: Grid) -> list[Cell]:
    """Every cell, seed by seed (a stopped sweep has whole seeds done first).

    Infinite epsilon gives one no-DP cell per scheme and seed, whatever the modes.
    """
    cells = []
    for seed in grid.seeds:
        for scheme in grid.schemes:
            for epsilon in grid.epsilons:
                if math.isinf(epsilon):
                    cells.append(Cell(NO_DP, scheme, seed, epsilon))
                else:
                    cells.extend(Cell(mode, scheme, seed, epsilon) for mode in grid.modes)
    return cells


# ------------------------------------------------------ user-level planning


@dataclass(frozen=True)
class Sampling:
    """How many clients there are and how many each round samples (as Flower's FedAvg)."""

    num_clients: int
    per_round: int
    rounds: int

    @property
    def sample_rate(self) -> float:
        return min(1.0, self.per_round / self.num_clients)


def run_sampling(config: FedRecConfig, federation: Mapping[str, Any]) -> Sampling:
    """Clients of the run (as the runner counts them) and clients per round.

    Flower's ``FedAvg.configure_train`` samples ``max(int(N * fraction-train),
    min-train-nodes)`` of the N clients each round.
    """
    prepared = prepare(config.data, config.eval)
    n = resolve_num_partitions(config.partition, prepared.num_users, int(federation.get("num-supernodes", 10)))
    fed = config.federation
    return Sampling(n, max(int(n * fed.fraction_train), fed.min_train_nodes), fed.num_server_rounds)


def user_noise_multiplier(
    epsilon: float, user_dp: UserLevelDPConfig, sampling: Sampling, tolerance: float = 0.01
) -> float:
    """The smallest noise multiplier whose user-level epsilon after the last round is <= ``epsilon``.

    Bisection on :func:`user_level_epsilon` (decreasing in the multiplier), so the
    noise matches the ``user_epsilon`` that metrics.json will report, for every mode.
    """

    def eps(z: float) -> float:
        config = UserLevelDPConfig(user_dp.mode, z, user_dp.clipping_norm, user_dp.delta)
        return user_level_epsilon(config, sampling.sample_rate, sampling.rounds, sampling.num_clients)[0]

    low, high = 0.0, 1.0
    while eps(high) > epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise SweepError(f"--epsilons: user-level epsilon {epsilon:g} needs a noise multiplier above 1e4")
    while high - low > tolerance * high:
        middle = (low + high) / 2
        low, high = (low, middle) if eps(middle) <= epsilon else (middle, high)
    return high


# ------------------------------------------------------------------- cells


def cell_overrides(cell: Cell, user_mode: str, noise: float | None) -> dict[str, RunConfigValue]:
    """The run-config keys a cell sets on top of the preset and the base overrides."""
    overrides: dict[str, RunConfigValue] = {
        "seed": cell.seed,
        "lora.freeze-a": SCHEMES[cell.scheme],
        "dp.enabled": cell.mode == RECORD,
        "user-dp.mode": user_mode if cell.mode == USER else "off",
    }
    if cell.mode == RECORD:
        overrides["dp.target-epsilon"] = cell.epsilon
    if cell.mode == USER:
        overrides["user-dp.noise-multiplier"] = noise
    return overrides


def completed(cell_dir: Path, config: FedRecConfig) -> dict[str, Any] | None:
    """The cell's metrics.json when it has every round and the cell's settings, else None."""
    path = cell_dir / METRICS_FILE
    if not path.exists():
        return None
    try:
        results = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    expected = to_run_config(config)
    settings = results.get("settings", {})
    changed = sorted(
        k for k in expected.keys() & settings.keys() if k not in PATH_SETTINGS and settings[k] != expected[k]
    )
    if changed:
        log.warning("%s was run with other settings (%s); running it again", cell_dir.name, ", ".join(changed))
        return None
    if len(results.get("rounds", [])) < config.federation.num_server_rounds:
        return None
    return results


def _finite_or_nan(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def cell_row(
    cell: Cell,
    results: Mapping[str, Any],
    wall_seconds: float,
    noise: float | None,
    sampling_delta: float | None,
    audit: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One row of sweep.csv: the cell, its privacy and the last round's utility."""
    last = results["rounds"][-1]
    settings = results.get("settings", {})
    if cell.mode == RECORD:
        epsilon = _finite_or_nan(last.get(records.EPSILON_MAX_RUN))
        delta = float(settings.get("dp.delta", 0.0)) or math.nan  # 0: 1/(10 n) per client
    elif cell.mode == USER:
        epsilon = _finite_or_nan(last.get(records.USER_EPSILON))
        delta = _finite_or_nan(last.get(records.USER_DELTA, sampling_delta))
    else:
        epsilon, delta = math.inf, math.nan
    audit = audit or {}
    return {
        "cell": cell.id,
        "mode": cell.mode,
        "scheme": cell.scheme,
        "seed": cell.seed,
        "target_epsilon": cell.epsilon,
        "epsilon": epsilon,
        "delta": delta,
        "noise_multiplier": math.nan if noise is None else noise,
        **{m: _finite_or_nan(last.get(m)) for m in UTILITY},
        "rounds": len(results["rounds"]),
        "wall_seconds": wall_seconds,
        "audit_auc": _finite_or_nan(audit.get("auc")),
        "audit_auc_pretrained": _finite_or_nan(audit.get("auc_pretrained")),
        "audit_auc_stderr": _finite_or_nan(audit.get("auc_stderr")),
    }


# ----------------------------------------------------------------- outputs


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return value


def _json_value(value: Any) -> Any:
    """Strict JSON: NaN (not measured) and inf (no DP) become null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_tables(rows: list[dict[str, Any]], out_dir: Path) -> None:
    """``sweep.csv`` (inf and blanks as pandas reads them) and ``sweep.json``, atomically."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: _csv_value(row[k]) for k in COLUMNS} for row in rows)
    _atomic_write(out_dir / CSV_FILE, buffer.getvalue())
    rows_json = [{k: _json_value(row[k]) for k in COLUMNS} for row in rows]
    _atomic_write(out_dir / JSON_FILE, json.dumps({"cells": rows_json}, indent=2, allow_nan=False))


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    shown = [c for c in COLUMNS if c != "cell" and any(not _blank(r[c]) for r in rows)]
    cells = [[str(_csv_value(r[c])) for c in shown] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(shown)]
    lines = [" ".join(f"{c:>{w}}" for c, w in zip(shown, widths, strict=True))]
    lines += [" ".join(f"{v or '-':>{w}}" for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _blank(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def plot_utility(rows: list[dict[str, Any]], path: Path, baseline: Mapping[str, float] | None = None) -> None:
    """HR@10 and NDCG@10 (sampled) against target epsilon, one line per mode x scheme.

    Log x-axis; no DP (inf) is its own tick at the right: one black point per
    scheme, joined to each mode's line by a dotted segment. Points are means
    over seeds with standard-deviation error bars.
    ``baseline``: the pretrained (zero-shot) model's metrics, drawn as a grey line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = sorted({r["target_epsilon"] for r in rows if math.isfinite(r["target_epsilon"])})
    has_inf = any(math.isinf(r["target_epsilon"]) for r in rows)
    inf_x = finite[-1] * 4 if finite else 1.0  # where infinity is drawn
    modes = [m for m in MODES if any(r["mode"] == m for r in rows)]
    schemes = [s for s in SCHEMES if any(r["scheme"] == s for r in rows)]
    colors = {RECORD: "tab:blue", USER: "tab:orange", NO_DP: "black"}
    styles = {"lora": ("-", "o"), "ffa": ("--", "s")}
    seeds = len({r["seed"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric in zip(axes, UTILITY[:2], strict=True):
        for scheme in schemes:
            linestyle, marker = styles[scheme]
            inf_rows = [r for r in rows if r["mode"] == NO_DP and r["scheme"] == scheme]
            _, inf_mean, inf_std = _mean_std(inf_rows, [math.inf] if inf_rows else [], metric)
            if inf_rows:  # one point, shared by every mode's line
                ax.errorbar([inf_x], inf_mean, yerr=inf_std, color=colors[NO_DP], marker=marker,
                            capsize=3, linestyle="none", label=f"no DP / {scheme}")
            for mode in modes:
                line = [r for r in rows if r["mode"] == mode and r["scheme"] == scheme]
                xs = sorted({r["target_epsilon"] for r in line if math.isfinite(r["target_epsilon"])})
                if not xs:
                    continue
                x, mean, std = _mean_std(line, xs, metric)
                ax.errorbar(x, mean, yerr=std, color=colors[mode], marker=marker, capsize=3,
                            linestyle=linestyle, label=f"{mode} / {scheme}")
                if inf_rows:  # the axis jumps to infinity: a dotted join
                    ax.plot([x[-1], inf_x], [mean[-1], inf_mean[0]], color=colors[mode], linestyle=":")
        if baseline and metric in baseline:
            ax.axhline(baseline[metric], color="grey", linestyle="-.", linewidth=1, label="pretrained (zero-shot)")
        ax.set_xscale("log")
        ticks = [*finite, inf_x] if has_inf else finite
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{e:g}" for e in finite] + (["∞"] if has_inf else []))
        ax.minorticks_off()
        ax.set_xlim(min(ticks) / 1.6, max(ticks) * 1.6)
        ax.set_xlabel("target ε (log scale; ∞ = no DP)")
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (sampled), last round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"utility vs privacy budget: mean ± std over {seeds} seed{'s' if seeds > 1 else ''}")
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _mean_std(rows: list[dict[str, Any]], xs: list[float], metric: str) -> tuple[list[float], list[float], list[float]]:
    """Mean and standard deviation (over seeds) of ``metric`` at each x."""
    means, stds = [], []
    for x in xs:
        values = np.array([r[metric] for r in rows if r["target_epsilon"] == x], dtype=np.float64)
        means.append(float(values.mean()))
        stds.append(float(values.std(ddof=1)) if len(values) > 1 else 0.0)
    return xs, means, stds


# ------------------------------------------------------------------- sweep


def run_sweep(
    preset: str | None,
    out_dir: Path,
    grid: Grid,
    overrides: Mapping[str, RunConfigValue] | None = None,
    audit: bool = False,
    simulate_fn: Simulate = simulate,
) -> list[dict[str, Any]]:
    """Run (or resume) every cell of ``grid``; write the tables and the plot; return the rows.

    Raises :class:`SweepFailed` after writing the outputs of the cells that did
    run when some cells failed.
    """
    overrides = dict(overrides or {})
    clash = [k for k in CONTROLLED if k in overrides]
    if clash:
        raise SweepError(f"--run-config: {', '.join(clash)} set by the sweep itself; remove them")
    # The sweep measures what DP training buys at each ε; the popularity prior (on in
    # the default preset) is a release of its own that small budgets cannot afford.
    overrides.setdefault("popularity.weight", 0.0)
    user_mode = str(overrides.pop("user-dp.mode", "off"))
    user_mode = DEFAULT_USER_MODE if user_mode == "off" else user_mode
    out_dir = Path(out_dir)
    cells = expand_grid(grid)
    base, federation = resolve_settings(preset, overrides, None)  # bad settings fail here
    needs_user = any(c.mode == USER for c in cells)
    sampling = run_sampling(base, federation) if needs_user else None
    user_dp = UserLevelDPConfig(user_mode, 1.0, base.user_dp.clipping_norm, base.user_dp.delta)
    noise: dict[float, float] = {}
    if sampling is not None:
        for eps in sorted({c.epsilon for c in cells if c.mode == USER}):
            noise[eps] = user_noise_multiplier(eps, user_dp, sampling)
            log.info("user-level epsilon %g: %s noise multiplier %.4f (%d of %d clients per round, %d rounds)",
                     eps, user_mode, noise[eps], sampling.per_round, sampling.num_clients, sampling.rounds)
    delta = user_delta(user_dp, sampling.num_clients) if sampling else None

    (out_dir / CELLS_DIR).mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    failed: list[str] = []
    baseline: dict[str, float] = {}
    for i, cell in enumerate(cells, 1):
        cell_dir = out_dir / CELLS_DIR / cell.id
        z = noise.get(cell.epsilon) if cell.mode == USER else None
        cell_settings = {**overrides, **cell_overrides(cell, user_mode, z)}
        config, _ = resolve_settings(preset, cell_settings, cell_dir)
        results = completed(cell_dir, config)
        if results is not None:
            info = json.loads((cell_dir / CELL_FILE).read_text()) if (cell_dir / CELL_FILE).exists() else {}
            wall = info.get("wall_seconds", sum(r.get(records.SECONDS, 0.0) for r in results["rounds"]))
            log.info("cell %d/%d %s: done earlier, not run again", i, len(cells), cell.id)
        else:
            log.info("cell %d/%d %s: running (log: %s)", i, len(cells), cell.id, cell_dir / "flwr.log")
            shutil.rmtree(cell_dir, ignore_errors=True)  # a partial run restarts from scratch
            start = time.monotonic()
            try:
                results = simulate_fn(preset, cell_settings, cell_dir, stream=False)
            except (SimulationError, RuntimeError, ValueError, OSError) as err:
                log.error("cell %d/%d %s failed: %s", i, len(cells), cell.id, err)
                failed.append(cell.id)
                continue
            wall = time.monotonic() - start
            _atomic_write(cell_dir / CELL_FILE, json.dumps({"wall_seconds": wall, "overrides": cell_settings}))
        audit_values = _audit(cell_dir, results, run=audit)
        rows.append(cell_row(cell, results, wall, z, delta, audit_values))
        baseline = results.get("baselines", {}).get("pretrained", baseline)
        write_tables(rows, out_dir)
        last = rows[-1]
        log.info("cell %d/%d %s: HR@10 %.4f NDCG@10 %.4f epsilon %s (%.0f s)", i, len(cells), cell.id,
                 last[UTILITY[0]], last[UTILITY[1]], f"{last['epsilon']:.4g}", wall)
    write_tables(rows, out_dir)
    if rows:
        plot_utility(rows, out_dir / PLOT_FILE, baseline)
    log.info("wrote %s, %s and %s", out_dir / CSV_FILE, out_dir / JSON_FILE, out_dir / PLOT_FILE)
    if failed:
        raise SweepFailed(
            f"{len(failed)} of {len(cells)} cells failed ({', '.join(failed)}); see flwr.log in their "
            f"folders under {out_dir / CELLS_DIR}. Run the same command again to retry only those."
        )
    return rows


def _audit(cell_dir: Path, results: Mapping[str, Any], run: bool) -> dict[str, Any] | None:
    """The cell's audit of its last round: an earlier one, else a new one if ``run``; None if none."""
    from fedrec.privacy.audit import audit_run, read_audit

    done = read_audit(cell_dir)
    if done is not None and done.get("round") == results["rounds"][-1][records.ROUND]:
        return done
    if not run:
        return None
    try:
        return audit_run(cell_dir).to_json()
    except (ValueError, OSError) as err:
        log.error("audit of %s failed: %s", cell_dir.name, err)
        return None
