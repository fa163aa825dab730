"""The environment every test runs in, defined once.

`OFFLINE`: no hub, no telemetry, no Ray auth (conftest sets these for this process; the mutation
runner passes them to its copies). `PROJECT_ENV`: the variables that point a process at another
MLflow store, run, project, corpus or rank; a test starts without them (the `clean_env` fixture,
or `without_project_env()` in module-scoped fixtures) and child processes get none of them.
"""

from __future__ import annotations

import sys

import pytest

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
}

PROJECT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "DBERT_PROJECT_ROOT",
    "DBERT_LM1B_DIR",
    "DBERT_DEBUG",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
    "RANK",
)


def without_project_env(mp: pytest.MonkeyPatch | None = None) -> pytest.MonkeyPatch:
    """Unset every `PROJECT_ENV` variable until `mp.undo()`.

    Each is set, then deleted, so that undo() restores it also when MLflow exports it meanwhile
    (`mlflow.set_tracking_uri` writes MLFLOW_TRACKING_URI into os.environ).
    """
    mp = mp or pytest.MonkeyPatch()
    for key in PROJECT_ENV:
        mp.setenv(key, "unset-by-test")
        mp.delenv(key)
    return mp


def end_active_runs() -> None:
    """End MLflow runs a failed test left open in this thread (never imports MLflow for it)."""
    if "mlflow" not in sys.modules:
        return
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
