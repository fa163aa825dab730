"""An MLflow tracking server over the project store that serves artifacts (`dbert mlflow-server`).

The server keeps runs in the store the pipeline writes by default (`<root>/mlflow.db`, or the
database `$MLFLOW_TRACKING_URI` names) and *serves* artifacts: clients upload and download them
through HTTP (`mlflow-artifacts:` URIs) and the server stores them under `<root>/mlartifacts`
(next to the sqlite database), so a Tune trial or a stage on another machine needs no shared
disk. Clients point at it with `MLFLOW_TRACKING_URI=http://<host>:<port>` (`export_lines`).

It binds 127.0.0.1 unless told otherwise: the server has no authentication, and anyone who
reaches it can read and change every run (`warnings`). `plan_server` builds the command line,
`serve` checks the port, starts the server in its own process group, waits until `/health`
answers, and stops the whole group when it returns or raises (Ctrl-C, SIGTERM).

Importing this module is cheap: it never imports MLflow (the server is a subprocess).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.tracking.store import health_problem, is_tracking_server, local_artifact_root, tracking_uri

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_WORKERS = 2
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
# MLflow 3 starts a job runner next to the server for its GenAI jobs; the pipeline has none.
SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
_ALL_INTERFACES = {"0.0.0.0", "::"}


class ServerError(OSError):
    """The server cannot start: a bad or taken port, an address not on this machine, a server
    that exits or never answers. An OSError, so the CLI prints it as one line."""


@dataclass(frozen=True)
class ServerPlan:
    """What `serve` starts: `command` (argv) with `env` added to the environment."""

    host: str
    port: int
    backend_store_uri: str
    artifacts_destination: Path
    command: list[str]
    env: dict[str, str] = field(default_factory=lambda: dict(SERVER_ENV))

    @property
    def local_url(self) -> str:
        """The URL on this machine (the loopback address when bound to every interface)."""
        if self.host == "0.0.0.0":
            return _url("127.0.0.1", self.port)
        if self.host == "::":
            return _url("::1", self.port)
        return _url(self.host, self.port)

    @property
    def is_open(self) -> bool:
        """Bound to an interface other machines can reach."""
        return not is_loopback(self.host)

    def shell_command(self) -> str:
        """The command as one shell line (the environment it adds first)."""
        prefix = [f"{key}={value}" for key, value in self.env.items()]
        return shlex.join([*prefix, *self.command])


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """`localhost` or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_port(port: int) -> int:
    """`port` when it is a TCP port a server can bind (1-65535); ValueError otherwise."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"--port must be a TCP port between 1 and 65535, got {port!r}")
    return port


def plan_server(
    root: Path | str | None = None,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = DEFAULT_WORKERS,
    allowed_hosts: str | None = None,
) -> ServerPlan:
    """`mlflow server` over the project store (`tracking_uri(root)`) serving artifacts from
    `local_artifact_root` (`<root>/mlartifacts` for the default store)."""
    check_port(port)
    host = host.strip()
    if not host:
        raise ValueError("--host must name an interface, e.g. 127.0.0.1 or 0.0.0.0")
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    uri = tracking_uri(root)
    if is_tracking_server(uri):
        raise ValueError(f"MLFLOW_TRACKING_URI={uri} is already a tracking server: unset it to serve the project store")
    destination = local_artifact_root(uri, root)
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(destination),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    return ServerPlan(host=host, port=port, backend_store_uri=uri, artifacts_destination=destination, command=command)


def local_artifact_experiments(uri: str) -> list[tuple[str, str]]:
    """(name, artifact location) of the active experiments of the sqlite store `uri` that keep
    artifacts on a local path (created by the embedded store, before the server). Read-only;
    [] for another database, a missing file or a store without MLflow's tables."""
    if not uri.startswith("sqlite:///"):
        return []
    path = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    if not path.is_file():
        return []
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)) as db:
            rows = db.execute(
                "SELECT name, artifact_location FROM experiments WHERE lifecycle_stage = 'active' ORDER BY name"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [(str(name), str(loc)) for name, loc in rows if loc and (loc.startswith("file:") or loc.startswith("/"))]


def warnings(plan: ServerPlan) -> list[str]:
    """Lines to print before starting: an open interface, and experiments whose artifacts other
    machines cannot upload through the server."""
    if not plan.is_open:
        return []
    lines = [
        f"warning: --host {plan.host} makes the MLflow server reachable from the network with no "
        f"authentication: anyone who reaches port {plan.port} can read, change and delete every run and "
        "artifact. Clients must reach it by a private IP or a name given with --allowed-hosts."
    ]
    for name, location in local_artifact_experiments(plan.backend_store_uri):
        lines.append(
            f"warning: experiment {name!r} keeps artifacts at {location} (a path, not served): a run "
            "logged to it from another machine writes its artifacts to that machine's disk. Log remote "
            "runs to a new experiment (--set tracking.experiment=NAME); the server creates it with "
            "served artifacts."
        )
    return lines


def export_lines(plan: ServerPlan) -> list[str]:
    """The `export MLFLOW_TRACKING_URI=...` lines clients need (and, when open, from elsewhere)."""
    lines = [f"export MLFLOW_TRACKING_URI={plan.local_url}"]
    if plan.host in _ALL_INTERFACES:
        lines[0] += "   # on this machine"
        lines.append(f"export MLFLOW_TRACKING_URI={_url(socket.getfqdn(), plan.port)}   # from other machines")
    return lines


def ensure_port_free(host: str, port: int) -> None:
    """ServerError naming the problem when `host:port` cannot be bound now (taken, or `host` is
    not an address of this machine)."""
    check_port(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ServerError(f"--host {host}: not an address or a name this machine resolves ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise ServerError(
                    f"port {port} on {host} is already in use (another MLflow server?): choose another with --port"
                ) from None
            if err.errno == errno.EADDRNOTAVAIL:
                raise ServerError(f"--host {host} is not an address of this machine") from None
            if err.errno == errno.EACCES:
                raise ServerError(f"port {port} needs privileges to bind: choose one above 1023 with --port") from None
            raise ServerError(f"cannot bind {host}:{port}: {err.strerror}") from None


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """`<url>/health` answers 200 (no proxy: the server is local)."""
    return health_problem(url, timeout, direct=True) is None


def wait_until_ready(process: subprocess.Popen, url: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Return once `url` answers; ServerError when `process` exits first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while True:
        code = process.poll()
        if code is not None:
            raise ServerError(f"mlflow server exited with code {code} before it answered on {url} (see its output)")
        if is_ready(url):
            return
        if time.monotonic() > deadline:
            raise ServerError(f"mlflow server did not answer on {url}/health within {timeout:.0f} s")
        time.sleep(0.25)


def start(plan: ServerPlan, stdout: Any = None, stderr: Any = None) -> subprocess.Popen:
    """Start the server in a new process group (its workers too); output where Popen is told."""
    env = {**os.environ, **plan.env}
    env.pop("MLFLOW_TRACKING_URI", None)  # the server's own store is --backend-store-uri
    return subprocess.Popen(
        plan.command, env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, start_new_session=True
    )


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `timeout` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        with contextlib.suppress(ProcessLookupError, PermissionError):  # workers that outlived their parent
            os.killpg(process.pid, signal.SIGKILL)
        return


def serve(
    plan: ServerPlan,
    on_ready: Callable[[ServerPlan], None] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> int:
    """Run the server in the foreground (its output on stderr): check the port, start it, call
    `on_ready` once it answers, wait; its exit code. The server's group is stopped on the way
    out, also when this raises (Ctrl-C, `pipeline.signals.Terminated`)."""
    ensure_port_free(plan.host, plan.port)
    plan.artifacts_destination.mkdir(parents=True, exist_ok=True)
    process = start(plan, stdout=2)  # its logs to fd 2: stdout keeps the export lines
    try:
        wait_until_ready(process, plan.local_url, ready_timeout)
        if on_ready is not None:
            on_ready(plan)
        return process.wait()
    finally:
        stop(process)
