"""fedrec's Flower ServerApp: FedAvg over LoRA adapters, evaluated and checkpointed each round."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedrec import records
from fedrec.checkpoint import checkpoint_dir, latest_checkpoint, load_server_state
from fedrec.client_data import num_partitions_for
from fedrec.config import ConfigError, FedRecConfig, load_config, to_run_config
from fedrec.evaluation import evaluate_scorer, popularity_scorer
from fedrec.global_model import GlobalModel
from fedrec.item_counts import popularity_prior
from fedrec.item_transitions import transition_prior
from fedrec.logs import setup_logging
from fedrec.model.adapters import load_saved_adapter
from fedrec.prepare import PreparedData, prepare
from fedrec.results import RunRecord, read_record
from fedrec.runtime import configure_threads
from fedrec.tracking import TensorBoardLog
from server.item_counts import run_item_counts
from server.item_transitions import run_item_transitions
from server.optimizer_state import keeps_state, optimizer_state, restore_optimizer_state
from server.sampling import SeededSampling
from server.secure_aggregation import SecAggFedRec
from server.strategy import FedRecAvg, server_strategy
from server.user_dp import clients_per_round, user_dp_metrics, wrap_strategy

log = logging.getLogger("fedrec.server")

app = ServerApp()

DEFAULT_ROUND_TIMEOUT = 3600.0  # Flower's default for Strategy.start


def _dataset_info(config: FedRecConfig, prepared: PreparedData) -> dict:
    return {
        "name": config.data.name,
        "prepared": prepared.root.name,
        **{k: prepared.meta[k] for k in ("num_users", "num_items", "num_train")},
    }


def _popularity_baseline(config: FedRecConfig, prepared: PreparedData) -> dict[str, float]:
    log.info("Popularity baseline ...")
    return evaluate_scorer(
        popularity_scorer(prepared), prepared, "test", config.eval.k, config.eval.max_users, beyond=True
    )


def _start_record(config: FedRecConfig, model: GlobalModel, out_dir: Path) -> tuple[RunRecord, int]:
    """A fresh record, or the earlier one and its last round when resuming.

    A resumed run may train on new data (more interactions, users or items:
    incremental learning): the adapters carry over, since items and users are
    embedded from text; the record notes from which round the new data counts
    and recomputes the popularity baseline on it.
    """
    previous = read_record(out_dir) if config.federation.resume else None
    found = latest_checkpoint(out_dir) if config.federation.resume else None
    dataset = _dataset_info(config, model.prepared)
    if previous is not None and found is not None:
        start_round, folder = found
        load_saved_adapter(model.model.encoder, folder)
        previous.rounds = [r for r in previous.rounds if r[records.ROUND] <= start_round]
        previous.settings = to_run_config(config)
        log.info("Resuming from %s (round %d)", folder, start_round)
        if any(
            previous.dataset.get(k) != v for k, v in dataset.items() if k in previous.dataset or k != "prepared"
        ):
            log.info("New data since round %d: %s", start_round, dataset)
            previous.dataset = {**dataset, "since_round": start_round + 1, "before": previous.dataset}
            previous.baselines["popularity"] = _popularity_baseline(config, model.prepared)
        return previous, start_round
    record = RunRecord(
        settings=to_run_config(config),
        dataset=dataset,
        model={**model.size_report(), "adapter_wire_bytes": ArrayRecord(model.adapters()).count_bytes()},
    )
    record.baselines["popularity"] = _popularity_baseline(config, model.prepared)
    log.info("Pretrained model before any round (zero-shot) ...")
    record.baselines["pretrained"] = model.evaluate("test")
    return record, 0


def _seeded_sampling(config: FedRecConfig, timeout: float) -> SeededSampling | None:
    """The run's seeded client sampling, or None for Flower's unseeded draw."""
    if not config.federation.seeded_sampling:
        return None
    if config.user_dp.enabled:
        log.info("Clients are drawn by Flower, unseeded: user-level DP's amplified epsilon needs that")
        return None
    return SeededSampling(config.federation.seed, timeout)


def _restore_server_optimizer(strategy: FedRecAvg, model: GlobalModel, out_dir: Path, start_round: int) -> None:
    """Give a resumed run's server optimizer the state it had after ``start_round``."""
    if not keeps_state(strategy):
        return
    state = load_server_state(checkpoint_dir(out_dir, start_round))
    if state is None:
        log.warning(
            "The checkpoint of round %d has no server optimizer state (written before fedrec "
            "saved it): %s's moments start from zero",
            start_round,
            type(strategy).__name__,
        )
    elif restore_optimizer_state(strategy, state, model.adapters(), start_round):
        log.info("Restored the server optimizer's state of round %d", start_round)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Prepare data, then run FedAvg rounds; write metrics.json and checkpoints."""
    setup_logging()
    config = load_config(context.run_config)
    configure_threads(config.runtime)
    out_dir = Path(config.federation.out_dir).expanduser()
    prepared = prepare(config.data, config.eval)
    num_nodes = len(list(grid.get_node_ids()))
    if num_nodes and config.federation.client_data == "partitions":
        num_partitions_for(config, prepared, num_nodes)
    elif config.user_dp.enabled:
        raise ConfigError("setting 'user-dp.mode': user-level DP needs the number of clients at start")
    model = GlobalModel(config, prepared)
    record, start_round = _start_record(config, model, out_dir)
    record.write(out_dir)
    total = config.federation.num_server_rounds
    if start_round >= total:
        log.info("All %d rounds already done in %s", total, out_dir)
        return
    timeout = config.federation.round_timeout or DEFAULT_ROUND_TIMEOUT
    evaluate_config = ConfigRecord()
    if config.popularity.enabled:  # the zero-shot baseline above ranks without it
        counts, summary = run_item_counts(
            grid, config, prepared.catalogue_digest, prepared.num_items, out_dir, timeout
        )
        model.item_prior = popularity_prior(counts, config.popularity)
        evaluate_config[records.ITEM_COUNTS] = counts.tolist()
        if summary is not None:
            record.model[records.ITEM_COUNTS] = summary
            record.write(out_dir)
    if config.transitions.enabled:
        transitions, summary = run_item_transitions(
            grid, config, prepared.catalogue_digest, prepared.num_items, out_dir, timeout
        )
        model.user_prior = transition_prior(transitions, config.transitions)
        if summary is not None:
            record.model[records.TRANSITIONS_ACTION] = summary
            record.write(out_dir)

    if config.secagg.enabled:
        strategy = SecAggFedRec(
            config, context, round_offset=start_round, sampling=_seeded_sampling(config, timeout)
        )
    else:
        strategy = server_strategy(
            config.federation.server_optimizer,
            config.federation.server_lr,
            config.federation.server_momentum,
            proximal_mu=config.federation.proximal_mu,
            fraction_train=config.federation.fraction_train,
            fraction_evaluate=config.federation.fraction_evaluate,
            min_train_nodes=config.federation.min_train_nodes,
            min_evaluate_nodes=config.federation.min_train_nodes if config.federation.fraction_evaluate else 0,
            min_available_nodes=config.federation.min_train_nodes,
            weighted_by_key=records.NUM_EXAMPLES,
            arrayrecord_key=records.ARRAYS,
            configrecord_key=records.CONFIG,
            round_offset=start_round,
            server_lr_steps=config.federation.server_lr_steps,
            max_update_norm=config.federation.max_update_norm,
            wire_dtype=config.federation.wire_dtype,
            sampling=_seeded_sampling(config, timeout),
        )
        if start_round:
            _restore_server_optimizer(strategy, model, out_dir, start_round)
    for earlier in record.rounds:  # a resumed run keeps the clients' epsilons it has seen
        strategy.epsilons.latest.update(
            {int(k): v for k, v in earlier.get(records.CLIENT_EPSILONS, {}).items()}
        )
    runner = (  # SecAgg+ refuses user-level DP: its modes need the individual updates
        strategy
        if config.secagg.enabled
        else wrap_strategy(strategy, config.user_dp, clients_per_round(strategy, num_nodes))
    )
    clock = {"start": time.monotonic()}
    tensorboard = TensorBoardLog(out_dir)

    def evaluate_round(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        current = server_round + start_round
        model.set_adapters(arrays.to_torch_state_dict())
        model.checkpoint(out_dir, current, optimizer_state(strategy))
        metrics = model.evaluate("test")
        values = {
            records.ROUND: current,
            **strategy.last_round,
            **user_dp_metrics(runner, config.user_dp, current, num_nodes),
            **metrics,
        }
        values[records.SECONDS] = time.monotonic() - clock["start"]
        clock["start"] = time.monotonic()
        record.add_round(values)
        record.write(out_dir)
        tensorboard.log_round(values)
        log.info(
            "round %d/%d  loss %s  %s%s  (%.1fs)",
            current,
            total,
            # DP clients withhold their loss (a function of their examples)
            f"{values[records.TRAIN_LOSS]:.4f}" if records.TRAIN_LOSS in values else "withheld",
            "  ".join(f"{m} {metrics[m]:.4f}" for m in records.summary_metrics(config.eval.k)),
            "".join(
                f"  {k} {values[k]:.4f}"
                for k in (records.EPSILON_MAX, records.EPSILON_MAX_RUN, records.USER_EPSILON)
                if k in values
            ),
            values[records.SECONDS],
        )
        return MetricRecord({k: float(v) for k, v in metrics.items()})

    if config.secagg.enabled:
        runner.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.adapters()),
            num_rounds=total - start_round,
            evaluate_fn=evaluate_round,
        )
    else:
        # Devices check that they index the same catalogue before training.
        train_config = ConfigRecord({records.CATALOGUE_DIGEST: prepared.catalogue_digest})
        if config.federation.proximal_mu:  # FedProx's client objective under any server step
            train_config[records.PROXIMAL_MU] = config.federation.proximal_mu
        runner.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.adapters()),
            num_rounds=total - start_round,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=evaluate_round,
        )
    tensorboard.close()
    log.info("Wrote %s (and metrics.csv, tensorboard/)", out_dir / "metrics.json")
