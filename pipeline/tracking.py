"""MLflow tracking: the store, experiment setup, one run per stage, rank-0 logging, UI and queries.

The store is embedded by default: `sqlite:///<abs project root>/mlflow.db` with artifacts under
`<abs project root>/mlartifacts` (MLflow 3 needs an explicit artifact location next to a sqlite
store). `MLFLOW_TRACKING_URI`, or an explicit `uri`, points everything at a tracking server
instead. Where the project root is: `pipeline.project`; what a run is tagged with:
`pipeline.lineage`.

Typical stage::

    with start_stage_run("train", params, deps=[Path("data/tokenized")]) as run:
        log_metrics({"loss": 1.2}, step=10)
        log_dict_artifact(report, "report.json")

Call `setup_tracking` (or enter `start_stage_run`) in the driver *before* Ray workers or Tune
trials start: creating the sqlite schema from several processes at once races. `setup_tracking`
also exports `MLFLOW_TRACKING_URI` (MLflow does so itself), so processes started afterwards
(a local Ray cluster's workers) log to the same store.

Importing this module is cheap: MLflow is imported lazily inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import numbers
import os
import posixpath
import re
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.lineage import lineage_tags
from pipeline.project import resolve_root

if TYPE_CHECKING:  # pragma: no cover
    import mlflow

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "diffusionbert"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"

# MLflow's limits (mlflow.utils.validation), repeated here so that importing stays cheap.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")
_QUIET_LOGGERS = ("alembic", "mlflow.store", "mlflow.tracking._tracking_service")

_log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])


def tracking_uri(root: Path | str | None = None) -> str:
    """`$MLFLOW_TRACKING_URI` when set, else `sqlite:///<abs root>/mlflow.db`."""
    env = os.environ.get(ENV_TRACKING_URI)
    if env:
        return env
    return f"sqlite:///{(resolve_root(root) / DB_NAME).as_posix()}"


def artifact_location(root: Path | str | None = None) -> str:
    """`file://<abs root>/mlartifacts`, the artifact root of the default store.

    Experiments that `setup_tracking` creates in a sqlite store keep artifacts in `mlartifacts`
    next to the database file, which for the default store is exactly this folder.
    """
    return (resolve_root(root) / ARTIFACT_DIR).as_uri()


def _is_local_store(uri: str) -> bool:
    """A store this process writes directly (a database or a folder), not a tracking server."""
    scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
    return scheme not in {"http", "https", "databricks", "databricks-uc", "uc"}


def _experiment_artifact_location(uri: str, root: Path | str | None) -> str | None:
    """Artifacts of new experiments: next to a sqlite db, under the root for other databases,
    the server's choice for a tracking server or a file store."""
    db = _sqlite_path(uri)
    if db is not None:
        return (db.resolve().parent / ARTIFACT_DIR).as_uri()
    if not _is_local_store(uri) or uri.startswith("file:") or "://" not in uri:
        return None
    return artifact_location(root)


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///") :].split("?", 1)[0]
        return Path(path) if path and path != ":memory:" else None
    return None


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first-time schema and experiment creation between processes on this machine."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    key = hashlib.md5(uri.encode("utf-8")).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"dbert-mlflow-{key}.lock"
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def quiet_mlflow_logs(level: int = logging.WARNING) -> None:
    """Silence alembic migrations and MLflow's store INFO chatter."""
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level)


def setup_tracking(experiment: str = DEFAULT_EXPERIMENT, root: Path | str | None = None, uri: str | None = None) -> str:
    """Point MLflow at the project store (or the store `uri` names), create `experiment` once,
    make it active; its id.

    Safe to call again and from concurrent processes: for a local store, schema and experiment
    creation run under an inter-process file lock (sqlite migrations from several processes at
    once corrupt `alembic_version`); a lost creation race re-reads the experiment; a deleted
    experiment of that name is restored. The lock only covers processes on this machine, so
    still call this in the driver before Ray workers or Tune trials start.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow_logs()
    uri = uri or tracking_uri(root)
    local = _is_local_store(uri)
    db = _sqlite_path(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)  # also exports MLFLOW_TRACKING_URI to child processes
    lock = _store_lock(uri) if local else contextlib.nullcontext()
    with lock:
        client = mlflow.MlflowClient(tracking_uri=uri)  # creates the sqlite schema if missing
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            location = _experiment_artifact_location(uri, root)
            try:
                exp_id = client.create_experiment(experiment, artifact_location=location)
            except MlflowException:
                exp = client.get_experiment_by_name(experiment)  # another process won the race
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            if exp.lifecycle_stage == "deleted":
                client.restore_experiment(exp_id)
    mlflow.set_experiment(experiment_id=exp_id)
    return str(exp_id)


def _safe_key(key: str) -> str:
    """A valid MLflow param/tag key: allowed characters only, normalised, <= 250 chars."""
    key = posixpath.normpath(_BAD_KEY_CHARS.sub("_", key)).lstrip("/")
    if key == "." or key.startswith(".."):
        key = "_" + key
    return key[:MAX_KEY_LENGTH].rstrip("/") or "_"


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def flat_params(params: Any) -> dict[str, str]:
    """`Params` (via `.flat()`), a nested or flat mapping, or None -> `{key: str(value)}`.

    Values are stringified and cut to MLflow's 6000-character limit.
    """
    if params is None:
        return {}
    if hasattr(params, "flat"):
        flat = params.flat()
    elif isinstance(params, Mapping):
        flat = _flatten(params)
    elif hasattr(params, "model_dump"):
        flat = _flatten(params.model_dump())
    else:
        raise TypeError(f"cannot log params of type {type(params).__name__}")
    return {_safe_key(str(k)): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flat.items()}


def default_run_name(stage: str) -> str:
    """`<stage>-<yyyymmdd-HHMMSS>-<4 hex>`: sortable and unique."""
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _experiment_of(params: Any) -> str | None:
    tracking = getattr(params, "tracking", None)
    if tracking is not None:
        return getattr(tracking, "experiment", None)
    if isinstance(params, Mapping):
        nested = params.get("tracking")
        if isinstance(nested, Mapping) and nested.get("experiment"):
            return str(nested["experiment"])
        if params.get("tracking.experiment"):
            return str(params["tracking.experiment"])
    return None


@contextlib.contextmanager
def start_stage_run(
    stage: str,
    params: Any = None,
    experiment: str | None = None,
    deps: list[Path] | list[str] | None = None,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, Any] | None = None,
    root: Path | str | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    uri: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Run one stage as one MLflow run: flattened params, lineage + extra tags.

    The experiment is `experiment`, else `params.tracking.experiment`, else "diffusionbert".
    `nested=True` nests under the active run, and so does any stage started while a run is
    active in this thread (the ablation's row runs hold their stages' runs); `parent_run_id`
    nests under a run started by another process (a Tune driver's run seen from a trial).
    `resume_run_id` reopens that run (an interrupted ablation going on). `uri` names the store
    when this process cannot derive it (a Tune trial logging to its driver's store). Yields the
    `mlflow.ActiveRun`; the run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block
    raises, and the exception propagates. In the main thread, SIGTERM / SIGINT / SIGHUP raise
    `pipeline.signals.Terminated` while the run is open, so a killed stage ends KILLED too.
    """
    import mlflow

    from pipeline.signals import held, terminate_on_signals

    name = experiment or _experiment_of(params) or DEFAULT_EXPERIMENT
    experiment_id = setup_tracking(name, root, uri)
    all_tags = lineage_tags(stage, deps, root)
    all_tags.update({str(k): v for k, v in (tags or {}).items()})
    safe_tags = {_safe_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in all_tags.items()}
    nested = nested or (parent_run_id is None and mlflow.active_run() is not None)
    # SIGTERM / SIGINT / SIGHUP raise Terminated (a KeyboardInterrupt) while the run is open, so
    # a killed stage ends its run KILLED; a signal while the run is being opened or ended waits.
    with terminate_on_signals():
        run_id = None
        status = "FINISHED"
        try:
            with held():
                if resume_run_id is not None:
                    run = mlflow.start_run(run_id=resume_run_id, nested=nested)
                    run_id = run.info.run_id
                    mlflow.set_tags(safe_tags)
                else:
                    run = mlflow.start_run(
                        experiment_id=experiment_id,
                        run_name=run_name or default_run_name(stage),
                        nested=nested,
                        parent_run_id=parent_run_id,
                        tags=safe_tags,
                    )
                    run_id = run.info.run_id
            flat = flat_params(params)
            if flat:
                mlflow.log_params(flat, run_id=run_id)
            yield run
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            if run_id is not None:
                with held():
                    _end_run(run_id, status)


def _end_run(run_id: str, status: str) -> None:
    """End `run_id` and any run left open inside it; never ends runs outside it."""
    import mlflow

    stack_ids = []
    active = mlflow.active_run()
    while active is not None and active.info.run_id != run_id and active.info.run_id not in stack_ids:
        stack_ids.append(active.info.run_id)
        mlflow.end_run(status)  # a nested run the block forgot to end
        active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:  # no longer on this thread's stack: terminate it directly
        mlflow.MlflowClient().set_terminated(run_id, status)


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
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
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
def log_metrics(metrics: Mapping[str, Any], step: int | None = None, run_id: str | None = None) -> dict[str, float]:
    """Log the finite numeric entries of `metrics` (others are skipped); what was logged.

    Logs to `run_id` or the active run; a no-op without either (and on ranks other than 0).
    """
    clean: dict[str, float] = {}
    for key, value in metrics.items():
        number = _as_float(value)
        if number is not None:
            clean[_safe_key(str(key))] = number
    if not clean or not _has_target(run_id):
        return {}
    import mlflow

    mlflow.log_metrics(clean, step=step, run_id=run_id)
    return clean


@rank_zero_only
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
def log_dict_artifact(obj: Any, name: str, run_id: str | None = None) -> None:
    """Log `obj` as JSON at artifact path `name` (e.g. "reports/bound.json"); str() for the rest."""
    if not _has_target(run_id):
        return
    import mlflow

    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    mlflow.log_text(text, name, run_id=run_id)


def ui_command(host: str = "127.0.0.1", port: int = 5000, root: Path | str | None = None) -> list[str]:
    """argv for `mlflow ui` over the project store (binds 127.0.0.1 unless told otherwise)."""
    uri = tracking_uri(root)
    if not _is_local_store(uri):
        raise ValueError(f"MLFLOW_TRACKING_URI={uri} is already a tracking server: open it directly")
    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        uri,
        "--default-artifact-root",
        _experiment_artifact_location(uri, root) or artifact_location(root),
        "--host",
        host,
        "--port",
        str(int(port)),
    ]


def find_runs(
    experiment: str = DEFAULT_EXPERIMENT, stage: str | None = None, root: Path | str | None = None
) -> list[dict[str, Any]]:
    """Runs of `experiment` (newest first), optionally of one stage.

    Each: run_id, run_name, status, start_time (ms), metrics, params, tags. [] when the
    experiment does not exist. Reads the store `tracking_uri(root)` names.
    """
    import mlflow

    quiet_mlflow_logs()
    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    filter_string = ""
    if stage is not None:
        escaped = stage.replace("'", "\\'")
        filter_string = f"tags.stage = '{escaped}'"
    out: list[dict[str, Any]] = []
    page_token = None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=filter_string,
            order_by=["attributes.start_time DESC"],
            max_results=1000,
            page_token=page_token,
        )
        for run in page:
            out.append(
                {
                    "run_id": run.info.run_id,
                    "run_name": run.info.run_name,
                    "status": run.info.status,
                    "start_time": run.info.start_time,
                    "metrics": dict(run.data.metrics),
                    "params": dict(run.data.params),
                    "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
                }
            )
        page_token = page.token
        if not page_token:
            return out
