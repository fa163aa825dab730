"""The served model in MLflow: log the export as a pyfunc into the train run, register it in the
Model Registry, and tag the registered version with the evaluate stage's numbers.

Why here and best effort: serving is bookkeeping around a model that is already trained and
exported. A store without a registry (a file store, a server that refuses it) or any other
failure to log is a warning, never a lost training run; the export in models/final stands.

Importing this module is cheap: MLflow and torch are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.tracking.failures import best_effort, tracking_failed
from pipeline.tracking.runs import MAX_TAG_VAL_LENGTH, safe_key

PIPELINE_DIR = Path(__file__).resolve().parents[1]  # the package that travels with the model
PYFUNC_NAME = "pyfunc"  # the logged model's name in the train run
METRIC_TAG_PREFIX = "metric."
# What `mlflow models serve` needs installed besides the shipped `pipeline` code.
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "PyYAML")

log = logging.getLogger(__name__)


def requirements() -> list[str]:
    """The packages above pinned to the versions installed here (unpinned when not installed).

    Given explicitly, so MLflow does not load the model in a subprocess to infer them."""
    pins = []
    for name in REQUIREMENTS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def log_pyfunc(export_dir: str | Path, name: str = PYFUNC_NAME):
    """Log `export_dir` as a `DiffusionBertPyfunc` into the active run; its `ModelInfo`.

    MLflow runs the input example through the model once while logging (a few denoising steps)."""
    import mlflow

    from pipeline.serving.pyfunc import EXPORT_ARTIFACT, DiffusionBertPyfunc, input_example, signature

    with _quiet_pickling_notes():
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=DiffusionBertPyfunc(),
            artifacts={EXPORT_ARTIFACT: str(Path(export_dir).resolve())},
            code_paths=[str(PIPELINE_DIR)],
            signature=signature(),
            input_example=input_example(),
            pip_requirements=requirements(),
        )


@contextlib.contextmanager
def _quiet_pickling_notes() -> Iterator[None]:
    """Without MLflow's advice to log models from code instead, which it prints on every log: the
    pickle holds only a reference to the class, which comes from the shipped `pipeline` code."""

    def advice(record: logging.LogRecord) -> bool:
        return "CloudPickle" not in record.getMessage()

    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    pyfunc_log.addFilter(advice)
    try:
        yield
    finally:
        pyfunc_log.removeFilter(advice)


def log_and_register(export_dir: str | Path, registered_model: str) -> Any | None:
    """Log the pyfunc into the active run and register it as `registered_model`; an empty name
    does neither (the ablation's rows: their models are compared, not served).

    The `ModelVersion`, or None: no active run, registration off, or a warning explained why not."""
    import mlflow

    if not registered_model:
        return None
    failed = tracking_failed()
    if failed is not None:
        log.warning("MLflow tracking failed (%s): the model is not logged as a pyfunc nor registered", failed)
        return None
    if mlflow.active_run() is None:
        log.warning("no active MLflow run: the model is not logged as a pyfunc nor registered")
        return None
    try:
        info = log_pyfunc(export_dir)
    except Exception as err:
        log.warning("could not log the model as an MLflow pyfunc (%s: %s); the export stays", type(err).__name__, err)
        return None
    try:
        return mlflow.register_model(info.model_uri, registered_model, tags={"source_stage": "train"})
    except Exception as err:
        log.warning(
            "could not register the model as %r in the MLflow Model Registry of %s (%s: %s); it is logged "
            "in the run as %s, register it later with mlflow.register_model(%r, %r), or set "
            "tracking.registered_model='' to skip logging and registration",
            registered_model,
            mlflow.get_registry_uri(),
            type(err).__name__,
            " ".join(str(err).split())[:300],
            info.model_uri,
            info.model_uri,
            registered_model,
        )
        return None


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """`metric.<key>` -> the value as text, for the finite numbers of `metrics` (flags as 0/1)."""
    tags = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            tags[safe_key(METRIC_TAG_PREFIX + str(key))] = repr(value)[:MAX_TAG_VAL_LENGTH]
    return tags


@best_effort
def attach_metrics(
    train_run_id: str | None, metrics: Mapping[str, Any], evaluate_run_id: str | None = None
) -> list[str]:
    """Tag every registered version logged by `train_run_id` with `metric_tags(metrics)` (and
    `evaluate_mlflow_run_id`); the `name/version` strings tagged. Uses the current tracking store;
    best effort like registration: [] with a warning when the registry cannot be searched, None
    once tracking failed in this process."""
    import mlflow

    if not train_run_id:
        return []
    client = mlflow.MlflowClient()
    try:
        versions = client.search_model_versions(f"run_id = '{train_run_id}'")
    except Exception as err:
        log.warning("cannot tag the registered model with the metrics (%s: %s)", type(err).__name__, err)
        return []
    tags = metric_tags(metrics)
    if evaluate_run_id:
        tags["evaluate_mlflow_run_id"] = evaluate_run_id
    tagged = []
    for version in versions:
        for key, value in tags.items():
            client.set_model_version_tag(version.name, version.version, key, value)
        tagged.append(f"{version.name}/{version.version}")
    return tagged
