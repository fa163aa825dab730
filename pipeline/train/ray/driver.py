"""The training driver: `run_training` starts (or resumes) a run on Ray Train, collects rank 0's
reports, copies the final checkpoint next to the project and exports the model."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import Layout, atomic_directory
from pipeline.config import Params
from pipeline.errors import first_line
from pipeline.train.ray.cluster import (
    check_placement,
    init_ray,
    run_config_for,
    scaling_config_for,
    stop_ray,
    train_log_level,
)
from pipeline.train.ray.faults import plan_from_env
from pipeline.train.ray.inputs import TrainInputs
from pipeline.train.ray.reports import drop_sink, forward_reports_callback, register_sink
from pipeline.train.ray.runs import (
    RUN_RECORD,
    append_history,
    checkpoint_step,
    earlier_history,
    last_run,
    latest_checkpoint,
    new_run_name,
    record_run,
    recorded_storage,
)
from pipeline.train.ray.storage import RunStorage, check_reachable, download_dir, local_path
from pipeline.train.ray.worker import WorkerConfig, train_worker

_log = logging.getLogger(__name__)


class NothingToResumeError(FileNotFoundError):
    """`resume=True` without an earlier run (or one without any checkpoint)."""


class TrainingError(RuntimeError):
    """A training run that failed (after Ray Train's retries); the cause is chained."""


@dataclass
class TrainOutcome:
    run_name: str
    history: list[dict]  # rank 0's reports in order, across worker restarts and resumes (local run folders)
    checkpoint_dir: Path  # the final checkpoint, copied to layout.checkpoints / run_name
    export_dir: Path | None  # the Hugging Face export, when asked for
    precision: str  # fp32 or bf16, as resolved on the workers


def _mlflow_uri() -> str | None:
    """The tracking URI this process uses (to hand to workers), without importing MLflow needlessly."""
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        return mlflow.get_tracking_uri()
    from pipeline.tracking.store import tracking_uri

    return tracking_uri()


def run_training(
    params: Params,
    layout: Layout,
    *,
    resume: bool = False,
    mlflow_run_id: str | None = None,
    export_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
) -> TrainOutcome:
    """Train with Ray Train, copy the final checkpoint to `layout.checkpoints/<run>`, export.

    `resume=True` continues the last run of this layout (same Ray run name and storage, latest
    checkpoint) up to `params.train.steps`. `mlflow_run_id`: rank 0 logs every report to that
    run. `progress(metrics)` is called in this process for every report of rank 0 (live in local
    mode and for Ray workers alike).
    """
    trainer_cls = trainer_class()  # imports Ray Train before anything is written

    tp = params.train
    store = RunStorage.resolve(tp.storage, layout.root)
    run_name, store, resume_from = _the_run(layout, store, resume)
    run_dir = store.child(run_name)
    tp.accumulation_steps(max(tp.num_workers, 1))  # a global batch the workers cannot split: fail now

    started = False
    inputs = TrainInputs.read(layout.prepared, layout.token_stats, params.model.name_or_path)
    if tp.num_workers > 0:
        started = init_ray()
        check_placement(tp.num_workers, tp.cpus_per_worker, tp.use_gpu, wait_s=tp.placement_timeout_s)
        check_reachable(store)
        inputs = inputs.ship()
    local = local_path(run_dir)
    if local is not None:
        local.mkdir(parents=True, exist_ok=True)
    record_run(layout, run_name, store.location, tp.num_workers)

    # A resumed run's history starts with what it reported before (local run folders keep it).
    history: list[dict] = []
    if resume_from is not None and local is not None:
        history = earlier_history(local, checkpoint_step(resume_from) or 0)

    def take(entry: dict) -> None:
        history.append(entry)
        if local is not None:
            try:
                append_history(local, entry)
            except OSError as err:  # the record must not stop training
                _log.warning("could not record the report in %s: %s", local, err)
        if progress is not None:
            try:
                progress(dict(entry))
            except Exception as err:  # a broken progress bar must not stop training
                _log.warning("progress callback failed: %s", err)

    reports = _Reports.open(take, local_mode=tp.num_workers == 0)
    callbacks = reports.callbacks
    queue, sink_id = reports.queue, reports.sink_id

    config = WorkerConfig.for_run(
        params,
        inputs,
        run_dir,
        resume_from=resume_from,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=_mlflow_uri() if mlflow_run_id else None,
        sink_id=sink_id,
        fault_plan=plan_from_env(local, local_mode=tp.num_workers == 0) if local is not None else None,
    )
    trainer = trainer_cls(
        train_worker,
        train_loop_config=config.as_loop_config(),
        scaling_config=scaling_config_for(params),
        run_config=run_config_for(params, run_name, store.location, callbacks),
    )
    train_logger = logging.getLogger("ray.train")
    saved_level = train_logger.level
    if tp.num_workers == 0:  # local mode ignores LoggingConfig and logs every report at INFO
        train_logger.setLevel(train_log_level().upper())
    interrupted = False
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (pipeline.signals): stop the workers, then unwind
        interrupted = True
        raise
    except Exception as err:
        raise TrainingError(f"training run {run_name} failed: {first_line(err)}") from err
    finally:
        reports.close(interrupted)
        if queue is None:
            train_logger.setLevel(saved_level)
        if interrupted:
            _stop_training(trainer, queue, started)
    if result.error:
        raise TrainingError(f"training run {run_name} failed: {first_line(result.error)}") from result.error
    checkpoint_dir = _copy_final_checkpoint(result, resume_from, layout.checkpoints / run_name, run_name)

    precision = next((h["precision"] for h in reversed(history) if h.get("precision")), None)
    if precision is None:
        from pipeline.model.precision import resolve_precision

        precision = resolve_precision(tp.precision, "cuda" if tp.use_gpu else "cpu")
    if export_dir is not None:
        export_checkpoint(params, layout, checkpoint_dir, Path(export_dir))
    return TrainOutcome(
        run_name=run_name,
        history=history,
        checkpoint_dir=checkpoint_dir,
        export_dir=Path(export_dir) if export_dir is not None else None,
        precision=precision,
    )


def _the_run(layout: Layout, store: RunStorage, resume: bool) -> tuple[str, RunStorage, str | Path | None]:
    """(run name, its storage, the checkpoint to resume from): a new run, or with `resume` the last
    recorded one from its latest complete checkpoint (NothingToResumeError naming what is missing)."""
    if not resume:
        return new_run_name("train"), store, None
    record = last_run(layout)
    if record is None:
        raise NothingToResumeError(
            f"nothing to resume: no earlier training run recorded in {layout.train_out / RUN_RECORD} "
            f"(or {layout.ray_results / RUN_RECORD}); train without --resume first"
        )
    run_name = record["run_name"]
    recorded = recorded_storage(record)
    store = RunStorage(recorded, explicit=recorded != store.location or store.explicit)
    resume_from = latest_checkpoint(store.child(run_name))
    if resume_from is None:
        raise NothingToResumeError(
            f"nothing to resume: the last run {run_name} has no complete checkpoint under {store.child(run_name)}"
        )
    _log.info("resuming run %s from %s", run_name, resume_from)
    return run_name, store, resume_from


@dataclass
class _Reports:
    """How rank 0's reports reach this process while training runs: in local mode a sink the
    worker calls in-process; with Ray workers a queue actor on the driver's node (the reports must
    outlive any worker node that goes away), drained by a thread into `take`."""

    take: Callable[[dict], None]
    callbacks: list = field(default_factory=list)
    queue: Any = None
    sink_id: str | None = None
    pump: threading.Thread | None = None
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(cls, take: Callable[[dict], None], *, local_mode: bool) -> _Reports:
        reports = cls(take)
        if local_mode:
            reports.sink_id = register_sink(take)
            return reports
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        reports.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        reports.callbacks.append(forward_reports_callback(reports.queue))
        reports.pump = threading.Thread(target=reports._pump, name="dbert-train-progress", daemon=True)
        reports.pump.start()
        return reports

    def drain(self, block: bool) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                self.take(self.queue.get(block=block, timeout=0.5) if block else self.queue.get_nowait())
            except Empty:
                return

    def _pump(self) -> None:
        while not self.stop.is_set():
            self.drain(block=True)

    def close(self, interrupted: bool) -> None:
        """Stop the pump; after a normal end take what is still queued and free the queue actor."""
        if self.queue is None or self.pump is None:
            drop_sink(self.sink_id)
            return
        self.stop.set()
        self.pump.join(timeout=10)
        if not interrupted:
            self.drain(block=False)
            self.queue.shutdown()


def _copy_final_checkpoint(result, resume_from: str | Path | None, destination: Path, run_name: str) -> Path:
    """The run's final checkpoint copied to `destination` (atomically). A resume of a run that had
    already reached train.steps trains nothing and reports nothing: its final checkpoint is the one
    it resumed from."""
    final = result.checkpoint.path if result.checkpoint is not None else resume_from
    if final is None:
        raise TrainingError(f"training run {run_name} reported no checkpoint")
    checkpoint_dir = destination.resolve()
    with atomic_directory(checkpoint_dir) as tmp:  # a stopped copy leaves no partial checkpoint
        if result.checkpoint is not None:
            result.checkpoint.to_directory(str(tmp))
        else:
            download_dir(final, tmp)
    return checkpoint_dir


def trainer_class():
    """TorchTrainer that leaves SIGINT to `pipeline.signals`.

    Ray Train 2.60's `fit()` replaces the SIGINT handler (in the main thread) with one that aborts
    the run and calls `sys.exit(0)`, and never puts the old one back: a Ctrl-C then ended the
    stage's MLflow run FAILED with exit code 0, and later stages saw Ray's handler. Here SIGINT
    raises like SIGTERM does, and `run_training` stops the run itself (`_stop_training`).
    """
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        controller = None

        def _register_sigint_handler(self, controller) -> None:
            self.controller = controller

    return Trainer


def _stop_training(trainer, queue, started: bool) -> None:
    """After Ctrl-C / SIGTERM: stop the run's actors, as few Ray calls as possible (the cluster may
    be going down with us: a process-group SIGTERM reaches its processes too).

    A cluster this process started is shut down, and the controller, workers and report queue die
    with it. On a cluster someone else runs, the controller is aborted the way Ray's own Ctrl-C
    does it and the queue is killed. Best effort: the process is stopping anyway."""
    if started:
        stop_ray(True)
        return
    import ray

    controller = getattr(trainer, "controller", None)
    try:
        if controller is not None:
            ray.get(controller.abort.remote(), timeout=30)
    except Exception:  # abort ends the actor, so its own call fails
        pass
    try:
        if queue is not None:
            queue.shutdown(force=True)
    except Exception:
        pass


def export_checkpoint(params: Params, layout: Layout, checkpoint_dir: Path, export_dir: Path) -> Path:
    """Rebuild the model on the driver from a checkpoint (EMA weights when trained with EMA) and
    write the Hugging Face export with its tokenizer and schedule inputs."""
    import torch

    from pipeline.assembly.model import model_from_params
    from pipeline.assembly.schedule import schedule_for
    from pipeline.data.stats import TokenStatistics
    from pipeline.model.export import export_model
    from pipeline.model.loading import load_tokenizer
    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.train.optim import EMA

    stats = TokenStatistics.load(layout.token_stats)
    tokenizer = load_tokenizer(params.model.name_or_path)
    schedule = schedule_for(params, stats)
    rng = torch.get_rng_state()  # load_checkpoint restores the workers' RNG; keep ours
    try:
        model = model_from_params(params, schedule)
        ema = EMA(model, params.train.ema_decay) if params.train.ema_decay > 0 else None
        load_checkpoint(checkpoint_dir, model, ema=ema)
        if ema is not None:
            ema.copy_to(model)
    finally:
        torch.set_rng_state(rng)
    model.eval()
    return export_model(
        model, tokenizer, schedule, export_dir, information=stats.centred_information(), counts=stats.counts
    )
