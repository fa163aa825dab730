"""dvc.yaml against the code, and a real `dvc repro` of the whole pipeline in a temporary git
repository (real LM1B-sample lines, a tiny random BERT, real MLflow store): everything runs once,
a second repro does nothing, each param reaches exactly the stages that read it, and
`dvc exp run` (in the workspace and in a `--temp` copy) reruns only what changed."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common import code_deps
from tests.support.dvc_fixtures import REPO, git, reproduced_repo, run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

PIPELINE = ("prepare", "token_stats", "schedule", "train", "evaluate", "samplers")


def dvc_yaml() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())


def _entries(items) -> dict[str, dict]:
    """DVC list entries (`- path` or `- path: {options}`) -> {path: options}."""
    out: dict[str, dict] = {}
    for item in items or []:
        if isinstance(item, dict):
            out.update({k: v or {} for k, v in item.items()})
        else:
            out[item] = {}
    return out


def test_the_pipeline_stages_are_the_six_and_tune_is_opt_in():
    stages = dvc_yaml()["stages"]
    assert list(stages) == list(PIPELINE)
    for name, stage in stages.items():
        assert stage["cmd"] == f"python -m stages.cli {name.replace('_', '-')}"


@pytest.mark.parametrize("name", PIPELINE)
def test_dvc_yaml_lists_exactly_the_code_data_and_params_the_stage_reads(name):
    stage = dvc_yaml()["stages"][name]
    module = importlib.import_module(f"stages.{name}")
    deps = stage["deps"]
    code = [d for d in deps if d.startswith(("pipeline/", "stages/"))]
    assert sorted(code) == sorted(code_deps(f"stages.{name}")), "dvc.yaml deps != the stage's import closure"
    assert len(code) == len(set(code))
    assert [d for d in deps if d not in code] == list(getattr(module, "INPUTS", ()))
    assert stage.get("params", []) == list(module.PARAMS)
    for path in (*code, "params.yaml"):
        assert (REPO / path).is_file(), path


def test_every_evaluate_param_reaches_the_evaluate_or_the_samplers_stage():
    from pipeline.config import EvalParams
    from stages import evaluate, samplers

    declared = {p.removeprefix("evaluate.") for p in (*evaluate.PARAMS, *samplers.PARAMS) if p.startswith("evaluate.")}
    assert set(EvalParams.model_fields) == declared
    assert not {"table_steps", "qd_top_k", "compare_samplers"} & set(
        evaluate.EVALUATE_KEYS
    )  # the table is not evaluate's


def test_outputs_metrics_and_plots_are_declared_as_documented():
    stages = dvc_yaml()["stages"]
    assert _entries(stages["prepare"]["outs"]) == {"data/prepared": {}}
    assert _entries(stages["token_stats"]["metrics"]) == {"outputs/token_stats.json": {"cache": False}}
    assert _entries(stages["train"]["outs"]) == {"models/final": {}}
    history = _entries(stages["train"]["plots"])["outputs/train/history.csv"]
    assert history == {"cache": False, "x": "step", "y": "val_bound"}
    for stage in stages.values():
        for kind in ("metrics", "plots"):
            assert all(opts.get("cache") is False for opts in _entries(stage.get(kind)).values())


# ---------------------------------------------------------------------------------------------
# A real repository (tests/support/dvc_fixtures.py: built and reproduced once per session, committed)
# ---------------------------------------------------------------------------------------------


def ran(done: subprocess.CompletedProcess) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", done.stdout + done.stderr))


def status_after(repo: Path, override: str) -> set[str]:
    """Stages `dvc status` reports as changed after setting one param (the file is restored)."""
    path = repo / "params.yaml"
    original = path.read_text()
    raw = yaml.safe_load(original)
    key, value = override.split("=", 1)
    group, name = key.split(".", 1)
    raw[group][name] = yaml.safe_load(value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        return set(json.loads(run(repo, "dvc", "status", "--json").stdout or "{}"))
    finally:
        path.write_text(original)


@pytest.mark.slow
def test_repro_runs_each_stage_once_and_params_reach_exactly_their_stages(reproduced_repo):
    repo, first = reproduced_repo.repo, reproduced_repo.first  # the first `dvc repro`, then committed
    assert ran(first) == set(PIPELINE), first.stdout
    for path in (
        "data/prepared/meta.json",
        "data/token_stats/counts.npy",
        "data/schedule/alpha_curves.png",
        "models/final/model.safetensors",
        "outputs/train/metrics.json",
        "outputs/train/history.csv",
        "outputs/evaluate/metrics.json",
        "outputs/evaluate/samples.txt",
        "outputs/evaluate/plots/bound.png",
    ):
        assert (repo / path).exists(), path
    assert (repo / "mlflow.db").is_file()

    again = run(repo, "dvc", "repro")
    assert ran(again) == set(), again.stdout
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status").stdout
    metrics = json.loads(run(repo, "dvc", "metrics", "show", "--json").stdout)
    shown = json.dumps(metrics)
    assert "val_bound" in shown and "bound.ppl_token_mean" in shown and "unigram_entropy_bits" in shown
    plots = run(repo, "dvc", "plots", "show", "--json", "outputs/train/history.csv").stdout
    assert "val_bound" in plots
    assert git(repo, "status", "--porcelain").stdout == ""  # every output is either committed or ignored

    expected = {
        "data.max_sentences=100": {"prepare"},
        "model.name_or_path=default": {"prepare", "train", "evaluate"},
        "diffusion.spindle_lambda=0.2": {"schedule", "train"},  # evaluate reads the schedule from the model
        "diffusion.hybrid_lambda=0.02": {"train", "evaluate"},
        "train.lr=0.0002": {"train"},
        "data.max_seq_len=24": {"prepare", "train", "evaluate", "samplers"},
        "evaluate.top_k=5": {"evaluate", "samplers"},
        "evaluate.qd_samples=3": {"samplers"},  # the sampler comparison never re-runs the bound
        "tracking.experiment=elsewhere": set(),
        "tune.steps=10": set(),
    }
    assert {k: status_after(repo, k) for k in expected} == expected

    # An experiment reruns only the stage its param reaches (the statuses above say which); the
    # model's downstream stages follow from their models/final dep, which the dvc.yaml test checks.
    # (A train param here would retrain and re-evaluate: a minute of this suite for DVC's own logic.)
    experiment = run(repo, "dvc", "exp", "run", "-S", "evaluate.qd_samples=3")
    assert ran(experiment) == {"samplers"}, experiment.stdout
    assert "Data and pipelines are up to date" in run(repo, "dvc", "status").stdout

    # In a `--temp` copy (under .dvc/tmp/exps) the relative corpus path still resolves against the
    # main repository, and the MLflow run lands in the main repository's store.
    temp = run(repo, "dvc", "exp", "run", "--temp", "-S", "data.max_sentences=100", "prepare")
    assert ran(temp) == {"prepare"}, temp.stdout + temp.stderr
    from pipeline.tracking.store import find_runs

    prepared = find_runs(root=repo, stage="prepare")
    assert len(prepared) == 2
    newest = prepared[0]
    assert newest["metrics"]["train.sequences"] == 100 and newest["status"] == "FINISHED"
    assert newest["tags"].get("dvc_exp_name")
    assert {r["tags"]["stage"] for r in find_runs(root=repo)} == set(PIPELINE)


def test_prepare_reruns_when_the_hashing_it_records_changes():
    """prepare writes file_md5 values into data/prepared/meta.json: the module that computes them
    is one of prepare's code deps, so changing the hashing reruns prepare."""
    import inspect

    from pipeline.lineage import file_md5

    source = Path(inspect.getsourcefile(file_md5)).resolve().relative_to(REPO).as_posix()
    assert source in dvc_yaml()["stages"]["prepare"]["deps"]


@pytest.mark.slow
def test_your_own_corpus_runs_end_to_end_from_text_files(reproduced_repo, tmp_path, lm1b_dir):
    """The README's "your own corpus": text files with one sentence per line, `data.source:
    text_files` in params.yaml, then `dvc repro` reruns every stage on them (a clone of the
    reproduced project, so the shared one stays as it is)."""
    from pipeline.data.sources import load_lm1b_mirror

    repo = tmp_path / "mine"
    git(tmp_path, "clone", "-q", str(reproduced_repo.repo), str(repo))
    (tmp_path / "shared").symlink_to(reproduced_repo.repo.parent / "shared")  # where mirror_dir points
    lines = load_lm1b_mirror(lm1b_dir, max_sentences=150)
    corpus = repo / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(lines.train[:120]) + "\n")
    (corpus / "test.txt").write_text("\n".join(lines.test[:30]) + "\n")
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="text_files", train_files=["corpus/train*.txt"], test_files=["corpus/test.txt"])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    done = run(repo, "dvc", "repro", timeout=900)
    assert ran(done) == set(PIPELINE), done.stdout
    meta = json.loads((repo / "data/prepared/meta.json").read_text())
    assert meta["source"] == "text_files"
    assert json.loads((repo / "outputs/evaluate/report.json").read_text())["label"] == "text_files"
    assert json.loads((repo / "outputs/evaluate/metrics.json").read_text())["bound.ppl_token_mean"] > 0
