"""Logging to MLflow from any process of a run: rank 0 only, finite numbers only, never a run
MLflow would start on its own (`run_id`, or the active run, or nothing), and best effort
(`pipeline.tracking.failures`): a failure to log never costs the stage its outputs."""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pipeline.tracking.failures import best_effort
from pipeline.tracking.runs import safe_key

F = TypeVar("F", bound=Callable[..., Any])


def global_rank() -> int:
    """This process's rank: torch.distributed when initialised, else `$RANK`, else 0."""
    torch = sys.modules.get("torch")  # never import torch just to learn we are alone
    if torch is not None:
        dist = getattr(torch, "distributed", None)
        try:
            if dist is not None and dist.is_available() and dist.is_initialized():
                return int(dist.get_rank())
        except Exception:  # pragma: no cover - half-initialised backends
            pass
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def rank_zero_only(fn: F) -> F:
    """Run `fn` on rank 0 only; other ranks get None."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if global_rank() != 0:
            return None
        return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _has_target(run_id: str | None) -> bool:
    """A run to log to: an explicit id, or an active run (never let MLflow start one)."""
    if run_id is not None:
        return True
    if "mlflow" not in sys.modules:
        return False
    import mlflow

    return mlflow.active_run() is not None


def _as_float(value: Any) -> float | None:
    if isinstance(value, (bool, str, bytes)):
        return None
    if hasattr(value, "numel") and hasattr(value, "item"):  # a torch tensor
        try:
            if value.numel() != 1:
                return None
            value = value.item()
        except Exception:
            return None
    elif hasattr(value, "item") and getattr(value, "size", None) == 1:  # a numpy scalar/array
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


@rank_zero_only
@best_effort
def log_metrics(metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> dict[str, float]:
    """Log the finite numeric entries of `metrics` (others are skipped); what was logged.

    Logs to `run_id` or the active run; a no-op without either (and on ranks other than 0).
    """
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            clean[safe_key(str(key))] = number
    if not clean or not _has_target(run_id):
        return {}
    import mlflow

    mlflow.log_metrics(clean, step=step, run_id=run_id)
    return clean


@rank_zero_only
@best_effort
def log_artifact(path: Path | str, artifact_path: str | None = None, run_id: str | None = None) -> None:
    """Log a file, or a directory's contents, under `artifact_path` (rank 0, active run or `run_id`)."""
    if not _has_target(run_id):
        return
    import mlflow

    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path, run_id=run_id)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path, run_id=run_id)


@rank_zero_only
@best_effort
def log_dict_artifact(obj: Any, name: str, run_id: str | None = None) -> None:
    """Log `obj` as JSON at artifact path `name` (e.g. "reports/bound.json"); str() for the rest."""
    if not _has_target(run_id):
        return
    import mlflow

    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    mlflow.log_text(text, name, run_id=run_id)
