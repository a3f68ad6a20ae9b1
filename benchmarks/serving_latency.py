"""Latency of serving: top-10 from a cached user embedding, and encoding a new user.

Measured on the paths ``fedrec recommend`` and ``fedrec serve`` run
(fedrec.serving), one request at a time, after warm-up:

* ``top10``: one matrix-vector product over the item index, the user's items
  masked, and a top-k (``fedrec.serving.recommender.top_k``), for the 1,682-item
  catalogue and for a 100,000-item index. The bare ``index @ user`` product is
  timed beside it and reported as a ratio. The large index holds random unit
  vectors: the cost of a product does not depend on the values.
* ``encode_user``: the user tower on a 20-item history (the merged encoder),
  float32 and with dynamic int8 quantization; with the agreement of their
  top-10 lists.
* ``new_items``: serving a catalogue grown after training (``--new-items``):
  loading the run with 100 new items appended, which encodes only them (the
  run's index is reused), against encoding the whole catalogue again (that
  one without ``--quick``).
* ``personalise_user``: the on-device user embedding (``personal.enabled``,
  ``personal.recent-items=3``: :mod:`fedrec.model.personal_vector`), fitted
  from the same history against the 1,682-item index: what a request costs on
  top of ``encode_user`` when personal vectors are on.

Without ``--model``, a stand-in run is built once in the cache: MiniLM-L6 with
untrained (merged) adapters over a synthetic catalogue of 1,682 items: same
shapes and cost as a trained ML-100K run. With ``--model DIR`` (a folder of
``fedrec simulate``) its checkpoint and catalogue are used.

Writes JSON to ``--out`` and prints a table; the last line is
``p50_ms_top10_1682=<p50 of top-10 over 1,682 items, ms>``.

    python benchmarks/serving_latency.py [--model DIR] [--threads 1] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fedrec.checkpoint import latest_checkpoint, save_checkpoint
from fedrec.config import PersonalConfig, load_config, to_run_config
from fedrec.model.build import build_recommender
from fedrec.model.personal_vector import personalise
from fedrec.prepare import prepare
from fedrec.results import RunRecord
from fedrec.serving import Recommender, load_trained
from fedrec.serving.index import item_index, new_items_index_path
from fedrec.serving.recommender import top_k
from fedrec.serving.trained import quantize_int8

CATALOGUE_ITEMS = 1_682
LARGE_ITEMS = 100_000
HISTORY_ITEMS = 20
NEW_ITEMS = 100


def standin_run(cache: Path) -> Path:
    """A run folder with MiniLM, fresh adapters and a synthetic 1,682-item catalogue."""
    run_dir = cache / "benchmarks" / f"serving-standin-{CATALOGUE_ITEMS}"
    if latest_checkpoint(run_dir) is None:
        config = load_config(
            {
                "data.name": "synthetic",
                "data.synthetic-users": 200,
                "data.synthetic-items": CATALOGUE_ITEMS,
                "data.cache-dir": str(cache),
                "out-dir": str(run_dir),
            }
        )
        prepare(config.data, config.eval)
        model = build_recommender(config.model, config.lora)
        save_checkpoint(model.encoder, run_dir, 0)
        RunRecord(settings=to_run_config(config)).write(run_dir)
    return run_dir


def timings_ms(fn: Callable[[], object], repeats: int, warmup: int = 5) -> dict[str, float]:
    """p50/p99/mean wall time of ``fn`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return {
        "p50_ms": float(np.percentile(samples, 50)),
        "p99_ms": float(np.percentile(samples, 99)),
        "mean_ms": statistics.fmean(samples),
        "repeats": repeats,
    }


def top10_figures(items: torch.Tensor, user: torch.Tensor, exclude: np.ndarray, repeats: int) -> dict:
    served = timings_ms(lambda: top_k(items, user, exclude, 10), repeats)
    bare = timings_ms(lambda: items @ user, repeats)
    return {
        "items": len(items),
        "top10": served,
        "bare_matvec": bare,
        "ratio_to_bare_matvec_p50": served["p50_ms"] / bare["p50_ms"],
    }


def new_items_figures(run_dir: Path, served: Recommender, rebuild: bool) -> dict:
    """Seconds to load the run with NEW_ITEMS items added after training (only they are
    encoded), a plain reload beside it, and (``rebuild``) encoding the whole catalogue."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "new-items.csv"
        lines = [f"new-{i},New Film {i} ({2000 + i % 20}). Genres: Drama" for i in range(NEW_ITEMS)]
        path.write_text("item_id,text\n" + "\n".join(lines) + "\n")
        start = time.perf_counter()
        grown = Recommender.from_run(run_dir, new_items=path)
        add_seconds = time.perf_counter() - start
        new_items_index_path(grown.trained).unlink()
        new_items_index_path(grown.trained).with_suffix(".json").unlink()
    start = time.perf_counter()
    Recommender.from_run(run_dir)
    figures = {"items_added": NEW_ITEMS, "load_with_new_items_seconds": add_seconds, "reload_seconds": time.perf_counter() - start}
    if rebuild:
        start = time.perf_counter()
        item_index(served.trained, rebuild=True)
        figures["encode_catalogue_seconds"] = time.perf_counter() - start
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a run folder written by `fedrec simulate` (default: a stand-in)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (under a minute)")
    parser.add_argument("--out", default="runs/benchmarks/serving_latency.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats_top, repeats_encode = (200, 20) if args.quick else (2000, 200)

    cache = Path(os.environ.get("FEDREC_CACHE", "~/.cache/fedrec")).expanduser()
    run_dir = Path(args.model) if args.model else standin_run(cache)
    start = time.perf_counter()
    fp32 = Recommender(load_trained(run_dir))
    load_seconds = time.perf_counter() - start
    user_id = next(iter(fp32.user_index_of))
    history = fp32.history_of(user_id)[-HISTORY_ITEMS:]
    user = fp32.user_vector(history)

    generator = torch.Generator().manual_seed(0)
    large = torch.nn.functional.normalize(torch.randn(LARGE_ITEMS, user.numel(), generator=generator), dim=-1)
    int8 = Recommender(
        replace(fp32.trained, model=quantize_int8(fp32.trained.model), quantization="int8"), items=fp32.items
    )
    user_int8 = int8.user_vector(history)
    personal = PersonalConfig(enabled=True, recent_items=3)
    temperature = fp32.trained.model.temperature
    best_fp32 = set(fp32.top_k(user, history, 10)[0])
    best_int8 = set(fp32.top_k(user_int8, history, 10)[0])
    figures = {
        "run": str(run_dir),
        "model": fp32.trained.config.model.name,
        "threads": args.threads,
        "load_and_index_seconds": load_seconds,
        "catalogue": top10_figures(fp32.items, user, history, repeats_top),
        "large": top10_figures(large, user, history, repeats_top),
        "encode_user_fp32": timings_ms(lambda: fp32.user_vector(history), repeats_encode),
        "encode_user_int8": timings_ms(lambda: int8.user_vector(history), repeats_encode),
        "personalise_user": timings_ms(
            lambda: personalise(user[None], fp32.items, [history], personal, temperature), repeats_encode
        ),
        "int8_user_cosine": float(user @ user_int8 / user_int8.norm()),
        "int8_top10_overlap": len(best_fp32 & best_int8) / 10,
        "new_items": new_items_figures(run_dir, fp32, rebuild=not args.quick),
        "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2))
    print(f"{'what':<34} {'p50 ms':>9} {'p99 ms':>9}")
    for name, key in ((f"top-10 of {CATALOGUE_ITEMS:,} items", "catalogue"), (f"top-10 of {LARGE_ITEMS:,} items", "large")):
        for part in ("top10", "bare_matvec"):
            t = figures[key][part]
            print(f"{name + (' (bare matvec)' if part == 'bare_matvec' else ''):<34} {t['p50_ms']:9.3f} {t['p99_ms']:9.3f}")
    for part in ("encode_user_fp32", "encode_user_int8", "personalise_user"):
        t = figures[part]
        print(f"{part:<34} {t['p50_ms']:9.3f} {t['p99_ms']:9.3f}")
    print(
        f"ratios to bare matvec (p50): {figures['catalogue']['ratio_to_bare_matvec_p50']:.2f} "
        f"({CATALOGUE_ITEMS:,}), {figures['large']['ratio_to_bare_matvec_p50']:.2f} ({LARGE_ITEMS:,}); "
        f"int8 user vector cosine {figures['int8_user_cosine']:.4f}, top-10 overlap {figures['int8_top10_overlap']:.1f}"
    )
    added = figures["new_items"]
    print(
        f"{NEW_ITEMS} items added after training: loaded in {added['load_with_new_items_seconds']:.2f} s "
        f"(a plain reload {added['reload_seconds']:.2f} s"
        + (f"; encoding the whole catalogue {added['encode_catalogue_seconds']:.2f} s" if "encode_catalogue_seconds" in added else "")
        + ")"
    )
    print(f"figures: {out}")
    print(f"p50_ms_top10_1682={figures['catalogue']['top10']['p50_ms']:.4f}")


if __name__ == "__main__":
    main()
