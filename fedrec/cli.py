"""The ``fedrec`` command line: simulate, prepare data, run baselines, deploy, serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedrec.config import ConfigError
from fedrec.data.interactions import DataError
from fedrec.logs import setup_logging
from fedrec.records import summary_metrics

if TYPE_CHECKING:  # serving imports torch and the model: loaded only by the commands that serve
    from fedrec.serving import Recommender

log = logging.getLogger("fedrec")

PRIVACY_SUMMARY = ("epsilon_max", "epsilon_median", "epsilon_max_run", "user_epsilon")


def _cell(value: object, width: int) -> str:
    return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"


def _summary_table(results: dict) -> str:
    """Per-round figures (and the clients' epsilon when DP is on), then the baselines."""
    rounds = results["rounds"]
    headline = summary_metrics(int(results["settings"].get("eval.k", 10)))
    privacy = [k for k in PRIVACY_SUMMARY if any(k in r for r in rounds)]
    columns = ("train_loss", *headline, "bytes_up_per_client", "seconds", *privacy)
    widths = [max(12, len(c)) for c in columns]
    rows = [f"{'round':>5} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for r in rounds:
        cells = (_cell(r.get(c), w) for c, w in zip(columns, widths))
        rows.append(f"{int(r['round']):>5} " + " ".join(cells))
    for name, baseline in results.get("baselines", {}).items():
        rows.append(f"{name} baseline: " + "  ".join(f"{k} {baseline[k]:.4f}" for k in headline))
    if privacy:
        last = rounds[-1]
        rows.append(
            "privacy: record-level epsilon of the most-spent client so far "
            f"{last.get('epsilon_max_run', float('nan')):.4f}"
            + (f"; user-level epsilon {last['user_epsilon']:.4f}" if "user_epsilon" in last else "")
        )
    return "\n".join(rows)


def _simulate(args: argparse.Namespace) -> int:
    from simulations.runner import parse_overrides, simulate

    results = simulate(
        preset=args.preset,
        overrides=parse_overrides(args.run_config),
        out_dir=Path(args.out) if args.out else None,
        stream=not args.quiet,
        keep_superlink=args.keep_superlink,
    )
    print(_summary_table(results))
    print(f"metrics: {Path(results['settings']['out-dir']) / 'metrics.json'}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from fedrec.prepare import prepare
    from simulations.runner import parse_overrides, resolve_settings

    config, _ = resolve_settings(args.preset, parse_overrides(args.run_config), None)
    prepared = prepare(config.data, config.eval)
    print(json.dumps({"root": str(prepared.root), **prepared.meta}, indent=2))
    return 0


def _centralized(args: argparse.Namespace) -> int:
    from fedrec.centralized import train_centralized
    from simulations.runner import parse_overrides, resolve_settings

    config, _ = resolve_settings(args.preset, parse_overrides(args.run_config), Path(args.out) if args.out else None)
    results = train_centralized(config, steps=args.steps, eval_every=args.eval_every)
    print(json.dumps(results["final"], indent=2))
    return 0


def _baselines(args: argparse.Namespace) -> int:
    from fedrec.baselines import BprSettings, run_baselines
    from fedrec.prepare import prepare
    from fedrec.runtime import configure_threads
    from fedrec.sequential_baseline import SasRecSettings
    from simulations.runner import parse_overrides, resolve_settings

    config, _ = resolve_settings(args.preset, parse_overrides(args.run_config), Path(args.out) if args.out else None)
    configure_threads(config.runtime)
    settings = BprSettings(dim=args.dim, epochs=args.epochs, lr=args.lr, seed=config.federation.seed)
    sasrec = None
    if args.sasrec_epochs:
        sasrec = SasRecSettings(epochs=args.sasrec_epochs, loss=args.sasrec_loss, seed=config.federation.seed)
    out = Path(config.federation.out_dir).expanduser()
    results = run_baselines(prepare(config.data, config.eval), settings, out, config.eval.k, sasrec, args.refit)
    k = config.eval.k
    learnt = [n for n in ("bpr-mf", "ease", "item-knn", "sasrec") if n in results]
    tested = {"popularity": results["popularity"], **{n: results[n]["test"] for n in learnt}}
    tested.update({f"{n}+valid": results[n]["refit"]["test"] for n in learnt if "refit" in results[n]})
    for name, metrics in tested.items():
        print(f"{name:>12}: " + "  ".join(f"{m} {metrics[m]:.4f}" for m in (f"hr@{k}", f"ndcg@{k}", f"hr@{k}_full", f"ndcg@{k}_full", f"coverage@{k}")))
    print(f"results: {out / 'baselines.json'}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from simulations.runner import parse_overrides
    from simulations.sweep import format_table, parse_grid, run_sweep

    grid = parse_grid(args.epsilons, args.modes, args.schemes, args.seeds)
    out = Path(args.out or "runs/sweep")
    rows = run_sweep(args.preset, out, grid, parse_overrides(args.run_config), audit=args.audit)
    print(format_table(rows))
    print(f"table: {out / 'sweep.csv'}  plot: {out / 'utility_vs_epsilon.png'}")
    return 0


def _deploy_certs(args: argparse.Namespace) -> int:
    from fedrec.deploy.credentials import generate_tls

    files = generate_tls(Path(args.out), args.host, days=args.days)
    print(f"CA certificate (give to every SuperNode and flwr CLI): {files.ca_cert}")
    print(f"SuperLink certificate and key: {files.server_cert} {files.server_key}")
    print(f"CA key (keep offline; only needed to issue new certificates): {files.ca_key}")
    return 0


def _deploy_keys(args: argparse.Namespace) -> int:
    from fedrec.deploy.credentials import generate_node_keys

    for name in args.names:
        keys = generate_node_keys(Path(args.out), name)
        print(f"{name}: private {keys.private_key} (stays on the device), public {keys.public_key} (register it)")
    return 0


def _deploy_export(args: argparse.Namespace) -> int:
    from fedrec.deploy.export import export_devices
    from fedrec.prepare import prepare
    from simulations.runner import parse_overrides, resolve_settings

    config, _ = resolve_settings(args.preset, parse_overrides(args.run_config), None)
    exported = export_devices(prepare(config.data, config.eval), Path(args.out), args.users)
    print(f"catalogue {exported.catalogue} (fingerprint {exported.catalogue_digest})")
    print(f"{len(exported.user_files)} device files in {Path(args.out) / 'devices'}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from fedrec.reevaluate import evaluate_run
    from simulations.runner import parse_overrides

    result = evaluate_run(
        Path(args.model),
        args.round,
        args.split,
        parse_overrides(args.run_config),
        Path(args.out) if args.out else None,
        args.average_rounds or (),
    )
    metrics = result["metrics"]
    averaged = f" (mean of rounds {result['averaged_rounds']})" if result["averaged_rounds"] else ""
    print(f"round {result['round']}{averaged} {result['split']}: " + "  ".join(f"{m} {metrics[m]:.4f}" for m in summary_metrics(result["k"])))
    print(f"metrics: {result['file']}")
    return 0


AVERAGE_ROUNDS_HELP = "the mean of these rounds' checkpoints instead of one, e.g. 8,9,10 (a run keeps its last 3)"


def _round_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rounds separated by commas, e.g. 8,9,10, not {text!r}") from None


def _recommendation_table(found: list) -> str:
    rows = [f"{'item_id':>10}  {'score':>7}  {'title':<48} because you have"]
    for r in found:
        rows.append(f"{r.item_id:>10}  {r.score:7.4f}  {r.title[:48]:<48} {'; '.join(r.because)}")
    return "\n".join(rows)


def _load_recommender(args: argparse.Namespace) -> Recommender:
    """The trained run the model options of ``recommend`` / ``serve`` name."""
    from fedrec.serving import Recommender
    from simulations.runner import parse_overrides

    return Recommender.from_run(
        args.model,
        args.round,
        args.quantize,
        parse_overrides(args.run_config),
        args.average_rounds or (),
        args.local_adapters,
        args.new_items,
    )


def _recommend(args: argparse.Namespace) -> int:
    if args.user is None and not args.items and not args.text:
        raise ValueError("give --user, or a new user's --items and/or --text")
    recommender = _load_recommender(args)
    if args.user is not None:
        found = recommender.for_user(args.user, args.k)
    else:
        found = recommender.for_history(args.items or [], args.text or [], args.k)
    if args.json:
        print(json.dumps([r.to_json() for r in found], indent=2))
    else:
        print(_recommendation_table(found))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fedrec.serving.http import make_server

    recommender = _load_recommender(args)
    server = make_server(recommender, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"serving {recommender.num_items} items on http://{host}:{port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrec", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, default_preset: str | None = "default") -> None:
        p.add_argument("--preset", default=default_preset, help="simulations/presets/NAME.toml (default: %(default)s)")
        p.add_argument("--run-config", action="append", help='overrides, e.g. "num-server-rounds=20 lora.r=16"')
        p.add_argument("--out", help="output folder (metrics.json, checkpoints)")

    sim = sub.add_parser("simulate", help="run a federated simulation through Flower")
    common(sim)
    sim.add_argument("--quiet", action="store_true", help="do not stream Flower's log")
    sim.add_argument("--keep-superlink", action="store_true", help="leave the local SuperLink running")
    sim.set_defaults(func=_simulate)

    prep = sub.add_parser("prepare", help="fetch (ml-100k) and prepare a dataset into the cache")
    common(prep)
    prep.set_defaults(func=_prepare)

    central = sub.add_parser("centralized", help="train the same model centrally (baseline)")
    common(central)
    central.add_argument("--steps", type=int, default=200, help="optimizer steps")
    central.add_argument("--eval-every", type=int, default=50, help="evaluate every N steps")
    central.set_defaults(func=_centralized)
    baselines = sub.add_parser("baselines", help="popularity, BPR-MF, EASE, item-kNN and SASRec (central, no privacy) by the same evaluation")
    common(baselines)
    baselines.add_argument("--epochs", type=int, default=30, help="BPR-MF epochs; the best on validation is kept (default: %(default)s)")
    baselines.add_argument("--dim", type=int, default=64, help="BPR-MF embedding size (default: %(default)s)")
    baselines.add_argument("--lr", type=float, default=5e-3, help="BPR-MF Adam learning rate (default: %(default)s)")
    baselines.add_argument(
        "--sasrec-epochs", type=int, default=200, help="SASRec epochs, the best on validation kept; 0 skips it (default: %(default)s)"
    )
    baselines.add_argument(
        "--sasrec-loss", choices=("bce", "ce"), default="bce",
        help="SASRec loss: the paper's one sampled negative, or a softmax over the catalogue (default: %(default)s)",
    )
    baselines.add_argument(
        "--refit", action="store_true",
        help="also train BPR-MF and SASRec again on the training and validation items for their chosen "
        "epochs and score them on test (NAME+valid), as train.include-valid-item trains fedrec",
    )
    baselines.set_defaults(func=_baselines)
    sweep = sub.add_parser("sweep", help="utility against privacy budget: a grid of simulations")
    common(sweep)
    sweep.add_argument("--epsilons", default="1,4,8,inf", help="target epsilons; inf: no DP (default: %(default)s)")
    sweep.add_argument("--modes", default="record", help="record and/or user level DP (default: %(default)s)")
    sweep.add_argument("--schemes", default="lora", help="lora and/or ffa (FFA-LoRA) (default: %(default)s)")
    sweep.add_argument("--seeds", default="0", help="run seeds (default: %(default)s)")
    sweep.add_argument("--audit", action="store_true", help="membership-inference audit of each cell")
    sweep.set_defaults(func=_sweep)

    deploy = sub.add_parser("deploy", help="credentials and device files for a real deployment (docs/deploy.md)")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = deploy_sub.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    certs.add_argument("--out", required=True, help="folder for ca.crt, server.pem, server.key, ca.key")
    certs.add_argument("--host", action="append", required=True, help="SuperLink name or IP (repeat for each)")
    certs.add_argument("--days", type=int, default=365, help="validity (default: %(default)s)")
    certs.set_defaults(func=_deploy_certs)
    keys = deploy_sub.add_parser("keys", help="SuperNode authentication key pairs")
    keys.add_argument("--out", required=True, help="folder for NAME and NAME.pub")
    keys.add_argument("names", nargs="+", help="one name per SuperNode")
    keys.set_defaults(func=_deploy_keys)
    export = deploy_sub.add_parser("export", help="a dataset as a catalogue and one file per user")
    common(export)
    export.add_argument("--users", type=int, default=0, help="only the first N users (default: all)")
    export.set_defaults(func=_deploy_export)

    def model_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="run folder written by `fedrec simulate` (its --out)")
        p.add_argument("--round", type=int, help="checkpoint round (default: the newest)")
        p.add_argument("--average-rounds", type=_round_list, help=AVERAGE_ROUNDS_HELP)
        p.add_argument("--quantize", choices=("none", "int8"), default="none", help="dynamic int8 encoder on CPU")
        p.add_argument(
            "--local-adapters",
            help="a lora.local-b run: the device's own lora_B file (local-adapters-<partition>.pt in its state folder)",
        )
        p.add_argument(
            "--new-items",
            help="items added after training: a CSV/TSV/JSONL/Parquet table item_id,text[,title], served from their text",
        )
        p.add_argument(
            "--run-config",
            action="append",
            help='evaluation-time settings, e.g. "personal.enabled=true personal.recent-items=3" (default: the run\'s)',
        )

    recommend = sub.add_parser("recommend", help="top-k items for a user of a trained run, or a new user")
    model_options(recommend)
    recommend.add_argument("--user", help="a user id of the run's dataset")
    recommend.add_argument("--items", nargs="+", help="a new user's item ids, oldest first")
    recommend.add_argument("--text", action="append", help="a new user's item title not in the catalogue (repeat)")
    recommend.add_argument("--k", type=int, default=10, help="how many items (default: %(default)s)")
    recommend.add_argument("--json", action="store_true", help="print JSON")
    recommend.set_defaults(func=_recommend)
    evaluate = sub.add_parser("evaluate", help="evaluate a run's checkpoint again, e.g. with personal vectors")
    evaluate.add_argument("--model", required=True, help="run folder written by `fedrec simulate` (its --out)")
    evaluate.add_argument(
        "--round", type=int, help="checkpoint round (default: the newest; 0: the pretrained model, no adapters)"
    )
    evaluate.add_argument("--average-rounds", type=_round_list, help=AVERAGE_ROUNDS_HELP)
    evaluate.add_argument("--split", choices=("test", "valid"), default="test", help="held-out items (default: %(default)s)")
    evaluate.add_argument("--run-config", action="append", help='evaluation settings, e.g. "personal.enabled=true personal.l2=3"')
    evaluate.add_argument("--out", help="JSON file (default: RUN/evaluations/round-NNNN-SPLIT[_overrides].json)")
    evaluate.set_defaults(func=_evaluate)
    serve = sub.add_parser("serve", help="an HTTP endpoint for recommendations (docs/serving.md)")
    model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument("--port", type=int, default=8080, help="port; 0 picks a free one (default: %(default)s)")
    serve.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedrec`` console script."""
    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return args.func(args)
    except (ConfigError, DataError, ValueError, RuntimeError, OSError) as err:
        print(f"fedrec: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
