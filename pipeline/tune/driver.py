"""Ray Tune over Ray Train: a grid over the time-conditioning design (and, when params ask for
them, lr and the spindle lambda), ASHA on the validation bound, one nested MLflow run per trial,
and a proposal file with the winning overrides. params.yaml is never edited.

Train V2 shape (Ray 2.60): `Tuner(trainer)` is gone. Each trial is a *function* trainable that
holds a sliver of CPU (`{"cpu": 0.01}`) and starts its own TorchTrainer whose
`TuneReportCallback` forwards rank 0's reports (`step`, `val_bound`) to Tune, so ASHA can stop
it. With `train.num_workers=0` the trial trains in its own process instead: Ray Train's local
mode cannot run inside a Tune trial (there `ray.train.report` raises and tells you to use
`ray.tune.report`), so the trial reports to Tune directly.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import Layout, atomic_directory, write_json
from pipeline.config import Params, params_from_dict
from pipeline.errors import first_line

METRIC = "val_bound"
MODE = "min"
TIME_ATTR = "step"
TRIAL_CPU = 0.01  # what each trial's driver function holds while its workers train
TRIAL_STAGE = "tune_trial"
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"

_log = logging.getLogger(__name__)


class TuneConfigError(ValueError):
    """A search space that cannot be run as asked; the message names the key."""


@dataclass
class TuneOutcome:
    table: list[dict]  # one row per trial: id, searched values, best/final val_bound, steps, status
    best: dict  # the best row, plus "overrides" ({"model.time_design": ..., ...})
    proposal_path: Path  # best_params.yaml


# ---------------------------------------------------------------------------------------------
# Search space and trial params
# ---------------------------------------------------------------------------------------------


def search_values(params: Params) -> dict[str, list]:
    """`dotted.key -> values` searched (before wrapping in `tune.grid_search`)."""
    from pipeline.diffusion.schedules import max_spindle_lambda

    tn = params.tune
    if not tn.time_designs:
        raise TuneConfigError("tune.time_designs is empty: name at least one time design to tune")
    values: dict[str, list] = {"model.time_design": list(dict.fromkeys(tn.time_designs))}
    if tn.lrs:
        values["train.lr"] = [float(v) for v in dict.fromkeys(tn.lrs)]
    if tn.spindle_lambdas:
        steps = params.diffusion.num_timesteps
        limit = max_spindle_lambda(steps)
        too_big = [v for v in tn.spindle_lambdas if v > limit]
        if too_big:
            raise TuneConfigError(
                f"tune.spindle_lambdas: {', '.join(f'{v:g}' for v in too_big)} above {limit:.4f}, the largest "
                f"lambda that keeps alpha_t monotone for diffusion.num_timesteps={steps}"
            )
        values["diffusion.spindle_lambda"] = [float(v) for v in dict.fromkeys(tn.spindle_lambdas)]
    return values


def search_space(params: Params) -> dict:
    """The Tune param_space: one `tune.grid_search` per searched key (dotted names)."""
    from ray import tune

    return {key: tune.grid_search(values) for key, values in search_values(params).items()}


def fixed_overrides(params: Params) -> dict[str, Any]:
    """What every trial changes besides the searched keys: the tune budget replaces train.steps,
    one checkpoint at the end (so every report carries val_bound), and an evaluation at least
    every grace period (so ASHA's first rung sees a bound)."""
    steps = params.tune.steps
    return {
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.eval_every": max(1, min(params.train.eval_every, params.tune.grace_period, steps)),
    }


def trial_params(params: Params | dict, config: dict[str, Any]) -> Params:
    """Base params + the fixed tune overrides + one trial's `dotted.key -> value` config."""
    raw = params.model_dump() if isinstance(params, Params) else _copy(params)
    base = params if isinstance(params, Params) else params_from_dict(_copy(params))
    for key, value in {**fixed_overrides(base), **config}.items():
        group, _, name = key.partition(".")
        if group not in raw or not name:
            raise TuneConfigError(f"trial config key {key!r} is not a params key")
        raw[group][name] = value
    return params_from_dict(raw)


def _copy(raw: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}


# ---------------------------------------------------------------------------------------------
# The trial (runs in a Tune actor)
# ---------------------------------------------------------------------------------------------


def tune_trial(config: dict, *, setup: dict) -> None:
    """One trial: apply its config, open its nested MLflow run, train, report to Tune."""
    from ray import tune

    params = trial_params(setup["params"], config)
    context = tune.get_context()
    trial_id = context.get_trial_id()
    layout = Layout(Path(setup["root"]))
    storage = Path(setup["train_storage"])
    run_name = f"trial-{trial_id}"
    run_dir = storage / run_name

    tracking = setup.get("tracking")
    uri = tracking["uri"] if tracking else None  # the driver's store: the cluster may predate its environment
    if tracking:
        from pipeline.tracking import start_stage_run

        run_cm = start_stage_run(
            TRIAL_STAGE,
            params,
            experiment=params.tracking.experiment,
            run_name=f"{setup['tune_name']}-{trial_id}",
            parent_run_id=tracking["parent_run_id"],
            tags={"trial_id": trial_id, "tune_run": setup["tune_name"], "trial_name": context.get_trial_name(),
                  **{f"trial.{k}": v for k, v in config.items()}},
            root=tracking.get("root"),
            uri=uri,
        )
    else:
        run_cm = contextlib.nullcontext(None)

    stopped: SystemExit | None = None
    with run_cm as run:
        try:
            _train_trial(params, layout, run_dir, storage, run_name, run.info.run_id if run is not None else None,
                         uri)
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


def _train_trial(params: Params, layout: Layout, run_dir: Path, storage: Path, run_name: str,
                 run_id: str | None, tracking_uri: str | None) -> None:
    from ray import tune

    from pipeline.train.ray.cluster import check_placement, run_config_for, scaling_config_for
    from pipeline.train.ray.runs import persist_checkpoint
    from pipeline.train.ray.worker import WorkerConfig, train_worker, train_worker_body

    # no fault plan: the training test hook never fires in tune trials
    worker_config = WorkerConfig.for_run(params, layout, run_dir, mlflow_run_id=run_id, tracking_uri=tracking_uri)
    if params.train.num_workers == 0:

        def deliver(metrics: dict, checkpoint_dir: Path | None, last: bool) -> None:
            if checkpoint_dir is not None:
                persist_checkpoint(checkpoint_dir, run_dir, int(metrics["step"]))
            if METRIC in metrics:
                tune.report(_tune_metrics(metrics))

        train_worker_body(worker_config, rank=0, world_size=1, local_rank=0, start_checkpoint=None,
                          deliver=deliver)
        return
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    check_placement(params.train.num_workers, params.train.cpus_per_worker, params.train.use_gpu,
                    reserve_cpus=TRIAL_CPU)
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


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def run_tune(params: Params, layout: Layout, *, parent_run_id: str | None = None) -> TuneOutcome:
    """Run the grid with ASHA, write outputs/tune/{trials.csv, results.json, best_params.yaml}.

    With `parent_run_id`, every trial is an MLflow run nested under it (the store is set up here,
    before any trial starts). Returns the table, the best trial and the proposal's path.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.train.ray.cluster import check_placement, init_ray
    from pipeline.train.ray.runs import new_run_name

    values = search_values(params)  # validates before Ray starts
    tp, tn = params.train, params.tune
    started = init_ray()
    check_placement(tp.num_workers, tp.cpus_per_worker, tp.use_gpu, reserve_cpus=TRIAL_CPU)

    tracking = None
    if parent_run_id:
        from pipeline.project import ENV_PROJECT_ROOT, project_root
        from pipeline.tracking import setup_tracking, tracking_uri

        setup_tracking(params.tracking.experiment)  # creates the store once, here, not in trials
        tracking = {"uri": tracking_uri(), "parent_run_id": parent_run_id,
                    "root": os.environ.get(ENV_PROJECT_ROOT) or str(project_root())}

    tune_name = new_run_name("tune")
    storage = layout.ray_results.resolve()
    setup = {
        "params": params.model_dump(),
        "root": str(layout.root.resolve()),
        "tune_name": tune_name,
        "train_storage": str(storage / f"{tune_name}-train"),
        "tracking": tracking,
    }
    grace = min(tn.grace_period, tn.steps)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, setup=setup), {"cpu": TRIAL_CPU}),
        param_space=search_space(params),
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(metric=METRIC, mode=MODE, time_attr=TIME_ATTR, grace_period=grace,
                                    max_t=tn.steps),
            num_samples=tn.num_samples,
            max_concurrent_trials=tn.max_concurrent,
        ),
        run_config=tune.RunConfig(name=tune_name, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )
    grid = fit_tuner(tuner, started, parent_run_id, tracking["uri"] if tracking else None)

    table = [_row(result, values, tn.steps) for result in grid]
    if tracking:
        _finish_trial_runs(table, parent_run_id, tracking["uri"])
    scored = [row for row in table if _finite(row.get("best_val_bound"))]
    if not scored:
        errors = "; ".join(f"{r['trial_id']}: {r.get('error')}" for r in table if r.get("error"))
        raise RuntimeError(f"tune run {tune_name}: no trial reported {METRIC}" + (f" ({errors})" if errors else ""))
    best_row = min(scored, key=lambda r: r["best_val_bound"])
    overrides = {key: best_row[key] for key in values}
    best = {**best_row, "overrides": overrides}

    out = layout.tune_out
    results = {
        "tune_run": tune_name,
        "metric": METRIC,
        "mode": MODE,
        "time_attr": TIME_ATTR,
        "search_space": values,
        "fixed_overrides": fixed_overrides(params),
        "scheduler": {"name": "ASHA", "grace_period": grace, "max_t": tn.steps},
        "num_samples": tn.num_samples,
        "best": best,
        "trials": table,
        "parent_run_id": parent_run_id,
        "storage_path": str(storage / tune_name),
    }
    with atomic_directory(out) as tmp:  # the three files appear together, or not at all
        (tmp / "trials.csv").write_text(_table_csv(table, list(values)), encoding="utf-8")
        write_json(_jsonable(results), tmp / "results.json")
        (tmp / "best_params.yaml").write_text(proposal_yaml(overrides, best_row, tune_name), encoding="utf-8")
    proposal = out / "best_params.yaml"
    if parent_run_id:
        from pipeline.tracking import log_metrics

        log_metrics({"best_val_bound": best_row["best_val_bound"]}, run_id=parent_run_id)
    _log.info("tune run %s: best %s=%.6g with %s", tune_name, METRIC, best_row["best_val_bound"], overrides)
    return TuneOutcome(table=table, best=best, proposal_path=proposal)


def fit_tuner(tuner, started: bool, parent_run_id: str | None, uri: str | None):
    """`tuner.fit()`, stoppable: Ctrl-C and SIGTERM (`pipeline.signals`) stop the whole tune.

    Tune's own SIGINT handler would end the experiment "gracefully" and return the partial grid,
    which then looked like a finished tune; it is switched off, so SIGINT raises like SIGTERM.
    On the way out the Ray connection this driver made is shut down (the trial actors die with
    it) and the trials' MLflow runs, which those actors can no longer end, are ended KILLED.
    """
    with _tune_sigint_handler_off():
        try:
            return tuner.fit()
        except KeyboardInterrupt:
            from pipeline.train.ray.cluster import stop_ray

            stop_ray(started)
            if parent_run_id and uri:
                _kill_trial_runs(parent_run_id, uri)
            raise


@contextlib.contextmanager
def _tune_sigint_handler_off() -> Iterator[None]:
    """Set `TUNE_DISABLE_SIGINT_HANDLER=1` around `tuner.fit()` and put the old value back: Ray
    Tune 2.60 reads this variable in the driver process and offers no argument for it."""
    saved = os.environ.get(TUNE_SIGINT_ENV)
    os.environ[TUNE_SIGINT_ENV] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TUNE_SIGINT_ENV, None)
        else:
            os.environ[TUNE_SIGINT_ENV] = saved


def _kill_trial_runs(parent_run_id: str, uri: str) -> None:
    """End every trial run still RUNNING under the tune's parent run as KILLED (best effort)."""
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = client.get_run(parent_run_id)
        runs = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # the process is stopping anyway
        _log.warning("could not end the trial runs of %s as KILLED: %s", parent_run_id, err)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _row(result, values: dict[str, list], max_steps: int) -> dict:
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id") or (Path(result.path).name if result.path else "?")
    row: dict[str, Any] = {"trial_id": trial_id}
    for key in values:
        row[key] = (result.config or {}).get(key)
    frame = result.metrics_dataframe
    bounds, steps = [], []
    if frame is not None and len(frame):
        if METRIC in frame:
            bounds = [float(v) for v in frame[METRIC].dropna().tolist()]
        if TIME_ATTR in frame:
            steps = [int(v) for v in frame[TIME_ATTR].dropna().tolist()]
    row["best_val_bound"] = min(bounds) if bounds else None
    row["final_val_bound"] = bounds[-1] if bounds else None
    row["steps"] = max(steps) if steps else 0
    if result.error is not None:
        row["status"] = "error"
        row["error"] = first_line(result.error, with_type=False)
    else:
        row["status"] = "completed" if row["steps"] >= max_steps else "stopped_early"
    return row


def _finish_trial_runs(table: list[dict], parent_run_id: str, uri: str) -> None:
    """Tag each trial's MLflow run with Tune's outcome, log its best bound and steps, and set its
    status from that outcome: Tune ends a stopped trial's actor without unwinding the trial
    function, so the run itself cannot tell "stopped by ASHA / max_t" from "failed"."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    by_trial = {r.data.tags.get("trial_id"): r for r in runs}
    for row in table:
        run = by_trial.get(row["trial_id"])
        if run is None:
            continue
        row["mlflow_run_id"] = run.info.run_id
        client.set_tag(run.info.run_id, "tune_status", row["status"])
        for key in ("best_val_bound", "steps"):
            if _finite(row.get(key)):
                client.log_metric(run.info.run_id, key if key != "steps" else "steps_reached", float(row[key]))
        # Tune's outcome decides: a stopped trial's run can end RUNNING (actor gone) or FAILED
        # (its TorchTrainer torn down under it) depending on who loses the race.
        wanted = "FAILED" if row["status"] == "error" else "FINISHED"
        if run.info.status != wanted:
            client.set_terminated(run.info.run_id, wanted)


def _table_csv(table: list[dict], searched: list[str]) -> str:
    first = ["trial_id", *searched, "best_val_bound", "final_val_bound", "steps", "status"]
    keys = {k for row in table for k in row}
    columns = first + sorted(keys - set(first))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n", restval="")
    writer.writeheader()
    for row in table:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
    return buffer.getvalue()


def proposal_yaml(overrides: dict[str, Any], best_row: dict, tune_name: str) -> str:
    """The proposal: only the winning overrides, as `dotted.key: value` lines."""
    import yaml

    sets = " ".join(f"-S {k}={_scalar(v)}" for k, v in overrides.items())
    header = (
        f"# Proposal from tune run {tune_name}: best {METRIC}={best_row['best_val_bound']:.6g} "
        f"(trial {best_row['trial_id']}, {best_row['steps']} steps).\n"
        "# Only the overrides; params.yaml is unchanged. Apply with `dbert tune --apply`,\n"
        f"# or `dvc exp run --temp {sets}` (the plain form rewrites params.yaml in the workspace).\n"
    )
    return header + yaml.safe_dump(_jsonable(overrides), sort_keys=True, default_flow_style=False)


def _scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (TypeError, ValueError):
            pass
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

