"""Stop signals (pipeline.signals): SIGTERM / SIGINT end every MLflow run KILLED and leave no
half-written output - in this process, in a real subprocess inside nested stage runs, and through
the real CLI - and the handlers that were there before come back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline import signals
from pipeline.artifacts import atomic_directory
from tests.support.env import PROJECT_ENV

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in PROJECT_ENV}
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "MLFLOW_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            **extra,
        }
    )
    return env


def _signals_default_in_child() -> None:
    """A child of a job started with `&` (CI, nohup) inherits SIGINT *ignored*, and a process
    that starts with SIGINT ignored keeps it ignored by design; a terminal gives SIG_DFL. Give the
    child the terminal's dispositions, which is what these tests are about."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


def spawn(command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_signals_default_in_child,
        **kwargs,
    )


def signal_when_ready(proc: subprocess.Popen, ready: Path, signum: int, timeout: float = 240) -> tuple[str, str]:
    """Wait for the child's ready marker, send `signum`, return its (stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while not ready.exists():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"child exited with {proc.returncode} before it was ready:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("child never got ready")
        time.sleep(0.1)
    proc.send_signal(signum)
    try:
        return proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
        pytest.fail(f"child ignored {signal.Signals(signum).name}:\n{err[-3000:]}")


def mlflow_runs(db: Path) -> dict[str, object]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return {run.info.run_id: run for run in client.search_runs(ids)}


def hidden_entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------------------------------------
# The mechanism, in this process
# ---------------------------------------------------------------------------------------------


class ReachedThePreviousHandler(Exception):
    """The signal went to the handler that was there before the guard."""


@pytest.fixture
def previous_handler():
    """SIGTERM / SIGINT / SIGHUP go to a handler that raises ReachedThePreviousHandler, so a broken
    guard fails the test instead of killing (SIGTERM) or stopping (SIGINT) pytest."""

    def previous(signum, frame):
        raise ReachedThePreviousHandler(signal.Signals(signum).name)

    saved = {s: signal.signal(s, previous) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    yield previous
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_a_stop_signal_raises_terminated_and_the_old_handlers_come_back(previous_handler):
    with pytest.raises(signals.Terminated) as info, signals.terminate_on_signals() as stop:
        assert signal.getsignal(signal.SIGTERM) is not previous_handler
        signal.raise_signal(signal.SIGTERM)
        pytest.fail("SIGTERM did not interrupt the block")
    assert isinstance(info.value, KeyboardInterrupt)
    assert (info.value.signum, info.value.exit_code, str(info.value)) == (signal.SIGTERM, 143, "stopped by SIGTERM")
    assert (stop.signame, stop.exit_code) == ("SIGTERM", 143)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        assert signal.getsignal(signum) is previous_handler
    assert signals.received() is None  # the next guard starts afresh
    for signum, code in ((signal.SIGINT, 130), (signal.SIGHUP, 129)):
        with pytest.raises(signals.Terminated) as info, signals.terminate_on_signals():
            signal.raise_signal(signum)
        assert info.value.exit_code == code
    with pytest.raises(ReachedThePreviousHandler):
        signal.raise_signal(signal.SIGTERM)


def test_a_signal_inside_a_held_section_is_raised_at_its_end_and_repeats_are_ignored(previous_handler, capsys):
    steps = []
    with pytest.raises(signals.Terminated), signals.terminate_on_signals():
        with signals.held():
            signal.raise_signal(signal.SIGTERM)
            steps.append("finished the critical section")
        steps.append("not reached")
    assert steps == ["finished the critical section"]

    with signals.terminate_on_signals():
        try:
            signal.raise_signal(signal.SIGTERM)
        except signals.Terminated:
            signal.raise_signal(signal.SIGTERM)  # while cleaning up: noted, not raised
            steps.append("cleanup went on")
    assert steps[-1] == "cleanup went on"
    assert "SIGTERM again" in capsys.readouterr().err


def test_ignored_signals_stay_ignored_and_other_threads_install_nothing(previous_handler):
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as under nohup
    with signals.terminate_on_signals():
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) is not previous_handler
    assert signal.getsignal(signal.SIGTERM) is previous_handler

    handlers = {}

    def in_thread():
        with signals.terminate_on_signals(), signals.held():
            handlers["term"] = signal.getsignal(signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert handlers["term"] is before


def test_handlers_that_other_code_installs_inside_keep_handlers_are_replaced_by_ours(previous_handler):
    def like_ray_init(signum, frame):  # what ray.init() puts on SIGTERM in the driver
        raise SystemExit(signum)

    with pytest.raises(signals.Terminated), signals.terminate_on_signals():
        ours = signal.getsignal(signal.SIGTERM)
        with signals.keep_handlers():
            signal.signal(signal.SIGTERM, like_ray_init)
        assert signal.getsignal(signal.SIGTERM) is ours
        signal.raise_signal(signal.SIGTERM)
    with signals.keep_handlers():  # outside a guard it leaves other code alone
        signal.signal(signal.SIGTERM, like_ray_init)
    assert signal.getsignal(signal.SIGTERM) is like_ray_init


def test_a_signal_during_the_output_swap_waits_until_the_new_output_is_in_place(
    previous_handler, tmp_path, monkeypatch
):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = Path.rename

    def rename_then_signal(self, destination):
        result = real_rename(self, destination)
        if self == target:  # the old output has just been moved aside, the new one is not in place
            signal.raise_signal(signal.SIGTERM)
        return result

    with pytest.raises(signals.Terminated), signals.terminate_on_signals(), atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        monkeypatch.setattr(Path, "rename", rename_then_signal)
    monkeypatch.undo()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert hidden_entries(tmp_path) == []


def test_an_interrupted_tune_ends_the_trial_runs_it_owns_as_killed(tmp_path):
    """`pipeline.tune.driver.fit_tuner`: Tune's graceful SIGINT is off while it runs, and a stop ends
    the trial runs that the dead trial actors left RUNNING."""
    import mlflow

    from pipeline.tune import driver

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("tune", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp)
    trials = [client.create_run(exp, tags={"mlflow.parentRunId": parent.info.run_id}) for _ in range(2)]
    client.set_terminated(trials[1].info.run_id, "FINISHED")

    class Tuner:
        def fit(self):
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            raise signals.Terminated(signal.SIGTERM)

    saved = os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
    try:
        with pytest.raises(signals.Terminated):
            driver.fit_tuner(Tuner(), False, parent.info.run_id, uri)
        assert "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    finally:
        if saved is not None:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = saved
    assert client.get_run(trials[0].info.run_id).info.status == "KILLED"
    assert client.get_run(trials[1].info.run_id).info.status == "FINISHED"
    assert client.get_run(parent.info.run_id).info.status == "RUNNING"  # its own stage run ends it


@pytest.mark.slow
def test_ray_keeps_its_hands_off_the_stop_signals(previous_handler, monkeypatch):
    """ray.init() puts sys.exit(15) on SIGTERM in the driver, and Ray Train 2.60's fit() puts abort +
    sys.exit(0) on SIGINT and never restores it: either made a stopped stage end FAILED."""
    import ray
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from pipeline.train.ray.cluster import init_ray
    from pipeline.train.ray.driver import trainer_class

    def fake_init(**kwargs):  # what ray.init does to SIGTERM, without starting a cluster
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    with signals.terminate_on_signals():
        ours = signal.getsignal(signal.SIGTERM)
        assert init_ray() is True
        assert signal.getsignal(signal.SIGTERM) is ours

    assert hasattr(DataParallelTrainer, "_register_sigint_handler")  # the hook we override still exists
    trainer_cls = trainer_class()
    trainer = trainer_cls.__new__(trainer_cls)
    trainer._register_sigint_handler("controller")
    assert signal.getsignal(signal.SIGINT) is previous_handler
    assert trainer.controller == "controller"


# ---------------------------------------------------------------------------------------------
# A real process inside nested stage runs (the ablation's parent -> row -> stage)
# ---------------------------------------------------------------------------------------------

NESTED = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from pipeline.artifacts import atomic_directory, write_file_atomic
    from pipeline.tracking.runs import start_stage_run

    root, ready = Path(sys.argv[1]), Path(sys.argv[2])
    with start_stage_run("ablation", {"rows": 1}, root=root) as parent:
        with start_stage_run("ablation_row", {"row": "a"}, nested=True, root=root) as row:
            with start_stage_run("train", {"lr": 1e-4}, root=root) as stage:
                with atomic_directory(root / "outputs" / "model") as tmp:
                    (tmp / "weights.bin").write_bytes(b"half" * 1000)
                    ids = [parent.info.run_id, row.info.run_id, stage.info.run_id]
                    write_file_atomic(ready, json.dumps(ids))
                    time.sleep(300)
    print("not reached")
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_killed_process_ends_its_nested_runs_killed_and_keeps_the_old_output(tmp_path, signum):
    root = tmp_path / "project"
    (root / "outputs" / "model").mkdir(parents=True)
    (root / "outputs" / "model" / "weights.bin").write_bytes(b"previous")
    ready = tmp_path / "ready.json"
    proc = spawn([sys.executable, "-c", NESTED, str(root), str(ready)], cwd=tmp_path, env=child_env())
    out, err = signal_when_ready(proc, ready, signum)

    assert proc.returncode != 0 and "not reached" not in out, err
    parent_id, row_id, stage_id = json.loads(ready.read_text())
    runs = mlflow_runs(root / "mlflow.db")
    assert {run_id: run.info.status for run_id, run in runs.items()} == {
        parent_id: "KILLED",
        row_id: "KILLED",
        stage_id: "KILLED",
    }
    assert runs[row_id].data.tags["mlflow.parentRunId"] == parent_id
    assert runs[stage_id].data.tags["mlflow.parentRunId"] == row_id
    assert all(run.info.end_time for run in runs.values())
    assert (root / "outputs" / "model" / "weights.bin").read_bytes() == b"previous"
    assert sorted(p.name for p in (root / "outputs").iterdir()) == ["model"]  # no temporary directory


# ---------------------------------------------------------------------------------------------
# Through the real CLI: `prepare`, stopped while its output is half-written
# ---------------------------------------------------------------------------------------------

# The real CLI and stage; the only change is a pause after the first split has been written into
# the stage's temporary output directory.
PAUSED_CLI = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import stages.prepare as prepare

    ready = Path(sys.argv.pop(1))
    real = prepare.tokenize

    def tokenize(lines, tokenizer, max_seq_len, task, progress):
        split = real(lines, tokenizer, max_seq_len, task, progress)
        if not task.endswith("train"):
            ready.write_text("half-written")
            time.sleep(300)
        return split

    prepare.tokenize = tokenize
    from stages.cli import app
    app(prog_name="dbert")
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_dbert_prepare_stopped_by_a_signal_exits_128_plus_it_with_one_line(tmp_path, signum):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"sentence number {i} is here .\n" for i in range(40)), encoding="utf-8")
    root = tmp_path / "project"
    (root / "data" / "prepared").mkdir(parents=True)
    (root / "data" / "prepared" / "meta.json").write_text("previous\n")
    ready = tmp_path / "ready"
    command = [
        sys.executable,
        "-c",
        PAUSED_CLI,
        str(ready),
        "prepare",
        "--params",
        str(PARAMS),
        "--root",
        str(root),
        "-S",
        "data.source=text_files",
        "-S",
        f"data.train_files=[{corpus}]",
        "-S",
        f"data.test_files=[{corpus}]",
        "-S",
        "model.name_or_path=random",
        "-S",
        "data.max_seq_len=16",
    ]
    proc = spawn(command, cwd=root, env=child_env(DBERT_PROJECT_ROOT=str(root)))
    _out, err = signal_when_ready(proc, ready, signum)

    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert err.strip().splitlines()[-1] == f"stopped by {name}"
    assert "Traceback" not in err and "Aborted" not in err
    assert [run.info.status for run in mlflow_runs(root / "mlflow.db").values()] == ["KILLED"]
    assert sorted(p.name for p in (root / "data").iterdir()) == ["prepared"]
    assert [p.name for p in (root / "data" / "prepared").iterdir()] == ["meta.json"]
    assert (root / "data" / "prepared" / "meta.json").read_text() == "previous\n"
