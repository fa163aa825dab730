"""pipeline.tracking against a real MLflow with a sqlite store in tmp_path (no mocks of MLflow)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline import lineage, project
from pipeline.tracking import log, runs, store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_mlflow(clean_env, tmp_path, monkeypatch):
    """`clean_env`, with the cwd in tmp_path; yields the mlflow module."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    yield mlflow
    mlflow.set_tracking_uri(None)


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


@pytest.fixture
def git_repo(tmp_path) -> Path:
    """A temp git repo with one commit, a data file and a data directory."""
    repo = tmp_path / "repo"
    (repo / "data" / "tokenized").mkdir(parents=True)
    (repo / "data" / "train.txt").write_text("the cat sat\n")
    (repo / "data" / "tokenized" / "train.bin").write_bytes(b"\x00\x01\x02")
    (repo / "data" / "tokenized" / "meta.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "init")
    return repo


def test_a_stage_run_records_flattened_params_lineage_tags_metrics_and_an_artifact(clean_mlflow, git_repo, monkeypatch):
    from pipeline.config import load_params

    mlflow = clean_mlflow
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-otter")
    params = load_params(None, ["train.lr=3e-4", "tracking.experiment=unit"])
    report = git_repo / "report.txt"
    report.write_text("bound 4.2\n")

    with runs.start_stage_run(
        "train",
        params,
        deps=["data/train.txt", "data/tokenized", "data/absent"],
        tags={"purpose": "test"},
        root=git_repo,
    ) as run:
        logged = log.log_metrics({"loss": 1.5, "nan": math.nan, "inf": math.inf, "name": "x"}, step=3)
        log.log_artifact(report, artifact_path="reports")
        log.log_dict_artifact({"bound": 4.2, "path": Path("a/b")}, "summary.json")

    assert logged == {"loss": 1.5}
    assert mlflow.active_run() is None
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{git_repo / 'mlflow.db'}")
    stored = client.get_run(run.info.run_id)

    assert stored.info.status == "FINISHED"
    assert stored.info.run_name.startswith("train-")
    experiment = client.get_experiment(stored.info.experiment_id)
    assert experiment.name == "unit"
    assert experiment.artifact_location == (git_repo / "mlartifacts").as_uri()

    flat = params.flat()
    assert set(stored.data.params) == set(flat)
    assert stored.data.params["train.lr"] == "0.0003"
    assert stored.data.params["data.train_shards"] == str(flat["data.train_shards"])

    tags = stored.data.tags
    assert tags["git_commit"] == _git(git_repo, "rev-parse", "HEAD")
    assert tags["stage"] == "train"
    assert tags["dvc_exp_name"] == "brisk-otter"
    assert tags["purpose"] == "test"
    assert tags["dep_md5.data/train.txt"] == hashlib.md5(b"the cat sat\n").hexdigest()
    assert tags["dep_md5.data/tokenized"].endswith(".dir")
    assert tags["dep_md5.data/absent"] == "missing"
    assert tags["host"] and tags["user"]

    assert stored.data.metrics == {"loss": 1.5}
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [3]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"reports", "summary.json"}
    local = Path(client.download_artifacts(run.info.run_id, "reports/report.txt", str(git_repo / "dl")))
    assert local.read_text() == "bound 4.2\n"
    summary = Path(client.download_artifacts(run.info.run_id, "summary.json", str(git_repo / "dl")))
    assert json.loads(summary.read_text()) == {"bound": 4.2, "path": "a/b"}


def test_a_failing_block_marks_the_run_failed_and_reraises(clean_mlflow, tmp_path):
    mlflow = clean_mlflow
    with pytest.raises(ZeroDivisionError):
        with runs.start_stage_run("evaluate", {"evaluate": {"seeds": [0]}}, root=tmp_path) as run:
            raise ZeroDivisionError("the stage failed")

    assert mlflow.active_run() is None
    found = store.find_runs("diffusionbert", root=tmp_path)
    assert [(r["run_id"], r["status"]) for r in found] == [(run.info.run_id, "FAILED")]
    assert found[0]["params"] == {"evaluate.seeds": "[0]"}


def test_resuming_a_run_the_store_lost_starts_a_new_run_with_a_warning(clean_mlflow, tmp_path):
    """A restored workspace keeps an ablation's state.json but not mlflow.db: going on must not fail."""
    with runs.start_stage_run("ablation", None, root=tmp_path) as first:
        pass
    with runs.start_stage_run("ablation", None, root=tmp_path, resume_run_id=first.info.run_id) as again:
        assert again.info.run_id == first.info.run_id  # a run the store holds is reopened
    lost = "d79422ffe6944492bf4b857897846546"
    with pytest.warns(UserWarning, match=f"{lost} is not in the store"):
        with runs.start_stage_run("ablation", None, root=tmp_path, resume_run_id=lost) as fresh:
            pass
    assert fresh.info.run_id not in (lost, first.info.run_id)
    found = store.find_runs("diffusionbert", root=tmp_path)
    assert sorted(r["run_id"] for r in found) == sorted([first.info.run_id, fresh.info.run_id])


def test_setup_tracking_is_idempotent(clean_mlflow, tmp_path):
    mlflow = clean_mlflow
    first = store.setup_tracking("idem", root=tmp_path)
    second = store.setup_tracking("idem", root=tmp_path)

    assert first == second
    client = mlflow.MlflowClient(tracking_uri=store.tracking_uri(tmp_path))
    names = [e.name for e in client.search_experiments()]
    assert names.count("idem") == 1
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_setup_tracking_from_concurrent_processes_creates_one_experiment(clean_mlflow, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from pipeline.tracking.store import setup_tracking
        print(setup_tracking("raced", root={str(tmp_path)!r}))
        """
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(3)
    ]
    results = [p.communicate(timeout=120) for p in procs]

    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 1
    client = clean_mlflow.MlflowClient(tracking_uri=store.tracking_uri(tmp_path))
    assert [e.name for e in client.search_experiments()].count("raced") == 1


def test_a_deleted_experiment_is_restored_by_setup_tracking(clean_mlflow, tmp_path):
    client = clean_mlflow.MlflowClient(tracking_uri=store.tracking_uri(tmp_path))
    exp_id = store.setup_tracking("phoenix", root=tmp_path)
    client.delete_experiment(exp_id)

    assert store.setup_tracking("phoenix", root=tmp_path) == exp_id
    assert client.get_experiment(exp_id).lifecycle_stage == "active"


def test_nested_stage_runs_record_their_parent(clean_mlflow, tmp_path):
    with runs.start_stage_run("tune", None, root=tmp_path) as parent:
        with runs.start_stage_run("trial", {"lr": 1e-4}, nested=True, root=tmp_path) as child:
            log.log_metrics({"bound": 3.0})

    client = clean_mlflow.MlflowClient(tracking_uri=store.tracking_uri(tmp_path))
    stored = client.get_run(child.info.run_id)
    assert stored.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client.get_run(parent.info.run_id).data.metrics == {}
    trials = store.find_runs("diffusionbert", stage="trial", root=tmp_path)
    assert [(r["run_id"], r["metrics"]) for r in trials] == [(child.info.run_id, {"bound": 3.0})]


def test_long_param_values_are_truncated_to_mlflows_limit(clean_mlflow, tmp_path):
    with runs.start_stage_run("prepare", {"data": {"files": "x" * 7000}}, root=tmp_path):
        pass
    (run,) = store.find_runs("diffusionbert", stage="prepare", root=tmp_path)
    assert run["params"]["data.files"] == "x" * 6000


def test_lineage_tags_omit_the_git_commit_outside_git_and_read_dvc_exp_name(clean_mlflow, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "tidy-lynx")
    (tmp_path / "plain").mkdir()
    tags = lineage.lineage_tags("schedule", deps=[], root=tmp_path / "plain")

    assert "git_commit" not in tags
    assert tags["stage"] == "schedule"
    assert tags["dvc_exp_name"] == "tidy-lynx"
    assert project.git_commit(tmp_path / "plain") is None


def test_dependency_md5s_equal_the_hashes_dvc_writes(tmp_path):
    # Expected values are what `dvc add` (DVC 3.67) wrote for these exact bytes.
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_bytes(b"hello\n")
    (tmp_path / "d" / "sub" / "b.bin").write_bytes(b"x\r\ny")
    (tmp_path / "f.txt").write_bytes(b"zz")

    assert lineage.dependency_md5s(["d", "f.txt", "gone"], root=tmp_path) == {
        "d": "4887b9e0985fecf6b466b85f72b04639.dir",
        "f.txt": "25ed1bcb423b0b7200f485fc5ff71c8e",
        "gone": "missing",
    }


def test_project_root_from_a_dvc_exp_temp_copy_resolves_to_the_main_repo(clean_mlflow, git_repo, monkeypatch):
    copy = git_repo / ".dvc" / "tmp" / "exps" / "tmpk3x9" / "stages"
    copy.mkdir(parents=True)
    _git(copy.parent, "init", "-q")  # DVC's temp copy is a git repo of its own

    assert project.project_root(copy) == git_repo
    monkeypatch.chdir(copy)
    assert project.project_root() == git_repo
    assert store.tracking_uri() == f"sqlite:///{git_repo / 'mlflow.db'}"
    assert store.artifact_location() == (git_repo / "mlartifacts").as_uri()


def test_project_root_is_the_git_top_level_and_dbert_project_root_wins(clean_mlflow, git_repo, tmp_path, monkeypatch):
    assert project.project_root(git_repo / "data" / "tokenized") == git_repo
    monkeypatch.setenv("DBERT_PROJECT_ROOT", str(tmp_path / "elsewhere"))
    assert project.project_root(git_repo / "data") == tmp_path / "elsewhere"


def test_mlflow_tracking_uri_wins_over_the_project_database(clean_mlflow, tmp_path, monkeypatch):
    assert store.tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    other = f"sqlite:///{tmp_path / 'server' / 'other.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    assert store.tracking_uri(tmp_path) == other

    store.setup_tracking("elsewhere", root=tmp_path)
    assert (tmp_path / "server" / "other.db").is_file()
    assert not (tmp_path / "mlflow.db").exists()
    client = clean_mlflow.MlflowClient(tracking_uri=other)
    location = client.get_experiment_by_name("elsewhere").artifact_location
    assert location == (tmp_path / "server" / "mlartifacts").as_uri()


def test_ui_command_binds_127_0_0_1_over_the_project_store(clean_mlflow, tmp_path):
    argv = store.ui_command(root=tmp_path)

    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "5000"
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert argv[argv.index("--default-artifact-root") + 1] == (tmp_path / "mlartifacts").as_uri()
    assert store.ui_command(host="0.0.0.0", port=8080, root=tmp_path)[-4:] == ["--host", "0.0.0.0", "--port", "8080"]


def test_logging_helpers_are_no_ops_without_a_run_and_on_other_ranks(clean_mlflow, tmp_path, monkeypatch):
    assert log.log_metrics({"loss": 1.0}) == {}  # no active run: MLflow must not start one
    assert clean_mlflow.active_run() is None

    calls = []
    guarded = log.rank_zero_only(lambda: calls.append(1) or "done")
    monkeypatch.setenv("RANK", "1")
    assert guarded() is None
    with runs.start_stage_run("train", None, root=tmp_path) as run:
        assert log.log_metrics({"loss": 2.0}) is None
    monkeypatch.setenv("RANK", "0")
    assert guarded() == "done"
    assert calls == [1]
    (stored,) = store.find_runs("diffusionbert", root=tmp_path)
    assert stored["run_id"] == run.info.run_id and stored["metrics"] == {}


def test_default_run_names_carry_the_stage_and_are_unique():
    names = {runs.default_run_name("prepare") for _ in range(5)}
    assert len(names) == 5
    assert all(n.startswith("prepare-") and len(n.split("-")) == 4 for n in names)


def test_importing_pipeline_tracking_imports_no_mlflow_ray_or_dvc():
    code = (
        "import sys; import pipeline.tracking.store, pipeline.tracking.runs, pipeline.tracking.log; "
        "print(sorted(m for m in ('mlflow', 'ray', 'dvc', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
