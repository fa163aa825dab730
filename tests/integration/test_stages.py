"""The stage functions (`stages/*.py`) on real LM1B-sample data, a real MLflow store and a tiny
random BERT: byte-identical reruns, one MLflow run per stage with its params and artifacts, and no
partial output when a stage fails."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params, with_values
from stages import evaluate, prepare, samplers, schedule, token_stats, train
from stages.common import select_params
from tests.support import tiny
from tests.support.env import without_project_env

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

REPO = Path(__file__).resolve().parents[2]
TINY = [*tiny.TINY, "data.max_sentences=200"]


def tiny_params(lm1b_dir: Path, *extra: str):
    return load_params(None, [*TINY, f"data.mirror_dir={lm1b_dir}", *extra])


def tree_digest(*paths: Path) -> dict[str, str]:
    """{relative file: sha256} for every file under the paths (a file counts as itself)."""
    out: dict[str, str] = {}
    for base in paths:
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            out[str(f.relative_to(base.parent))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def runs_by_stage(root: Path) -> dict[str, list[dict]]:
    from pipeline.tracking.store import find_runs

    out: dict[str, list[dict]] = {}
    for run in find_runs(root=root):
        out.setdefault(run["tags"].get("stage"), []).append(run)
    return out


def artifact_paths(run_id: str, root: Path) -> set[str]:
    import mlflow

    from pipeline.tracking.store import tracking_uri

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(root))
    found: set[str] = set()
    todo = [None]
    while todo:
        for item in client.list_artifacts(run_id, todo.pop()):
            (todo.append(item.path) if item.is_dir else found.add(item.path))
    return found


@pytest.fixture(scope="module")
def project(tmp_path_factory, lm1b_dir):
    """A tmp project after prepare -> token_stats -> schedule, with the MLflow runs of that round."""
    mp = without_project_env()
    root = tmp_path_factory.mktemp("stages")
    params = tiny_params(lm1b_dir)
    summaries = {
        "prepare": prepare.run(params, root),
        "token_stats": token_stats.run(params, root),
        "schedule": schedule.run(params, root),
    }
    state = {
        "root": root,
        "params": params,
        "summaries": summaries,
        "runs": runs_by_stage(root),
        "digest": tree_digest(root / "data", root / "outputs" / "token_stats.json"),
    }
    mp.undo()
    return state


def test_prepare_token_stats_and_schedule_write_their_outputs(project):
    root = project["root"]
    for name in ("train", "validation", "test"):
        assert (root / "data/prepared" / name / "ids.npy").is_file()
    meta = yaml.safe_load((root / "data/prepared/meta.json").read_text())
    assert meta["sizes"]["train"]["sequences"] == 200 and meta["max_seq_len"] == 32
    assert len(meta["corpus"]["files"]) == 4  # md5 of every shard read
    assert (root / "data/prepared/test.txt").read_text().count("\n") == meta["sizes"]["test"]["sequences"]
    for name in ("counts.npy", "summary.json", "lengths.npy"):
        assert (root / "data/token_stats" / name).is_file()
    assert yaml.safe_load((root / "outputs/token_stats.json").read_text())["sentences"] == 200
    report = yaml.safe_load((root / "data/schedule/schedule.json").read_text())
    assert report["monotonicity"]["monotone"] and report["monotonicity"]["checked_steps"] == 101
    assert report["schedule"] == {"schedule": "spindle", "num_timesteps": 100, "spindle_lambda": 0.3}
    header = (root / "data/schedule/alpha_curves.csv").read_text().splitlines()[0]
    assert header.startswith("t,linear,spindle[")
    assert (root / "data/schedule/alpha_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert project["summaries"]["schedule"]["monotone"] is True


def test_rerunning_prepare_token_stats_and_schedule_gives_byte_identical_outputs(project):
    root, params = project["root"], project["params"]
    prepare.run(params, root)
    token_stats.run(params, root)
    schedule.run(params, root)
    assert tree_digest(root / "data", root / "outputs" / "token_stats.json") == project["digest"]
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_each_stage_logs_one_mlflow_run_with_its_params_and_artifacts(project):
    runs, root, params = project["runs"], project["root"], project["params"]
    assert {k: len(v) for k, v in runs.items()} == {"prepare": 1, "token_stats": 1, "schedule": 1}
    for stage_module in (prepare, token_stats, schedule):
        run = runs[stage_module.STAGE][0]
        assert run["status"] == "FINISHED"
        expected = {k: str(v) for k, v in select_params(params, stage_module.PARAMS).items()}
        assert run["params"] == expected
        assert any(k.startswith("dep_md5.") for k in run["tags"])
    assert "data.max_seq_len" in runs["prepare"][0]["params"]
    assert runs["schedule"][0]["params"]["diffusion.num_timesteps"] == "100"
    assert runs["token_stats"][0]["metrics"]["sentences"] == 200
    assert artifact_paths(runs["prepare"][0]["run_id"], root) == {"meta.json"}
    assert artifact_paths(runs["token_stats"][0]["run_id"], root) == {"summary.json", "token_stats.json"}
    assert artifact_paths(runs["schedule"][0]["run_id"], root) == {
        "schedule.json",
        "alpha_curves.csv",
        "alpha_curves.png",
    }


def test_a_failing_prepare_keeps_the_previous_output_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    good = tmp_path / "train.txt"
    good.write_text("a first sentence .\nanother one here .\nand a third one .\n", encoding="utf-8")
    bad = tmp_path / "test.txt"
    bad.write_bytes(b"fine line\n\xff\xfe broken bytes\n")
    root = tmp_path / "project"
    files = ["data.source=text_files", f"data.train_files=[{good}]"]
    from pipeline.data.sources import CorpusError

    with pytest.raises(CorpusError, match=r"test.txt is not valid UTF-8: line 2"):
        prepare.run(load_params(None, [*files, f"data.test_files=[{bad}]"]), root)
    assert not (root / "data" / "prepared").exists()
    assert [r["status"] for r in runs_by_stage(root)["prepare"]] == ["FAILED"]

    params = load_params(None, [*files, f"data.test_files=[{good}]"])
    prepare.run(params, root)
    before = tree_digest(root / "data" / "prepared")
    real = prepare.tokenize

    def fails_on_test(lines, tokenizer, max_seq_len, task, progress):
        if task.endswith("test"):  # train and validation are already written by now
            raise ValueError("tokenizer exploded")
        return real(lines, tokenizer, max_seq_len, task, progress)

    monkeypatch.setattr(prepare, "tokenize", fails_on_test)
    with pytest.raises(ValueError, match="exploded"):
        prepare.run(load_params(None, [*files, f"data.test_files=[{good}]", "data.max_seq_len=8"]), root)
    assert tree_digest(root / "data" / "prepared") == before
    assert sorted(p.name for p in (root / "data").iterdir()) == ["prepared"]  # no temporary directory left


def test_a_failing_schedule_check_writes_nothing(project, monkeypatch, tmp_path):
    import shutil

    from pipeline.diffusion import checks
    from pipeline.diffusion.schedules import ScheduleError

    root = tmp_path / "copy"
    shutil.copytree(project["root"] / "data", root / "data")
    before = tree_digest(root / "data" / "schedule")

    def broken(sched, progress=None):
        return {
            "monotone": False,
            "endpoints_ok": True,
            "max_alpha_increase": 0.1,
            "worst_step": 7,
            "worst_id": 1996,
            "alpha_0_max_error": 0.0,
            "alpha_T_max_error": 0.0,
        }

    monkeypatch.setattr(checks, "check_monotone", broken)
    with pytest.raises(ScheduleError, match="step 7 for id 1996"):
        schedule.run(project["params"], root)
    assert tree_digest(root / "data" / "schedule") == before
    assert not [p for p in (root / "data").iterdir() if p.name.startswith(".")]


def test_missing_inputs_are_named(tmp_path, lm1b_dir):
    params = tiny_params(lm1b_dir)
    with pytest.raises(FileNotFoundError, match=r"data/prepared/meta.json"):
        token_stats.run(params, tmp_path)
    with pytest.raises(FileNotFoundError, match="token_stats"):
        schedule.run(params, tmp_path)
    with pytest.raises(FileNotFoundError, match="models/final"):
        evaluate.run(params, tmp_path)
    assert not (tmp_path / "mlflow.db").exists()  # no run for a stage that cannot start


def test_the_corpus_mirror_is_resolved_from_the_main_repository(tmp_path, monkeypatch, lm1b_dir):
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "lm1b").symlink_to(lm1b_dir)
    repo = tmp_path / "repo"
    exp_copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    exp_copy.mkdir(parents=True)
    from pipeline.assembly.corpus import corpus_dir

    params = load_params(None, ["data.mirror_dir=../shared/data/lm1b"])
    expected = (tmp_path / "shared" / "data" / "lm1b").resolve()
    assert corpus_dir(params, repo) == expected
    assert corpus_dir(params, exp_copy) == expected  # `dvc exp run --temp` copy
    monkeypatch.setenv("DBERT_LM1B_DIR", str(tmp_path / "elsewhere"))
    assert corpus_dir(params, repo) == (tmp_path / "elsewhere").resolve()


@pytest.mark.slow
def test_train_and_evaluate_write_model_metrics_plots_and_log_them(project, monkeypatch):
    root, params = project["root"], project["params"]
    summary = train.run(params, root)
    assert (root / "models/final/config.json").is_file()
    assert (root / "models/final/diffusion_schedule.json").is_file()
    metrics = yaml.safe_load((root / "outputs/train/metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["precision"] == "fp32"
    assert metrics["val_bound"] > 0 and metrics["mlflow_run_id"] == summary["mlflow_run_id"]
    history = (root / "outputs/train/history.csv").read_text().splitlines()
    assert history[0].startswith("step,loss,train_bound,val_bound") and len(history) >= 3
    assert (root / "outputs/train/curve.png").read_bytes()[:4] == b"\x89PNG"

    report = evaluate.run(params, root)
    out = root / "outputs/evaluate"
    flat = yaml.safe_load((out / "metrics.json").read_text())
    assert flat["bound.ppl_token_mean"] > 1 and "generation.bleu" in flat
    assert flat["judge.status"].startswith("off") and "judge.gen_ppl" not in flat  # no judge model here
    for task in ("prefix", "infill"):  # the conditional numbers sit beside the unconditional ones
        assert flat[f"conditional.{task}.ppl_token"] > 1 and flat[f"conditional.{task}.num_hidden_tokens"] > 0
        assert 0 <= flat[f"conditional.{task}.token_accuracy"] <= 1
    assert len((out / "samples.txt").read_text().splitlines()) == 4
    assert set(report["plots"]) == {"bound.png", "quality_diversity.png"}
    assert all((out / "plots" / name).read_bytes()[:4] == b"\x89PNG" for name in report["plots"])
    assert yaml.safe_load((out / "report.json").read_text())["label"] == "LM1B-sample"
    assert "steps_table" not in yaml.safe_load((out / "report.json").read_text())  # the samplers stage's
    assert not (root / "outputs/evaluate.partial").exists()  # a finished evaluation keeps no saved seeds
    import mlflow

    [version] = mlflow.MlflowClient().search_model_versions(f"run_id = '{metrics['mlflow_run_id']}'")
    assert float(version.tags["metric.bound.ppl_token_mean"]) == pytest.approx(flat["bound.ppl_token_mean"])

    compared = samplers.run(params, root)
    table = (root / "outputs/samplers/table.md").read_text()
    for sampler in params.evaluate.compare_samplers:
        assert f"| {sampler} |" in table
    assert "| ancestral | chain |" in table and "| confidence | no |" in table
    flat = yaml.safe_load((root / "outputs/samplers/metrics.json").read_text())
    assert flat["samplers.ancestral.2.model_calls_per_sample"] > 0 and "steps.2.ppl_token" in flat
    assert {"steps_bound.png", "steps_quality.png", "samplers_bleu.png"} <= set(compared["plots"])

    runs = runs_by_stage(root)
    train_run = next(r for r in runs["train"] if r["run_id"] == metrics["mlflow_run_id"])
    assert train_run["status"] == "FINISHED" and train_run["params"]["train.steps"] == "4"
    assert "val_bound" in train_run["metrics"]  # per-step metrics from the driver, same run
    trained = artifact_paths(train_run["run_id"], root)
    assert {"model/config.json", "model/model.safetensors", "metrics.json", "history.csv", "curve.png"} <= trained
    eval_run = runs["evaluate"][0]
    assert eval_run["params"]["evaluate.num_samples"] == "4"
    assert eval_run["tags"]["train_mlflow_run_id"] == train_run["run_id"]
    assert {"metrics.json", "report.json", "samples.txt", "plots/bound.png"} <= artifact_paths(eval_run["run_id"], root)

    # A training failure leaves the previous model and outputs exactly as they were.
    before = tree_digest(root / "models", root / "outputs" / "train")

    def failing(params, layout, *, export_dir=None, **kwargs):
        (Path(export_dir) / "config.json").write_text("{half")
        raise RuntimeError("boom")

    monkeypatch.setattr("pipeline.train.ray.driver.run_training", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train.run(params, root)
    assert tree_digest(root / "models", root / "outputs" / "train") == before
    assert not [p for p in (root / "models").iterdir() if p.name.startswith(".")]


def test_the_bounds_saved_seeds_are_kept_per_model_data_and_settings(tmp_path):
    """A cut-off evaluation's seeds are read back only by an evaluation of the same model, test
    data and params: another model, split or bound setting gets its own folder."""
    from pipeline.artifacts import Layout

    layout = Layout(tmp_path)
    (tmp_path / "models/final").mkdir(parents=True)
    (tmp_path / "models/final/model.safetensors").write_bytes(b"weights")
    (tmp_path / "data/prepared/test").mkdir(parents=True)
    (tmp_path / "data/prepared/test/ids.npy").write_bytes(b"ids")
    (tmp_path / "data/token_stats").mkdir(parents=True)
    (tmp_path / "data/token_stats/lengths.npy").write_bytes(b"lengths")
    params = load_params(REPO / "params.yaml")
    first = evaluate._bound_cache(params, layout, layout.model)
    assert first.parent == tmp_path / "outputs/evaluate.partial"
    assert evaluate._bound_cache(params, layout, layout.model) == first
    assert evaluate._bound_cache(with_values(params, {"evaluate.table_steps": [4]}), layout, layout.model) == first
    assert evaluate._bound_cache(with_values(params, {"evaluate.bound_steps": 7}), layout, layout.model) != first
    (tmp_path / "models/final/model.safetensors").write_bytes(b"other weights")
    assert evaluate._bound_cache(params, layout, layout.model) != first
