"""Ray Tune over Ray Train: a grid over the time-conditioning design (and, when params ask for
them, lr and the spindle lambda), ASHA on the validation bound, one nested MLflow run per trial,
and a proposal file with the winning overrides. params.yaml is never edited.

Train V2 shape (Ray 2.60): `Tuner(trainer)` is gone. Each trial is a *function* trainable that
holds a sliver of CPU (`{"cpu": 0.01}`) and starts its own TorchTrainer whose
`TuneReportCallback` forwards rank 0's reports (`step`, `val_bound`) to Tune, so ASHA can stop
it. With `train.num_workers=0` the trial trains in its own process instead: Ray Train's local
mode cannot run inside a Tune trial (there `ray.train.report` raises and tells you to use
`ray.tune.report`), so the trial reports to Tune directly, holding `train.cpus_per_worker` CPUs.

What is searched: `pipeline.tune.space`; one trial: `pipeline.tune.trial`; the table, the trials'
MLflow runs and the proposal: `pipeline.tune.results`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, jsonable, write_json
from pipeline.config import Params
from pipeline.tune.results import finish_trial_runs, finite, kill_trial_runs, proposal_yaml, trial_row, trials_csv
from pipeline.tune.space import METRIC, MODE, TIME_ATTR, fixed_overrides, search_space, search_values
from pipeline.tune.trial import trial_cpus, tune_trial

TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"

_log = logging.getLogger(__name__)


@dataclass
class TuneOutcome:
    table: list[dict]  # one row per trial: id, searched values, best/final val_bound, steps, status
    best: dict  # the best row, plus "overrides" ({"model.time_design": ..., ...})
    proposal_path: Path  # best_params.yaml


def run_tune(params: Params, layout: Layout, *, parent_run_id: str | None = None) -> TuneOutcome:
    """Run the grid with ASHA, write outputs/tune/{trials.csv, results.json, best_params.yaml}.

    With `parent_run_id`, every trial is an MLflow run nested under it (the store is set up here,
    before any trial starts). Returns the table, the best trial and the proposal's path.
    """
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from pipeline.train.ray.cluster import check_placement, init_ray
    from pipeline.train.ray.faults import fault_env
    from pipeline.train.ray.inputs import TrainInputs
    from pipeline.train.ray.runs import new_run_name
    from pipeline.train.ray.storage import RunStorage, check_reachable

    values = search_values(params)  # validates before Ray starts
    tp, tn = params.train, params.tune
    store = RunStorage.resolve(tp.storage, layout.root)
    inputs = TrainInputs.read(layout.prepared, layout.token_stats, params.model.name_or_path)
    started = init_ray()
    if tp.num_workers == 0:  # each trial trains in its own process: that process must fit on a node
        check_placement(1, trial_cpus(params), False, wait_s=tp.placement_timeout_s)
    else:
        check_placement(
            tp.num_workers,
            tp.cpus_per_worker,
            tp.use_gpu,
            reserve_cpus=trial_cpus(params),
            wait_s=tp.placement_timeout_s,
        )
    check_reachable(store)
    inputs = inputs.ship()  # trials and their workers may run on any node

    tracking = None
    if parent_run_id:
        from pipeline.project import ENV_PROJECT_ROOT, project_root
        from pipeline.tracking.store import setup_tracking, tracking_uri

        setup_tracking(params.tracking.experiment)  # creates the store once, here, not in trials
        tracking = {
            "uri": tracking_uri(),
            "parent_run_id": parent_run_id,
            "root": os.environ.get(ENV_PROJECT_ROOT) or str(project_root()),
        }

    tune_name = new_run_name("tune")
    setup = {
        "params": params.model_dump(),
        "inputs": inputs,
        "tune_name": tune_name,
        "train_storage": store.child(f"{tune_name}-train"),
        "tracking": tracking,
        "faults": fault_env(),  # test-only: the trials' processes never saw this environment
    }
    grace = min(tn.grace_period, tn.steps)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(tune_trial, setup=setup), {"cpu": trial_cpus(params)}),
        param_space=search_space(params),
        tune_config=tune.TuneConfig(
            scheduler=ASHAScheduler(metric=METRIC, mode=MODE, time_attr=TIME_ATTR, grace_period=grace, max_t=tn.steps),
            num_samples=tn.num_samples,
            max_concurrent_trials=tn.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=tune_name,
            storage_path=str(store.location),
            verbose=0,
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    grid = fit_tuner(tuner, started, parent_run_id, tracking["uri"] if tracking else None)

    table = [trial_row(result, values, tn.steps) for result in grid]
    if tracking and parent_run_id:
        finish_trial_runs(table, parent_run_id, tracking["uri"])
    scored = [row for row in table if finite(row.get("best_val_bound"))]
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
        "storage_path": str(store.child(tune_name)),
    }
    with atomic_directory(out) as tmp:  # the three files appear together, or not at all
        (tmp / "trials.csv").write_text(trials_csv(table, list(values)), encoding="utf-8")
        write_json(jsonable(results), tmp / "results.json")
        (tmp / "best_params.yaml").write_text(proposal_yaml(overrides, best_row, tune_name), encoding="utf-8")
    proposal = out / "best_params.yaml"
    if parent_run_id:
        from pipeline.tracking.log import log_metrics

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
                kill_trial_runs(parent_run_id, uri)
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
