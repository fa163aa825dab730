"""The training worker: `WorkerConfig` (everything a worker rebuilds its inputs from) and the
function Ray Train runs on every worker, or in this process in local mode.

`train_worker_body` is the worker without Ray (Tune trials in their own process call it too);
`train_worker` wraps it for `TorchTrainer(train_worker, train_loop_config=...)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.train.ray import faults, storage
from pipeline.train.ray.cluster import train_log_level
from pipeline.train.ray.inputs import TrainInputs
from pipeline.train.ray.reports import local_sink
from pipeline.train.ray.runs import KEEP_CHECKPOINTS, checkpoint_name, checkpoint_step, persist_checkpoint

LOOP_CONFIG_KEY = "worker"  # Ray's train_loop_config must be a dict: the WorkerConfig sits under this key

_log = logging.getLogger(__name__)

Deliver = Callable[[dict, Path | None, bool], None]  # (metrics, checkpoint_dir, last)


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker trains from. It crosses process and node boundaries (pickled by Ray), so
    it holds objects, ObjectRefs, storage locations and ids, never a path on the driver's disk
    (`inputs` carries the data); the tracking URI and the fault plan travel in it because a Ray
    cluster started earlier does not see the driver's environment."""

    params: Params
    inputs: TrainInputs  # the splits, token statistics and a local model folder (ObjectRefs on Ray)
    run_dir: str | Path  # the run folder in `train.storage`: <storage>/<run name>
    resume_from: str | Path | None = None  # a checkpoint in storage to start from when Ray hands over none
    mlflow_run_id: str | None = None  # rank 0 logs every report to this run
    tracking_uri: str | None = None  # the store of that run
    keep_checkpoints: int = KEEP_CHECKPOINTS  # local mode: checkpoints kept in run_dir
    sink_id: str | None = None  # local mode: the driver's report sink (`reports.register_sink`)
    fault_plan: faults.FaultPlan | None = None  # test-only (`faults.plan_from_env`)

    @property
    def local_mode(self) -> bool:
        """Ray Train's local mode (`train.num_workers=0`): the worker runs in the driver's process."""
        return self.params.train.num_workers == 0

    @classmethod
    def for_run(
        cls,
        params: Params,
        inputs: TrainInputs,
        run_dir: str | Path,
        *,
        resume_from: str | Path | None = None,
        mlflow_run_id: str | None = None,
        tracking_uri: str | None = None,
        sink_id: str | None = None,
        fault_plan: faults.FaultPlan | None = None,
    ) -> WorkerConfig:
        """The config of one run of `params` on `inputs` (shipped through Ray unless local mode)."""
        return cls(
            params=params,
            inputs=inputs,
            run_dir=run_dir,
            resume_from=resume_from,
            mlflow_run_id=mlflow_run_id,
            tracking_uri=tracking_uri if mlflow_run_id else None,
            sink_id=sink_id,
            fault_plan=fault_plan,
        )

    def as_loop_config(self) -> dict:
        """Ray Train's `train_loop_config` (a dict) holding this config."""
        return {LOOP_CONFIG_KEY: self}

    @classmethod
    def from_loop_config(cls, loop_config: dict) -> WorkerConfig:
        """The config `as_loop_config` put in a `train_loop_config`."""
        return loop_config[LOOP_CONFIG_KEY]


def weights_checksum(model) -> str:
    """sha256 over the state dict (sorted keys, raw bytes): equal iff the weights are bit-equal."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_worker_body(
    config: WorkerConfig,
    *,
    rank: int,
    world_size: int,
    local_rank: int,
    start_checkpoint: Path | None,
    deliver: Deliver,
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
    from pipeline.train.loop import train_loop

    tp = config.params.train
    if device is None:
        device = torch.device(f"cuda:{local_rank}" if tp.use_gpu else "cpu")
    data, params = config.inputs.materialize(config.params)
    resume_from, resumed_via = start_checkpoint, "ray" if start_checkpoint is not None else "none"
    downloaded: Path | None = None
    if resume_from is None and config.resume_from is not None:
        resume_from, resumed_via = _local_copy(config.resume_from), "config"
        downloaded = None if resume_from == config.resume_from else resume_from
    resumed_step = checkpoint_step(resume_from) if resume_from is not None else 0
    precision = resolve_precision(tp.precision, device)

    log_to_mlflow = rank == 0 and bool(config.mlflow_run_id)
    if log_to_mlflow:
        import mlflow

        from pipeline.tracking.store import quiet_mlflow_logs

        quiet_mlflow_logs()
        if config.tracking_uri:
            mlflow.set_tracking_uri(config.tracking_uri)

    holder: dict[str, Any] = {}

    def wrap(model):
        holder["model"] = model
        return wrap_model(model) if wrap_model is not None else model

    last_metrics: dict = {}
    reported: dict[str, str | None] = {"checkpoint": None}  # the last checkpoint this rank handed on

    def on_step(step: int) -> None:
        faults.maybe_fail(config.fault_plan, step, rank=rank, last_checkpoint=reported["checkpoint"])

    def report(metrics: dict, checkpoint_dir: Path | None) -> None:
        metrics = dict(metrics)
        metrics["resumed_from_step"] = resumed_step
        metrics["resumed_via"] = resumed_via  # ray: ray.train.get_checkpoint(); config: resume_from
        metrics["precision"] = precision
        last = int(metrics["step"]) >= tp.steps
        if last and "model" in holder:
            metrics["weights_sha256"] = weights_checksum(holder["model"])
        if log_to_mlflow:
            from pipeline.tracking.log import log_metrics

            try:
                log_metrics(metrics, step=int(metrics["step"]), run_id=config.mlflow_run_id)
            except Exception as err:  # tracking must not kill a training run
                _log.warning("MLflow logging failed at step %s: %s", metrics["step"], err)
        try:
            deliver(metrics, checkpoint_dir, last)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
        if checkpoint_dir is not None:
            reported["checkpoint"] = checkpoint_name(int(metrics["step"]))
        last_metrics.clear()
        last_metrics.update(metrics)

    try:
        train_loop(
            params,
            data,
            device=device,
            rank=rank,
            world_size=world_size,
            wrap_model=wrap,
            report=report,
            resume_from=Path(resume_from) if resume_from is not None else None,
            on_step=on_step,
        )
    finally:
        if downloaded is not None:
            shutil.rmtree(downloaded, ignore_errors=True)
    return dict(last_metrics)


def _local_copy(location: str | Path) -> Path:
    """A checkpoint in storage as a local folder: a plain path is one, a URI is downloaded."""
    import tempfile

    if not storage.is_uri(location):
        return Path(location)
    return storage.download_dir(location, Path(tempfile.mkdtemp(prefix="dbert-resume-")))


def train_worker(loop_config: dict) -> None:
    """The Ray Train worker function (`TorchTrainer(train_worker, train_loop_config=config.as_loop_config())`)."""
    import ray.train
    from ray.train import Checkpoint

    config = WorkerConfig.from_loop_config(loop_config)
    ctx = ray.train.get_context()
    rank, world_size, local_rank = ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank()
    local_mode = config.local_mode
    if not local_mode:
        _quiet_worker_reports()
    sink = local_sink(config.sink_id)

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
                kept = persist_checkpoint(checkpoint_dir, config.run_dir, step, config.keep_checkpoints)
                checkpoint = Checkpoint(str(kept))  # a local folder or a URI in train.storage
            ray.train.report(metrics, checkpoint=checkpoint)
            if sink is not None and rank == 0:
                sink(dict(metrics, checkpoint_path=checkpoint.path if checkpoint else None))
            return
        if checkpoint_dir is not None:
            checkpoint = Checkpoint.from_directory(str(checkpoint_dir))
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(step))

    start = ray.train.get_checkpoint()
    with start.as_directory() if start is not None else contextlib.nullcontext(None) as directory:
        train_worker_body(
            config,
            rank=rank,
            world_size=world_size,
            local_rank=local_rank,
            start_checkpoint=Path(directory) if directory is not None else None,
            deliver=deliver,
            device=device,
            wrap_model=wrap_model,
        )


def _quiet_worker_reports() -> None:
    """Ray 2.60 logs every `ray.train.report` at INFO through a logger named after its file, which
    `LoggingConfig(log_level)` does not reach (it filters `ray.train.*` names only)."""
    try:
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(train_log_level().upper())
    except Exception:  # a Ray without that module: only the log volume changes
        pass
