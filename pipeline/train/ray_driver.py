"""Ray Train driver: `run_training` runs `pipeline.train.loop.train_loop` on Ray Train V2 workers
(TorchTrainer, DDP over gloo/nccl) or, with `train.num_workers=0`, in this process (Ray Train's
local mode), then copies the final checkpoint next to the project and exports the model.

What Ray Train V2 (2.60) does, and what this module adds on top:

* Resume: a run is a `RunConfig(name, storage_path)` folder. Reusing the name makes the V2
  controller reload its checkpoint snapshot there, so `ray.train.get_checkpoint()` returns the
  latest checkpoint in the workers; worker-group failures (`FailureConfig.max_failures`) restart
  from it the same way. Local mode persists nothing and retries nothing, so here checkpoints are
  copied into the same run folder by the worker, and the driver passes the latest one through the
  train config (`resume_from`), used whenever `ray.train.get_checkpoint()` is None.
* Reports: `ray.train.report` must be called by every rank at the same steps (the loop does);
  rank 0 alone hands over a checkpoint. A controller-side `UserCallback` sees the metrics of all
  ranks and forwards rank 0's to the driver (history, live `progress`), so history survives
  worker restarts. Local mode runs no callbacks: the worker calls the driver's sink directly.
* MLflow: rank 0 logs each report to the driver's run by id (`mlflow_run_id`; the tracking URI
  travels in the config because a Ray cluster started earlier does not see later env changes).
  Workers never start or end that run, and never create the database.
* Placement: `check_placement` fails fast when the cluster cannot hold the workers, instead of
  letting Ray wait for resources forever.

Importing this module does not import Ray, torch or MLflow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.artifacts import Layout, atomic_directory, read_json, write_json_atomic
from pipeline.config import Params, params_from_dict

RUN_RECORD = "last_run.json"
CHECKPOINT_PREFIX = "checkpoint_"
KEEP_CHECKPOINTS = 2
ENV_FAIL_AT_STEP = "DBERT_FAIL_AT_STEP"
ENV_FAIL_MARKER = "DBERT_FAIL_MARKER"
ENV_TRAIN_LOG_LEVEL = "DBERT_RAY_TRAIN_LOG_LEVEL"  # Ray Train's own logs (default WARNING)
ENV_DASHBOARD = "DBERT_RAY_DASHBOARD"  # "0": start a local cluster without the dashboard

_log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """The Ray cluster cannot place the requested training workers; the message names the numbers."""


class NothingToResumeError(FileNotFoundError):
    """`resume=True` without an earlier run (or one without any checkpoint)."""


class TrainingError(RuntimeError):
    """A training run that failed (after Ray Train's retries); the cause is chained."""


class InjectedFailure(RuntimeError):
    """The test hook `DBERT_FAIL_AT_STEP` fired."""


# ---------------------------------------------------------------------------------------------
# Ray cluster
# ---------------------------------------------------------------------------------------------


def init_ray() -> bool:
    """Join `$RAY_ADDRESS` when set, else start a local cluster sized to this machine; True when
    this call connected (the caller may then `ray.shutdown()` it when stopped, see `stop_ray`).

    No-op (False) when Ray is already initialised (a test fixture, a notebook, a Tune trial). The local
    cluster keeps its session files under `$RAY_TMPDIR` (default /tmp/ray: socket paths must be
    short). Its dashboard binds 127.0.0.1 only: Ray Train's controller polls the state API that
    the dashboard process serves (without it, every run logs "State API may be temporarily
    unavailable" every few seconds); `DBERT_RAY_DASHBOARD=0` turns it off anyway.
    """
    import ray

    from pipeline.signals import keep_handlers

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    with keep_handlers():  # ray.init() puts sys.exit(15) on SIGTERM: a stopped stage must end KILLED
        if address:
            ray.init(address=address, **quiet)
            return True
        dashboard = os.environ.get(ENV_DASHBOARD, "1").strip().lower() not in ("0", "false", "no", "off")
        ray.init(
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _temp_dir=os.environ.get("RAY_TMPDIR") or "/tmp/ray",
            **quiet,
        )
    return True


def stop_ray(started: bool) -> None:
    """After Ctrl-C / SIGTERM: shut down the Ray connection this process made (`init_ray` returned
    True), so the actors it owns - Train controllers and workers, Tune trials - stop with it.
    A cluster someone else started (a test fixture, a notebook) stays up."""
    if not started:
        return
    import ray

    try:
        ray.shutdown()
    except Exception as err:  # the process is stopping anyway
        _log.warning("ray.shutdown() failed while stopping: %s", err)


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_placement(num_workers: int, cpus_per_worker: float, use_gpu: bool, *, reserve_cpus: float = 0.0) -> None:
    """Raise PlacementError unless the cluster's total resources can hold the workers.

    Local mode (`num_workers == 0`) needs nothing. `reserve_cpus` is what a driver inside Ray
    (a Tune trial) holds while its workers run. Each worker must also fit on one node, and the
    workers must pack onto the nodes as a whole. Totals, not what is free right now: a busy
    cluster frees up, a too-small one never grows (unless an autoscaler adds nodes).
    """
    if num_workers <= 0:
        return
    import ray

    totals = ray.cluster_resources()
    total_cpus = float(totals.get("CPU", 0.0))
    total_gpus = float(totals.get("GPU", 0.0))
    need = num_workers * cpus_per_worker + reserve_cpus
    driver = f" (plus {_fmt(reserve_cpus)} for the trial driver)" if reserve_cpus else ""
    if need > total_cpus + 1e-9:
        raise PlacementError(
            f"train.num_workers={num_workers} x train.cpus_per_worker={_fmt(cpus_per_worker)} needs "
            f"{_fmt(need)} CPUs{driver} but the Ray cluster has {_fmt(total_cpus)}; lower train.num_workers or "
            f"train.cpus_per_worker (train.num_workers=0 trains in this process), or join a larger cluster "
            f"with RAY_ADDRESS"
        )
    if use_gpu and num_workers > total_gpus + 1e-9:
        raise PlacementError(
            f"train.num_workers={num_workers} with train.use_gpu=true needs {num_workers} GPU(s) but the Ray "
            f"cluster has {_fmt(total_gpus)}"
        )
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if nodes:
        slots = sum(
            min(
                math.floor(float(n.get("CPU", 0.0)) / cpus_per_worker + 1e-9),
                math.floor(float(n.get("GPU", 0.0)) + 1e-9) if use_gpu else num_workers,
            )
            for n in nodes
        )
        if slots < num_workers:
            largest = max(float(n.get("CPU", 0.0)) for n in nodes)
            raise PlacementError(
                f"train.num_workers={num_workers} x train.cpus_per_worker={_fmt(cpus_per_worker)} does not fit "
                f"on the Ray nodes: they hold {slots} such workers (largest node: {_fmt(largest)} CPUs)"
            )


# ---------------------------------------------------------------------------------------------
# Runs on disk
# ---------------------------------------------------------------------------------------------


def new_run_name(prefix: str = "train") -> str:
    """`<prefix>-<yyyymmdd-HHMMSS>-<6 hex>`: sortable, and unique (Ray resumes a reused name)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _record_paths(layout: Layout) -> list[Path]:
    # outputs/train is a DVC output (removed by `dvc repro`, replaced whole by the train stage);
    # the copy next to the Ray results survives both.
    return [layout.train_out / RUN_RECORD, layout.ray_results / RUN_RECORD]


def record_run(layout: Layout, run_name: str, storage_path: Path, num_workers: int) -> dict:
    record = {"run_name": run_name, "storage_path": str(storage_path), "num_workers": num_workers,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for path in _record_paths(layout):
        write_json_atomic(record, path)
    return record


def last_run(layout: Layout) -> dict | None:
    """The record of the last `run_training` of this layout (outputs/train, else ray_results)."""
    for path in _record_paths(layout):
        if path.is_file():
            return read_json(path)
    return None


def checkpoint_step(directory: Path) -> int | None:
    try:
        return int(json.loads((Path(directory) / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under a run folder (Ray's or local mode's)."""
    from pipeline.train.checkpoint import MODEL_FILE, STATE_FILE

    best: tuple[int, Path] | None = None
    if not Path(run_dir).is_dir():
        return None
    for child in Path(run_dir).iterdir():
        if not child.is_dir() or not child.name.startswith(CHECKPOINT_PREFIX):
            continue
        step = checkpoint_step(child)
        if step is None or not (child / MODEL_FILE).is_file() or not (child / STATE_FILE).is_file():
            continue
        if best is None or step > best[0]:
            best = (step, child)
    return best[1] if best else None


def _checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def _persist_checkpoint(source: Path, run_dir: Path, step: int, keep: int) -> Path:
    """Local mode: copy a checkpoint into the run folder atomically, keep the newest `keep`."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / _checkpoint_name(step)
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    kept = sorted(
        (c for c in run_dir.iterdir() if c.is_dir() and c.name.startswith(CHECKPOINT_PREFIX)),
        key=lambda c: checkpoint_step(c) or -1,
    )
    for old in kept[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------


def weights_checksum(model) -> str:
    """sha256 over the state dict (sorted keys, raw bytes): equal iff the weights are bit-equal."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_worker_body(
    config: dict,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    start_checkpoint: Path | None,
    deliver: Callable[[dict, Path | None, bool], None],
    device=None,
    wrap_model: Callable | None = None,
) -> dict:
    """Everything a worker does, without Ray: load data, resume, train, report.

    `deliver(metrics, checkpoint_dir, last)` hands each report on (to Ray Train, to Tune, to the
    driver); `checkpoint_dir` is a temporary directory on rank 0 at checkpoint steps, else None,
    deleted after `deliver` returns. Returns this rank's last metrics (Ray Train keeps rank 0's as
    `Result.return_value`).
    """
    import torch

    from pipeline.model.precision import resolve_precision
    from pipeline.train.loop import TrainData, train_loop

    params = params_from_dict(config["params"])
    tp = params.train
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if tp.use_gpu else "cpu")
    data = TrainData.load(Path(config["prepared"]), Path(config["token_stats"]), params.model.name_or_path)
    resume_from, resumed_via = start_checkpoint, "ray" if start_checkpoint is not None else "none"
    if resume_from is None and config.get("resume_from"):
        resume_from, resumed_via = Path(config["resume_from"]), "config"
    resumed_step = checkpoint_step(resume_from) if resume_from is not None else 0
    precision = resolve_precision(tp.precision, device)

    tracking = config.get("mlflow") or {}
    log_to_mlflow = rank == 0 and bool(tracking.get("run_id"))
    if log_to_mlflow:
        import mlflow

        from pipeline.tracking import quiet_mlflow_logs

        quiet_mlflow_logs()
        if tracking.get("uri"):
            mlflow.set_tracking_uri(tracking["uri"])

    holder: dict[str, Any] = {}

    def wrap(model):
        holder["model"] = model
        return wrap_model(model) if wrap_model is not None else model

    fail_at = config.get("fail_at_step")
    marker = Path(config["fail_marker"]) if config.get("fail_marker") else None

    def on_step(step: int) -> None:
        if rank != 0 or fail_at is None or step != int(fail_at):
            return
        if marker is not None:
            if marker.exists():
                return
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        if config.get("local_mode"):
            raise InjectedFailure(f"{ENV_FAIL_AT_STEP}={fail_at}: injected failure at step {step}")
        if reported["checkpoint"] is not None:  # die only once the controller holds it (see below)
            _await_checkpoint_registered(Path(config["run_dir"]), reported["checkpoint"])
        _log.warning("%s=%s: killing training worker rank 0 at step %d", ENV_FAIL_AT_STEP, fail_at, step)
        os._exit(1)  # a dead process, as if the node went away

    last_metrics: dict = {}
    reported: dict[str, str | None] = {"checkpoint": None}  # the last checkpoint this rank handed on

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        metrics = dict(metrics)
        metrics["resumed_from_step"] = resumed_step
        metrics["resumed_via"] = resumed_via  # ray: ray.train.get_checkpoint(); config: resume_from
        metrics["precision"] = precision
        last = int(metrics["step"]) >= tp.steps
        if last and "model" in holder:
            metrics["weights_sha256"] = weights_checksum(holder["model"])
        if log_to_mlflow:
            from pipeline.tracking import log_metrics

            try:
                log_metrics(metrics, step=int(metrics["step"]), run_id=tracking["run_id"])
            except Exception as err:  # tracking must not kill a training run
                _log.warning("MLflow logging failed at step %s: %s", metrics["step"], err)
        try:
            deliver(metrics, checkpoint_dir, last)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if checkpoint_dir is not None:
            reported["checkpoint"] = _checkpoint_name(int(metrics["step"]))
        last_metrics.clear()
        last_metrics.update(metrics)

    train_loop(
        params, data, device=device, rank=rank, world_size=world_size, wrap_model=wrap, report=report,
        resume_from=resume_from, on_step=on_step,
    )
    return dict(last_metrics)


def _await_checkpoint_registered(run_dir: Path, name: str, timeout_s: float = 60.0) -> bool:
    """Wait until the Train controller has registered checkpoint `name` of this run (the test hook
    `DBERT_FAIL_AT_STEP` calls this before it kills the worker).

    `ray.train.report` returns once the report is queued in the worker; the controller takes it
    with its next `poll_status` call, and Ray 2.60 drops it from the queue before the reply is on
    its way (its "two phase commit" TODO). A worker that dies in between loses that report: its
    checkpoint is never registered and the restart begins from an older one, or from scratch.
    The controller writes `checkpoint_manager_snapshot.json` into the run folder right after it
    registers a checkpoint, so the kill waits until that file names the checkpoint.
    """
    try:
        from ray.train.v2._internal.constants import (
            CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as snapshot_name,
        )
    except ImportError:
        snapshot_name = "checkpoint_manager_snapshot.json"
    snapshot = Path(run_dir) / snapshot_name
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = snapshot.read_text()
            json.loads(text)  # not a half-written file
            if f'"{name}"' in text:
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            _log.warning("%s never appeared in %s; killing the worker anyway", name, snapshot)
            return False
        time.sleep(0.05)


def train_worker(config: dict) -> dict | None:
    """The Ray Train worker function (`TorchTrainer(train_worker, train_loop_config=config)`)."""
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world_size, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    local_mode = bool(config.get("local_mode"))
    if not local_mode:
        _quiet_worker_reports()
    run_dir = Path(config["run_dir"])
    keep = int(config.get("keep_checkpoints", KEEP_CHECKPOINTS))
    sink = _LOCAL_SINKS.get(config.get("sink_id", ""))

    device = None
    wrap_model = None
    if not local_mode:
        import ray.train.torch

        device = ray.train.torch.get_device()
        if world_size > 1:
            wrap_model = ray.train.torch.prepare_model

    def deliver(metrics: dict, checkpoint_dir: Path | None, last: bool) -> None:
        step = int(metrics["step"])
        checkpoint = None
        if local_mode:
            if checkpoint_dir is not None and rank == 0:
                checkpoint = Checkpoint.from_directory(str(_persist_checkpoint(checkpoint_dir, run_dir, step, keep)))
            ray.train.report(metrics, checkpoint=checkpoint)
            if sink is not None and rank == 0:
                sink(dict(metrics, checkpoint_path=checkpoint.path if checkpoint else None))
            return
        if checkpoint_dir is not None:
            checkpoint = Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=_checkpoint_name(step))

    start = ray.train.get_checkpoint()
    if start is not None:
        with start.as_directory() as directory:
            return train_worker_body(config, rank=rank, world_size=world_size, local_rank=local_rank,
                                     start_checkpoint=Path(directory), deliver=deliver, device=device,
                                     wrap_model=wrap_model)
    return train_worker_body(config, rank=rank, world_size=world_size, local_rank=local_rank,
                             start_checkpoint=None, deliver=deliver, device=device, wrap_model=wrap_model)


def _quiet_worker_reports() -> None:
    """Ray 2.60 logs every `ray.train.report` at INFO through a logger named after its file, which
    `LoggingConfig(log_level)` does not reach (it filters `ray.train.*` names only)."""
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(os.environ.get(ENV_TRAIN_LOG_LEVEL, "WARNING").upper())
    except Exception:  # a Ray without that module: only the log volume changes
        pass


# Local mode runs the worker function in this process: its reports reach the driver directly.
_LOCAL_SINKS: dict[str, Callable[[dict], None]] = {}


def _forward_reports_callback(queue):
    """A controller-side UserCallback that puts rank 0's metrics (plus every rank's weight
    checksum at the end, and the persisted checkpoint path) on a Ray queue for the driver."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, queue) -> None:
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics:
                return
            entry = dict(metrics[0])
            sums = [m.get("weights_sha256") for m in metrics]
            if any(s is not None for s in sums):
                entry["weights_sha256_by_rank"] = sums
            entry["checkpoint_path"] = checkpoint.path if checkpoint is not None else None
            self.queue.put(entry)

    return ForwardReports(queue)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    run_name: str
    history: list[dict]  # rank 0's reports in order, across worker restarts (and resumes: new steps only)
    checkpoint_dir: Path  # the final checkpoint, copied to layout.checkpoints / run_name
    export_dir: Path | None  # the Hugging Face export, when asked for
    precision: str  # fp32 or bf16, as resolved on the workers


def worker_config(
    params: Params,
    layout: Layout,
    run_dir: Path,
    *,
    resume_from: Path | None = None,
    mlflow_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> dict:
    """The plain-dict train_loop_config every worker rebuilds its inputs from."""
    fail_at = os.environ.get(ENV_FAIL_AT_STEP)
    return {
        "params": params.model_dump(),
        "prepared": str(layout.prepared.resolve()),
        "token_stats": str(layout.token_stats.resolve()),
        "run_dir": str(run_dir),
        "local_mode": params.train.num_workers == 0,
        "keep_checkpoints": KEEP_CHECKPOINTS,
        "resume_from": str(resume_from) if resume_from is not None else None,
        "mlflow": {"run_id": mlflow_run_id, "uri": tracking_uri} if mlflow_run_id else None,
        # The cluster may predate these variables, so the driver passes them on.
        "fail_at_step": int(fail_at) if fail_at else None,
        "fail_marker": os.environ.get(ENV_FAIL_MARKER) or (str(run_dir / ".injected_failure") if fail_at else None),
    }


def _mlflow_uri() -> str | None:
    """The tracking URI this process uses (to hand to workers), without importing MLflow needlessly."""
    import sys

    if "mlflow" in sys.modules:
        import mlflow

        return mlflow.get_tracking_uri()
    from pipeline.tracking import tracking_uri

    return tracking_uri()


def run_config_for(params: Params, run_name: str, storage_path: Path, callbacks: list | None = None):
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    return RunConfig(
        name=run_name,
        storage_path=str(storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        failure_config=FailureConfig(max_failures=params.train.max_failures),
        callbacks=callbacks or [],
        logging_config=LoggingConfig(log_level=os.environ.get(ENV_TRAIN_LOG_LEVEL, "WARNING")),
    )


def scaling_config_for(params: Params):
    from ray.train import ScalingConfig

    tp = params.train
    return ScalingConfig(num_workers=tp.num_workers, use_gpu=tp.use_gpu,
                         resources_per_worker={"CPU": tp.cpus_per_worker} if tp.num_workers else None)


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
    trainer_class = _trainer_class()  # imports Ray Train before anything is written

    tp = params.train
    storage = layout.ray_results.resolve()
    resume_from: Path | None = None
    if resume:
        record = last_run(layout)
        if record is None:
            raise NothingToResumeError(
                f"nothing to resume: no earlier training run recorded in {layout.train_out / RUN_RECORD} "
                f"(or {layout.ray_results / RUN_RECORD}); train without --resume first"
            )
        run_name = record["run_name"]
        storage = Path(record["storage_path"])
        resume_from = latest_checkpoint(storage / run_name)
        if resume_from is None:
            raise NothingToResumeError(
                f"nothing to resume: the last run {run_name} has no complete checkpoint under {storage / run_name}"
            )
        _log.info("resuming run %s from %s", run_name, resume_from)
    else:
        run_name = new_run_name("train")
    run_dir = storage / run_name

    started = False
    if tp.num_workers > 0:
        started = init_ray()
        check_placement(tp.num_workers, tp.cpus_per_worker, tp.use_gpu)
    run_dir.mkdir(parents=True, exist_ok=True)
    record_run(layout, run_name, storage, tp.num_workers)

    config = worker_config(params, layout, run_dir, resume_from=resume_from, mlflow_run_id=mlflow_run_id,
                           tracking_uri=_mlflow_uri() if mlflow_run_id else None)
    history: list[dict] = []

    def take(entry: dict) -> None:
        history.append(entry)
        if progress is not None:
            try:
                progress(dict(entry))
            except Exception as err:  # a broken progress bar must not stop training
                _log.warning("progress callback failed: %s", err)

    callbacks = []
    queue = pump = None
    stop = threading.Event()
    if tp.num_workers == 0:
        config["sink_id"] = sink_id = secrets.token_hex(8)
        _LOCAL_SINKS[sink_id] = take
    else:
        from ray.util.queue import Empty, Queue

        queue = Queue(actor_options={"num_cpus": 0})
        callbacks.append(_forward_reports_callback(queue))

        def drain(block: bool) -> None:
            while True:
                try:
                    take(queue.get(block=block, timeout=0.5) if block else queue.get_nowait())
                except Empty:
                    return

        def pump_loop() -> None:
            while not stop.is_set():
                drain(block=True)

        pump = threading.Thread(target=pump_loop, name="dbert-train-progress", daemon=True)
        pump.start()

    trainer = trainer_class(
        train_worker,
        train_loop_config=config,
        scaling_config=scaling_config_for(params),
        run_config=run_config_for(params, run_name, storage, callbacks),
    )
    train_logger = logging.getLogger("ray.train")
    saved_level = train_logger.level
    if tp.num_workers == 0:  # local mode ignores LoggingConfig and logs every report at INFO
        train_logger.setLevel(os.environ.get(ENV_TRAIN_LOG_LEVEL, "WARNING").upper())
    interrupted = False
    try:
        result = trainer.fit()
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM (pipeline.signals): stop the workers, then unwind
        interrupted = True
        raise
    except Exception as err:
        raise TrainingError(f"training run {run_name} failed: {_short(err)}") from err
    finally:
        if queue is not None:
            stop.set()
            pump.join(timeout=10)
            if not interrupted:
                drain(block=False)
                queue.shutdown()
        else:
            _LOCAL_SINKS.pop(config.get("sink_id", ""), None)
            train_logger.setLevel(saved_level)
        if interrupted:
            _stop_training(trainer, queue, started)
    if result.error:
        raise TrainingError(f"training run {run_name} failed: {_short(result.error)}") from result.error
    # A resume of a run that had already reached train.steps trains nothing and reports nothing:
    # its final checkpoint is the one it resumed from.
    final = result.checkpoint.path if result.checkpoint is not None else resume_from
    if final is None:
        raise TrainingError(f"training run {run_name} reported no checkpoint")

    checkpoint_dir = (layout.checkpoints / run_name).resolve()
    with atomic_directory(checkpoint_dir) as tmp:  # a stopped copy leaves no partial checkpoint
        if result.checkpoint is not None:
            result.checkpoint.to_directory(str(tmp))
        else:
            shutil.copytree(final, tmp, dirs_exist_ok=True)

    precision = next((h["precision"] for h in reversed(history) if h.get("precision")), None)
    if precision is None:
        from pipeline.model.precision import resolve_precision

        precision = resolve_precision(tp.precision, "cuda" if tp.use_gpu else "cpu")
    if export_dir is not None:
        export_checkpoint(params, layout, checkpoint_dir, Path(export_dir))
    return TrainOutcome(run_name=run_name, history=history, checkpoint_dir=checkpoint_dir,
                        export_dir=Path(export_dir) if export_dir is not None else None, precision=precision)


def _trainer_class():
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


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def export_checkpoint(params: Params, layout: Layout, checkpoint_dir: Path, export_dir: Path) -> Path:
    """Rebuild the model on the driver from a checkpoint (EMA weights when trained with EMA) and
    write the Hugging Face export with its tokenizer and schedule inputs."""
    import torch

    from pipeline.data.stats import TokenStatistics
    from pipeline.model.export import export_model
    from pipeline.model.loading import build_model, load_tokenizer
    from pipeline.train.checkpoint import load_checkpoint
    from pipeline.train.loop import build_schedule_for
    from pipeline.train.optim import EMA

    stats = TokenStatistics.load(layout.token_stats)
    tokenizer = load_tokenizer(params.model.name_or_path)
    schedule = build_schedule_for(params, stats)
    rng = torch.get_rng_state()  # load_checkpoint restores the workers' RNG; keep ours
    try:
        model = build_model(params, schedule)
        ema = EMA(model, params.train.ema_decay) if params.train.ema_decay > 0 else None
        load_checkpoint(checkpoint_dir, model, ema=ema)
        if ema is not None:
            ema.copy_to(model)
    finally:
        torch.set_rng_state(rng)
    model.eval()
    return export_model(model, tokenizer, schedule, export_dir, information=stats.centred_information(),
                        counts=stats.counts)
