"""Tracking is never on the critical path of a result: a real `mlflow server` process that does not
answer at the start stops a stage in seconds with one line, and one killed in the middle of a
training run costs the run one warning, not its model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.tracking.server import is_ready
from pipeline.tracking.store import ENV_TRACKING_URI, check_tracking_server
from stages.cli import app
from tests.integration.test_mlflow_server import READY_TIMEOUT_S, child_env, free_port, kill_leftovers, write_params
from tests.support.ray_fixtures import layout, tiny_data, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

REPO = Path(__file__).resolve().parents[2]


def synthetic_token_stats(project: Path) -> None:
    from pipeline.data.stats import TokenStatistics

    counts = np.random.default_rng(0).integers(1, 500, size=64)
    counts[:2] = 0
    TokenStatistics(counts=counts, excluded_ids=(0, 1)).save(project / "data" / "token_stats")


def test_a_server_that_does_not_answer_stops_a_stage_in_seconds_with_one_line(tmp_path, monkeypatch):
    project = tmp_path / "project"
    synthetic_token_stats(project)
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv(ENV_TRACKING_URI, url)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # without the preflight: fail fast, but not in one line
    start = time.monotonic()
    result = CliRunner().invoke(
        app,
        [
            "schedule",
            "--root",
            str(project),
            "--params",
            str(write_params(tmp_path)),
            "--set",
            "diffusion.num_timesteps=100",
        ],
    )
    seconds = time.monotonic() - start
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the MLflow tracking server {url} does not answer"), lines
    assert seconds < 20, seconds
    assert not (project / "data" / "schedule").exists()  # nothing written


def test_the_preflight_bounds_mlflow_s_retries_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    with pytest.raises(ConnectionError, match="does not answer"):
        check_tracking_server(f"http://127.0.0.1:{free_port()}", timeout=1.0)
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"
    check_tracking_server("sqlite:///nowhere.db")  # a local store: nothing to ask


def start_server(base: Path) -> tuple[subprocess.Popen, str]:
    root = base / "served"
    root.mkdir()
    port = free_port()
    out, err = base / "server.out", base / "server.err"
    command = [
        sys.executable,
        "-m",
        "stages.cli",
        "mlflow-server",
        "--root",
        str(root),
        "--params",
        str(write_params(base)),
    ]
    command += ["--port", str(port), "--workers", "1"]
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            command, cwd=REPO, env=child_env(), stdout=stdout, stderr=stderr, start_new_session=True
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    while "export MLFLOW_TRACKING_URI=" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, err.read_text()
        time.sleep(0.5)
    return proc, f"http://127.0.0.1:{port}"


def test_a_server_killed_mid_training_costs_one_warning_not_the_model(layout, tmp_path, monkeypatch):
    """`dbert train`'s stage with the tracking server SIGKILLed after the first report: the run goes
    on to its last step without waiting minutes per report, and writes the export and its
    outputs; the failure is one warning."""
    from stages import schedule, train

    params = tiny_params("train.steps=12", "train.eval_every=4", "train.checkpoint_every=4")
    schedule.run(params, layout.root)  # in the project's own store
    proc, url = start_server(tmp_path)
    killed: list[float] = []

    def progress(task: str, advance: int, total: int | None) -> None:
        if task == "training" and not killed:
            kill_leftovers(str(tmp_path / "served"))  # the server and its workers die after the first report
            proc.wait(timeout=30)
            assert not is_ready(url)
            killed.append(time.monotonic())

    monkeypatch.setenv(ENV_TRACKING_URI, url)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            summary = train.run(params, layout.root, progress=progress)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        kill_leftovers(str(tmp_path / "served"))
    assert killed, "no training report came"
    assert time.monotonic() - killed[0] < 120  # bounded retries, then no more waiting
    assert summary["step"] == 12
    assert (layout.model / "config.json").is_file() and (layout.train_out / "metrics.json").is_file()
    failures = [w for w in caught if "MLflow tracking failed" in str(w.message)]
    assert len(failures) == 1, [str(w.message) for w in caught]
