"""The MLflow store: where it is (`tracking_uri`), experiment setup, the UI command, queries.

Importing this module is cheap: MLflow is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.project import resolve_root

ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
DEFAULT_EXPERIMENT = "diffusionbert"
DB_NAME = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
_QUIET_LOGGERS = ("alembic", "mlflow.store", "mlflow.tracking._tracking_service")
_WARNED: set[tuple[str, str, str | None]] = set()


# MLflow waits minutes per call on a server that does not answer (7 retries, 120 s timeouts);
# a stage waits at most about a minute per call, then goes on without tracking. Set any of these
# in the environment to choose otherwise.
SERVER_HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}
PREFLIGHT_TIMEOUT_S = 5.0


class TrackingServerUnavailable(ConnectionError):
    """The tracking server the URI names does not answer: the stage stops before any work."""


def check_tracking_server(uri: str, timeout: float = PREFLIGHT_TIMEOUT_S) -> None:
    """For an http(s) tracking server: bound MLflow's retries (`SERVER_HTTP_LIMITS`, unless set)
    and ask `<uri>/health` once, raising `TrackingServerUnavailable` (one line naming the URI)
    within `timeout` seconds when it does not answer. Other stores: nothing to check."""
    if urllib.parse.urlparse(uri).scheme.lower() not in {"http", "https"}:
        return
    for name, value in SERVER_HTTP_LIMITS.items():
        os.environ.setdefault(name, value)
    # A server on this machine is asked directly, never through a proxy of the environment.
    reason = health_problem(uri, timeout, direct=_is_loopback_server(uri))
    if reason is None:
        return
    raise TrackingServerUnavailable(
        f"the MLflow tracking server {uri} does not answer ({reason}); start it (dbert mlflow-server) "
        f"or unset MLFLOW_TRACKING_URI to track in the project's own store"
    )


def health_problem(url: str, timeout: float, *, direct: bool) -> str | None:
    """Why `<url>/health` does not answer 200 within `timeout` seconds, or None when it does;
    `direct` bypasses the environment's proxies."""
    opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if direct else []))
    try:
        with opener.open(f"{url.rstrip('/')}/health", timeout=timeout) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except urllib.error.HTTPError as err:
        return f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:
        return str(getattr(err, "reason", err)) or type(err).__name__


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


def is_tracking_server(uri: str) -> bool:
    """`uri` names a tracking server (http(s), Databricks), not a store this process writes."""
    return not _is_local_store(uri)


def local_artifact_root(uri: str, root: Path | str | None = None) -> Path:
    """Where artifacts of the local store `uri` live: `mlartifacts` next to a sqlite database,
    else `<root>/mlartifacts` (also what `dbert mlflow-server` serves them from)."""
    location = _experiment_artifact_location(uri, root) or artifact_location(root)
    return Path(urllib.request.url2pathname(urllib.parse.urlparse(location).path))


def _is_local_file_location(location: str | None) -> bool:
    """An artifact location on the file system of whoever reads it (file: URI or a plain path),
    as opposed to one a server resolves (`mlflow-artifacts:`, http, s3, ...)."""
    if not location:
        return False
    scheme = urllib.parse.urlparse(location).scheme.lower()
    return scheme in {"", "file"} or len(scheme) == 1  # a Windows drive letter


def _is_loopback_server(uri: str) -> bool:
    host = (urllib.parse.urlparse(uri).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_local_artifacts(uri: str, name: str, location: str | None) -> None:
    """A tracking server whose experiment keeps artifacts on a local path: a client on another
    machine would write them to its own disk, where nobody finds them. Said once per process."""
    key = (uri, name, location)
    if key in _WARNED or not _is_local_file_location(location) or _is_loopback_server(uri):
        return
    _WARNED.add(key)
    logging.getLogger(__name__).warning(
        "MLflow experiment %r on %s keeps its artifacts at %s, a path on the machine that created it: "
        "a run logged from another machine writes them to that machine's own disk, not to the server. "
        "Log to an experiment the server creates (tracking.experiment=<new name>): its artifacts go "
        "through the server.",
        name,
        uri,
        location,
    )


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

    On a tracking server (`http(s)://`) a new experiment gets no artifact location from here: the
    server picks it (`mlflow-artifacts:/<id>` when it serves artifacts, as `dbert mlflow-server`
    does), so artifacts are uploaded through HTTP. An existing experiment created with a local
    path (by the embedded store) keeps it; from a server that is not on this machine's loopback
    interface that is logged as a warning, once.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow_logs()
    uri = uri or tracking_uri(root)
    check_tracking_server(uri)
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
            if not local:
                warn_local_artifacts(uri, experiment, exp.artifact_location)
    mlflow.set_experiment(experiment_id=exp_id)
    return str(exp_id)


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
