"""What a finished tune leaves: one row per trial, the trials' MLflow runs ended with Tune's
verdict, `trials.csv`, and the proposal (`best_params.yaml`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from pipeline.artifacts import csv_text, jsonable
from pipeline.errors import first_line
from pipeline.tune.space import METRIC, TIME_ATTR

_log = logging.getLogger(__name__)


def finite(value: Any) -> bool:
    """A real number that is not inf or nan (a trial that never reported has None)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def trial_row(result, values: dict[str, list], max_steps: int) -> dict:
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


def finish_trial_runs(table: list[dict], parent_run_id: str, uri: str) -> None:
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
            if finite(row.get(key)):
                client.log_metric(run.info.run_id, key if key != "steps" else "steps_reached", float(row[key]))
        # Tune's outcome decides: a stopped trial's run can end RUNNING (actor gone) or FAILED
        # (its TorchTrainer torn down under it) depending on who loses the race.
        wanted = "FAILED" if row["status"] == "error" else "FINISHED"
        if run.info.status != wanted:
            client.set_terminated(run.info.run_id, wanted)


def kill_trial_runs(parent_run_id: str, uri: str) -> None:
    """End every trial run still RUNNING under the tune's parent run as KILLED (best effort)."""
    import mlflow

    try:
        client = mlflow.MlflowClient(tracking_uri=uri)
        parent = client.get_run(parent_run_id)
        runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"
        )
        for run in runs:
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "KILLED")
    except Exception as err:  # the process is stopping anyway
        _log.warning("could not end the trial runs of %s as KILLED: %s", parent_run_id, err)


def trials_csv(table: list[dict], searched: list[str]) -> str:
    """The table as CSV: id, searched keys, bounds, steps, status first, then any other columns."""
    first = ["trial_id", *searched, "best_val_bound", "final_val_bound", "steps", "status"]
    keys = {k for row in table for k in row}
    columns = first + sorted(keys - set(first))
    return csv_text(columns, ([("" if row.get(k) is None else row[k]) for k in columns] for row in table))


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
    return header + yaml.safe_dump(jsonable(overrides), sort_keys=True, default_flow_style=False)


def _scalar(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)
