"""One Tune trial (it runs in a Tune actor): its params, its nested MLflow run, training on Ray
Train workers (or in the trial's own process with `train.num_workers=0`), reports to Tune."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.errors import first_line
from pipeline.train.ray import faults
from pipeline.train.ray.inputs import TrainInputs
from pipeline.train.ray.storage import join, local_path
from pipeline.tune.space import METRIC, trial_params

TRIAL_CPU = 0.01  # what each trial's driver function holds while its workers train
TRIAL_STAGE = "tune_trial"


def trial_cpus(params: Params) -> float:
    """The CPUs a trial holds: a sliver while Ray Train workers train, but the training's own
    `train.cpus_per_worker` when the trial trains in its own process (`train.num_workers=0`), so
    Ray never packs more in-process trials than cores and gives each one that many threads
    (with a sliver, Ray starts the trial on a single thread)."""
    return params.train.cpus_per_worker if params.train.num_workers == 0 else TRIAL_CPU


def tune_trial(config: dict, *, setup: dict) -> None:
    """One trial: apply its config, open its nested MLflow run, train, report to Tune."""
    from ray import tune

    params = trial_params(setup["params"], config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    storage = setup["train_storage"]  # a path or URI in train.storage
    run_name = f"trial-{trial_id}"
    run_dir = join(storage, run_name)

    tracking = setup.get("tracking")
    uri = tracking["uri"] if tracking else None  # the driver's store: the cluster may predate its environment
    run_cm: contextlib.AbstractContextManager[Any] = contextlib.nullcontext(None)
    if tracking:
        from pipeline.tracking.runs import start_stage_run

        run_cm = start_stage_run(
            TRIAL_STAGE,
            params,
            experiment=params.tracking.experiment,
            run_name=f"{setup['tune_name']}-{trial_id}",
            parent_run_id=tracking["parent_run_id"],
            tags={
                "trial_id": trial_id,
                "tune_run": setup["tune_name"],
                "trial_name": context.get_trial_name(),
                **{f"trial.{k}": v for k, v in config.items()},
            },
            root=tracking.get("root"),
            uri=uri,
        )

    stopped: SystemExit | None = None
    with run_cm as run:
        try:
            _train_trial(
                params,
                setup["inputs"],
                run_dir,
                storage,
                run_name,
                run.info.run_id if run is not None else None,
                uri,
                setup.get("faults") or {},
            )
        except SystemExit as stop:
            # Tune stops a trial (ASHA, or max_t reached) with sys.exit(0) inside tune.report;
            # that is an outcome, not a failure of the MLflow run. (A trial on Ray workers is
            # instead ended from outside; the driver closes its run, see _finish_trial_runs.)
            stopped = stop
        except Exception as err:
            if run is not None:  # why, next to Tune's own verdict (see _finish_trial_runs)
                from mlflow import MlflowClient

                MlflowClient(tracking_uri=uri).set_tag(run.info.run_id, "trial_exception", first_line(err)[:500])
            raise
    if stopped is not None:
        raise stopped


def _train_trial(
    params: Params,
    inputs: TrainInputs,
    run_dir: str | Path,
    storage: str | Path,
    run_name: str,
    run_id: str | None,
    tracking_uri: str | None,
    fault_env: dict[str, str],
) -> None:
    from ray import tune

    from pipeline.train.ray.cluster import check_placement, run_config_for, scaling_config_for
    from pipeline.train.ray.runs import persist_checkpoint
    from pipeline.train.ray.worker import WorkerConfig, train_worker, train_worker_body

    local = local_path(run_dir)
    plan = faults.plan_from_env(local, params.train.num_workers == 0, fault_env) if local is not None else None
    worker_config = WorkerConfig.for_run(
        params, inputs, run_dir, mlflow_run_id=run_id, tracking_uri=tracking_uri, fault_plan=plan
    )
    if params.train.num_workers == 0:
        import torch

        torch.set_num_threads(max(1, int(trial_cpus(params))))  # Ray's OMP_NUM_THREADS follows the request

        def deliver(metrics: dict, checkpoint_dir: Path | None, last: bool) -> None:
            if checkpoint_dir is not None:
                persist_checkpoint(checkpoint_dir, run_dir, int(metrics["step"]))
            if METRIC in metrics:
                tune.report(_tune_metrics(metrics))

        train_worker_body(worker_config, rank=0, world_size=1, local_rank=0, start_checkpoint=None, deliver=deliver)
        return
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    check_placement(
        params.train.num_workers,
        params.train.cpus_per_worker,
        params.train.use_gpu,
        reserve_cpus=TRIAL_CPU,
        wait_s=params.train.placement_timeout_s,
    )
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=worker_config.as_loop_config(),
        scaling_config=scaling_config_for(params),
        run_config=run_config_for(params, run_name, storage, [TuneReportCallback()]),
    )
    trainer.fit()


def _tune_metrics(metrics: dict) -> dict:
    """What Tune keeps per report: numbers and short strings (no checksums)."""
    return {k: v for k, v in metrics.items() if k != "weights_sha256"}
