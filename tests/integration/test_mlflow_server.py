"""`dbert mlflow-server` and the pipeline's tracking against a real `mlflow server` subprocess.

One server per module, started by the real command (`python -m stages.cli mlflow-server`) on a free
port over a tmp project: the pipeline logs to it through `uri=` (and, for a CLI stage, through
`$MLFLOW_TRACKING_URI`), everything is read back from the server with `MlflowClient`, and the
artifact files are looked for under the server's artifacts destination, not in the client's cwd.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.config import load_params
from pipeline.tracking import log, runs, server, store
from stages.cli import app
from tests.support.env import PROJECT_ENV, without_project_env

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300  # a niced server on a busy 2-core machine takes ~30 s


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that point a process at a store or a project."""
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env.update(extra)
    return env


def write_params(directory: Path) -> Path:
    """The schema's defaults as a params file (independent of the checkout's params.yaml)."""
    path = directory / "params.yaml"
    path.write_text(yaml.safe_dump(load_params(None, []).model_dump(mode="json"), sort_keys=False))
    return path


def kill_leftovers(marker: str) -> None:
    """SIGKILL the process group of every process whose command line names `marker` (a tmp path)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(os.getpgid(int(proc.name)), signal.SIGKILL)


@dataclass
class Served:
    url: str
    port: int
    root: Path  # the served project: mlflow.db and mlartifacts/
    stdout: Path
    stderr: Path

    @property
    def artifacts(self) -> Path:
        return self.root / "mlartifacts"

    def client(self):
        import mlflow

        return mlflow.MlflowClient(tracking_uri=self.url)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`dbert mlflow-server --workers 1` over a tmp project; stopped with SIGTERM at the end,
    which must also stop the server (its port stops answering)."""
    mp = without_project_env()
    base = tmp_path_factory.mktemp("mlflow-server")
    root = base / "project"
    root.mkdir()
    params = write_params(base)
    port = free_port()
    served = Served(f"http://127.0.0.1:{port}", port, root, base / "stdout.txt", base / "stderr.txt")
    command = [sys.executable, "-m", "stages.cli", "mlflow-server", "--root", str(root), "--params", str(params)]
    command += ["--port", str(port), "--workers", "1"]
    with open(served.stdout, "wb") as out, open(served.stderr, "wb") as err:
        proc = subprocess.Popen(command, cwd=REPO, env=child_env(), stdout=out, stderr=err, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while "export MLFLOW_TRACKING_URI=" not in served.stdout.read_text():
            assert proc.poll() is None, f"dbert mlflow-server exited {proc.returncode}:\n{served.stderr.read_text()}"
            assert time.monotonic() < deadline, (
                f"no export line after {READY_TIMEOUT_S} s:\n{served.stderr.read_text()}"
            )
            time.sleep(0.5)
        yield served
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM, served.stderr.read_text()
        assert not server.is_ready(served.url), "the server outlived `dbert mlflow-server`"
    finally:
        mp.undo()
        if proc.poll() is None:
            proc.kill()
        kill_leftovers(str(root))


@pytest.fixture
def client_dir(clean_env, tmp_path, monkeypatch):
    """An empty cwd for the client; MLflow's tracking URI reset afterwards."""
    import mlflow

    cwd = tmp_path / "client"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield cwd
    mlflow.set_tracking_uri(None)


def files_under(directory: Path, name: str) -> list[Path]:
    return sorted(directory.rglob(name))


def assert_nothing_local(cwd: Path) -> None:
    """No store, no artifact folder written on the client side."""
    assert not [p.name for p in cwd.iterdir() if p.name in {"mlflow.db", "mlartifacts", "mlruns"}]


def test_the_command_prints_the_export_line_and_serves_the_project_store(mlflow_server):
    lines = mlflow_server.stdout.read_text().splitlines()
    assert lines == [f"export MLFLOW_TRACKING_URI={mlflow_server.url}"]  # the server's own logs go to stderr
    assert "Ctrl-C stops it" in mlflow_server.stderr.read_text()
    assert (mlflow_server.root / "mlflow.db").is_file()
    assert server.is_ready(mlflow_server.url)


def test_a_stage_run_its_nested_run_metrics_and_artifacts_go_through_the_server(mlflow_server, client_dir):
    url = mlflow_server.url
    report = client_dir / "report.txt"
    report.write_text("bound 4.2\n")
    plots = client_dir / "plots"
    plots.mkdir()
    (plots / "curve.csv").write_text("step,bound\n1,3.0\n")
    with runs.start_stage_run(
        "train", {"train": {"lr": 1e-4}}, experiment="served", root=client_dir, uri=url, tags={"purpose": "test"}
    ) as parent:
        log.log_metrics({"loss": 2.0}, step=1)
        log.log_metrics({"loss": 1.5, "nan": float("nan")}, step=2)
        log.log_artifact(report, artifact_path="reports")
        log.log_dict_artifact({"bound": 4.2}, "summary.json")
        with runs.start_stage_run("trial", {"lr": 1e-4}, experiment="served", root=client_dir, uri=url) as child:
            log.log_metrics({"bound": 3.0}, step=0)
            log.log_artifact(plots, artifact_path="plots")

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("served")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location
    stored = client.get_run(parent.info.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.info.artifact_uri.startswith("mlflow-artifacts:")
    assert stored.data.params == {"train.lr": "0.0001"}
    assert stored.data.tags["stage"] == "train" and stored.data.tags["purpose"] == "test"
    assert [(m.step, m.value) for m in client.get_metric_history(parent.info.run_id, "loss")] == [(1, 2.0), (2, 1.5)]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"reports", "summary.json"}
    fetched = Path(client.download_artifacts(parent.info.run_id, "reports/report.txt", str(client_dir.parent)))
    assert fetched.read_text() == "bound 4.2\n"

    nested = client.get_run(child.info.run_id)
    assert nested.info.status == "FINISHED"
    assert nested.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert nested.data.metrics == {"bound": 3.0}
    assert [a.path for a in client.list_artifacts(child.info.run_id, "plots")] == ["plots/curve.csv"]
    assert [r["run_id"] for r in store.find_runs("served", stage="trial")] == [child.info.run_id]  # via the env

    # The files are in the server's artifacts destination, under each run's id; none on the client side.
    (on_server,) = files_under(mlflow_server.artifacts, "report.txt")
    assert parent.info.run_id in on_server.parts and on_server.read_text() == "bound 4.2\n"
    (curve,) = files_under(mlflow_server.artifacts, "curve.csv")
    assert child.info.run_id in curve.parts
    assert_nothing_local(client_dir)


def test_a_failing_stage_ends_its_run_failed_on_the_server(mlflow_server, client_dir):
    with pytest.raises(ZeroDivisionError):
        with runs.start_stage_run("evaluate", None, experiment="served-failed", root=client_dir, uri=mlflow_server.url):
            raise ZeroDivisionError("the stage failed")
    (run,) = store.find_runs("served-failed")
    assert run["status"] == "FAILED" and run["tags"]["stage"] == "evaluate"


TRIAL = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    import mlflow  # before the start line: both processes log at the same time
    from pipeline.tracking import log, runs

    uri, parent, index, root, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    with runs.start_stage_run(
        "trial", {{"trial": index}}, experiment="served-concurrent", parent_run_id=parent, uri=uri, root=root
    ) as run:
        Path(root, f"ready-{{index}}").write_text(run.info.run_id)
        while not Path(root, "go").exists():
            time.sleep(0.02)
        for step in range(steps):
            log.log_metrics({{"loss": 1000 * index + step, "val_bound": index + step / 100}}, step=step)
        log.log_dict_artifact({{"trial": index}}, "trial.json")
    print(run.info.run_id)
    """
)


def test_two_processes_log_nested_runs_under_one_parent_at_once_without_mixing(mlflow_server, client_dir):
    """Like two Tune trials on two nodes: the same metric names, the same parent, at the same time."""
    steps = 25
    script = TRIAL.format(repo=str(REPO))
    with runs.start_stage_run(
        "tune", None, experiment="served-concurrent", root=client_dir, uri=mlflow_server.url
    ) as parent:
        env = child_env()  # no MLFLOW_TRACKING_URI: the trials know the server from `uri` alone
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    script,
                    mlflow_server.url,
                    parent.info.run_id,
                    str(i),
                    str(client_dir),
                    str(steps),
                ],
                cwd=client_dir,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in (1, 2)
        ]
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not all((client_dir / f"ready-{i}").exists() for i in (1, 2)):
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                assert time.monotonic() < deadline, "the trials never started their runs"
                time.sleep(0.1)
            (client_dir / "go").touch()  # both runs are open: log at once
            results = [p.communicate(timeout=READY_TIMEOUT_S) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]

    client = mlflow_server.client()
    run_ids = [out.strip().splitlines()[-1] for out, _ in results]
    assert len(set(run_ids)) == 2
    for index, run_id in zip((1, 2), run_ids, strict=True):
        stored = client.get_run(run_id)
        assert stored.info.status == "FINISHED"
        assert stored.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert stored.data.params == {"trial": str(index)}
        loss = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
        assert loss == [(s, float(1000 * index + s)) for s in range(steps)]
        bound = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_bound"))
        assert bound == [(s, pytest.approx(index + s / 100)) for s in range(steps)]
        (on_server,) = [p for p in files_under(mlflow_server.artifacts, "trial.json") if run_id in p.parts]
        assert f'"trial": {index}' in on_server.read_text()
    assert client.get_run(parent.info.run_id).data.metrics == {}
    assert_nothing_local(client_dir)


def test_a_cli_stage_logs_through_the_server_named_by_the_environment(mlflow_server, tmp_path):
    """`dbert schedule` (the cheapest stage: synthetic token statistics) with MLFLOW_TRACKING_URI."""
    from pipeline.data.stats import TokenStatistics

    project = tmp_path / "project"
    counts = np.random.default_rng(0).integers(1, 500, size=64)
    counts[:2] = 0
    TokenStatistics(counts=counts, excluded_ids=(0, 1)).save(project / "data" / "token_stats")
    params = write_params(tmp_path)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.cli",
            "schedule",
            "--params",
            str(params),
            "--root",
            str(project),
            "--set",
            "diffusion.num_timesteps=100",
            "--set",
            "tracking.experiment=served-cli",
        ],
        cwd=project,
        env=child_env(MLFLOW_TRACKING_URI=mlflow_server.url),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "monotone: True" in done.stdout

    client = mlflow_server.client()
    experiment = client.get_experiment_by_name("served-cli")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["stage"] == "schedule"
    assert run.data.params["diffusion.num_timesteps"] == "100"
    assert "lambda_times_max_h" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {
        "schedule.json",
        "alpha_curves.csv",
        "alpha_curves.png",
    }
    (on_server,) = files_under(mlflow_server.artifacts, "schedule.json")
    assert run.info.run_id in on_server.parts
    assert_nothing_local(project)


# ---------------------------------------------------------------------------------------------
# The command line alone (no server)
# ---------------------------------------------------------------------------------------------

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["mlflow-server", *args])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_dry_run_prints_a_loopback_command_with_the_served_artifact_destination(clean_env, tmp_path):
    params = write_params(tmp_path)
    result = invoke("--root", str(tmp_path), "--params", str(params), "--dry-run")
    assert result.exit_code == 0, result.output
    (line,) = result.stdout.strip().splitlines()
    argv = shlex.split(line)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5000"
    assert "--serve-artifacts" in argv
    assert argv[argv.index("--artifacts-destination") + 1] == str(tmp_path.resolve() / "mlartifacts")
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert "--default-artifact-root" not in argv  # new experiments: mlflow-artifacts:/<id>, served
    assert "warning" not in result.stderr
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in result.stderr


def test_opening_the_server_to_the_network_needs_the_host_flag_and_warns(clean_env, tmp_path):
    params = write_params(tmp_path)
    store.setup_tracking("local-artifacts", root=tmp_path)  # an experiment of the embedded store
    import mlflow

    mlflow.set_tracking_uri(None)
    result = invoke(
        "--root", str(tmp_path), "--params", str(params), "--dry-run", "--host", "0.0.0.0", "--port", "5123"
    )
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.stdout.strip())
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "5123"
    assert "no authentication" in result.stderr
    assert "'local-artifacts' keeps artifacts at file://" in result.stderr
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5123" in result.stderr


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_a_bad_port_is_a_one_line_error(clean_env, tmp_path, port):
    params = write_params(tmp_path)
    line = one_line_error(invoke("--root", str(tmp_path), "--params", str(params), f"--port={port}"))
    assert "--port must be a TCP port between 1 and 65535" in line


def test_a_taken_port_or_a_foreign_address_is_a_one_line_error_and_starts_nothing(clean_env, tmp_path):
    params = write_params(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = one_line_error(invoke("--root", str(tmp_path), "--params", str(params), "--port", str(port)))
    assert f"port {port} on 127.0.0.1 is already in use" in line and "--port" in line
    line = one_line_error(invoke("--root", str(tmp_path), "--params", str(params), "--host", "192.0.2.1"))
    assert "192.0.2.1 is not an address of this machine" in line
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlartifacts").exists()


def test_a_tracking_server_in_the_environment_is_not_served_again(clean_env, tmp_path, monkeypatch):
    params = write_params(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    line = one_line_error(invoke("--root", str(tmp_path), "--params", str(params), "--dry-run"))
    assert "already a tracking server" in line


def test_an_embedded_experiment_seen_through_a_remote_server_warns_once(clean_env, caplog):
    """Artifacts of an experiment created with a local path would land on the client's own disk."""
    import logging

    with caplog.at_level(logging.WARNING, logger="pipeline.tracking.store"):
        for _ in range(2):
            store.warn_local_artifacts("http://10.1.2.3:5000", "old", "file:///srv/project/mlartifacts")
        store.warn_local_artifacts("http://127.0.0.1:5000", "old", "file:///srv/project/mlartifacts")
        store.warn_local_artifacts("http://10.1.2.3:5000", "new", "mlflow-artifacts:/3")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "'old'" in messages[0] and "that machine's own disk" in messages[0]
