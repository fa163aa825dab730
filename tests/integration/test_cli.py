"""The `dbert` CLI through typer's CliRunner (and once as `python -m stages.cli`): help texts, the
first three stages on real LM1B-sample lines, params, one-line errors, generation from a tiny
exported model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

REPO = Path(__file__).resolve().parents[2]
PARAMS = REPO / "params.yaml"
COMMANDS = (
    "prepare",
    "token-stats",
    "schedule",
    "train",
    "evaluate",
    "tune",
    "ablation",
    "generate",
    "mlflow-ui",
    "params",
)

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def assert_one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_the_app_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_naming_its_options(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0, result.output
    for option in ("--params", "--set", "--root"):
        assert option in result.stdout
    if command in ("prepare", "token-stats", "schedule", "train", "evaluate", "tune", "ablation"):
        assert "Reads" in result.stdout and "Writes" in result.stdout


def test_stage_specific_options_are_documented():
    assert "--resume" in invoke("train", "--help").stdout
    assert "--apply" in invoke("tune", "--help").stdout
    ablation_help = invoke("ablation", "--help").stdout
    for option in ("--row", "--fresh", "--background"):
        assert option in ablation_help
    generate_help = invoke("generate", "--help").stdout
    for option in (
        "--model",
        "--num",
        "--length",
        "--steps",
        "--top-k",
        "--top-p",
        "--temperature",
        "--seed",
        "--output",
    ):
        assert option in generate_help
    ui_help = invoke("mlflow-ui", "--help").stdout
    assert "--host" in ui_help and "127.0.0.1" in ui_help and "--port" in ui_help


def test_prepare_token_stats_and_schedule_run_on_a_tiny_corpus(tmp_path, lm1b_dir):
    common = ("--params", str(PARAMS), "--root", str(tmp_path))
    result = invoke("prepare", *common, "--set", "data.max_sentences=200", "--set", f"data.mirror_dir={lm1b_dir}")
    assert result.exit_code == 0, result.output
    assert "train_sequences: 200" in result.stdout
    assert (tmp_path / "data/prepared/train/ids.npy").is_file()

    result = invoke("token-stats", *common)
    assert result.exit_code == 0, result.output
    assert "sentences: 200" in result.stdout
    assert (tmp_path / "outputs/token_stats.json").is_file()

    result = invoke("schedule", *common)
    assert result.exit_code == 0, result.output
    assert "monotone: True" in result.stdout
    assert (tmp_path / "data/schedule/alpha_curves.png").is_file()
    assert (tmp_path / "mlflow.db").is_file()  # the stage runs were recorded in the root's store


def test_params_prints_the_resolved_params_as_yaml():
    result = invoke("params", "--params", str(PARAMS), "--set", "train.lr=3e-4", "--set", "evaluate.seeds=[1,2]")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["train"]["lr"] == pytest.approx(3e-4)
    assert resolved["evaluate"]["seeds"] == [1, 2]
    assert set(resolved) >= {"data", "model", "diffusion", "train", "evaluate", "tune", "tracking"}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lrr=1", "train.lrr"),
        ("train.lr=-1", "train.lr"),
        ("trainlr", "key=value"),
        ("diffusion.spindle_lambda=0.9", "diffusion.spindle_lambda"),
    ],
)
def test_an_invalid_set_is_one_line_naming_the_key(override, fragment):
    assert_one_line_error(invoke("params", "--params", str(PARAMS), "--set", override), fragment)


def test_a_missing_params_file_is_one_line(tmp_path):
    assert_one_line_error(invoke("params", "--params", str(tmp_path / "nope.yaml")), "nope.yaml")


def test_a_missing_corpus_is_one_line_naming_the_path_and_writes_nothing(tmp_path):
    missing = tmp_path / "no" / "lm1b"
    result = invoke(
        "prepare", "--params", str(PARAMS), "--root", str(tmp_path / "project"), "--set", f"data.mirror_dir={missing}"
    )
    assert_one_line_error(result, str(missing))
    assert not (tmp_path / "project" / "data" / "prepared").exists()
    assert not (tmp_path / "project" / "data").exists()


def test_stages_without_their_inputs_say_what_to_run(tmp_path):
    common = ("--params", str(PARAMS), "--root", str(tmp_path))
    assert_one_line_error(invoke("token-stats", *common), "data/prepared/meta.json", "dbert prepare")
    assert_one_line_error(invoke("schedule", *common), "data/token_stats", "dbert token-stats")
    assert_one_line_error(invoke("train", *common), "data/prepared/train", "dbert prepare")
    assert_one_line_error(invoke("evaluate", *common), "models/final")
    assert_one_line_error(invoke("tune", *common), "data/prepared/train", "dbert prepare")
    assert_one_line_error(invoke("ablation", *common), "data/prepared/train", "dbert prepare")
    assert not (tmp_path / "data").exists() and not (tmp_path / "models").exists()


def test_a_background_ablation_logs_under_its_own_out_folder(tmp_path):
    """Two experiments with their own `ablation.out` run side by side (make schedules-parallel):
    each detached run's log and pid belong in its own folder, not in outputs/ablation/."""
    import time

    result = invoke(
        "ablation",
        "--params",
        str(PARAMS),
        "--root",
        str(tmp_path),
        "--set",
        "ablation.out=outputs/second",
        "--background",
    )
    assert result.exit_code == 0, result.output
    out = tmp_path / "outputs" / "second"
    pid = int((out / "run.pid").read_text())
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline and Path(f"/proc/{pid}").exists() and "error" not in (out / "run.log").read_text()
    ):
        time.sleep(0.5)
    assert "data/prepared/train" in (out / "run.log").read_text()  # the detached run failed on its inputs, there
    assert not (tmp_path / "outputs" / "ablation").exists()


def test_progress_goes_to_a_log_as_a_line_per_tenth_with_rate_and_time_left(monkeypatch, capsys):
    """A background run's log (stderr, not a terminal) says how far each task got: one line per
    10%, the rate measured from the first update on (a resumed training starts past 0)."""
    from stages.console import ENV_PROGRESS, RichProgress

    monkeypatch.setenv(ENV_PROGRESS, "log")
    with RichProgress() as progress:
        progress("training", 1200, 2000)  # resumed at step 1,200
        for _ in range(8):
            progress("training", 100, 2000)
        for _ in range(20):
            progress("bound", 1, 20)
    lines = capsys.readouterr().err.strip().splitlines()
    training = [line for line in lines if "training:" in line]
    assert [line.split("training: ")[1].split(" ")[0] for line in training] == [
        "1200/2000",
        "1400/2000",
        "1600/2000",
        "1800/2000",
        "2000/2000",
    ]
    assert "rate after the next update" in training[0] and "s each" in training[1] and "left" in training[1]
    assert sum("bound:" in line for line in lines) == 10  # 2, 4, ..., 20 of 20
    monkeypatch.delenv(ENV_PROGRESS)
    with RichProgress() as progress:
        progress("training", 2000, 2000)
    assert capsys.readouterr().err == ""  # not asked for: silent off a terminal, as before


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny random DiffusionBERT exported with the default tokenizer and a linear schedule."""
    from pipeline.diffusion.schedules import build_schedule
    from pipeline.model.export import export_model
    from pipeline.model.loading import build_denoiser, load_tokenizer, random_bert_config

    tokenizer = load_tokenizer("random")
    config = random_bert_config(tokenizer.vocab_size, 32, 2, 2, 64, max_positions=64)
    model = build_denoiser(
        "random",
        time_design="none",
        num_timesteps=50,
        random_config=config,
        seed=0,
        diffusion={"schedule": "linear", "num_timesteps": 50},
    )
    return export_model(
        model.eval(), tokenizer, build_schedule("linear", 50), tmp_path_factory.mktemp("model") / "export"
    )


def test_generate_prints_readable_lines(tmp_path, tiny_model):
    args = (
        "generate",
        "--params",
        str(PARAMS),
        "--root",
        str(tmp_path),
        "--model",
        str(tiny_model),
        "--num",
        "3",
        "--length",
        "6",
        "--steps",
        "4",
        "--top-k",
        "20",
        "--seed",
        "1",
    )
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.strip() and line.isprintable()
        assert "[MASK]" not in line and "[CLS]" not in line and "[SEP]" not in line and "[PAD]" not in line
    assert invoke(*args).stdout == result.stdout  # seeded

    out = tmp_path / "samples.txt"
    result = invoke(*args, "--output", str(out), "--track")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert out.read_text().splitlines() == lines
    from pipeline.tracking.store import find_runs

    tracked = find_runs(root=tmp_path, stage="generate")  # only --track records a run
    assert len(tracked) == 1 and tracked[0]["status"] == "FINISHED"


def test_generate_draws_lengths_from_the_histogram_when_there_is_one(tmp_path, tiny_model):
    import numpy as np

    (tmp_path / "data" / "token_stats").mkdir(parents=True)
    hist = np.zeros(5, dtype=np.int64)
    hist[4] = 10  # every training sentence has 4 content tokens
    np.save(tmp_path / "data" / "token_stats" / "lengths.npy", hist)
    result = invoke(
        "generate",
        "--params",
        str(PARAMS),
        "--root",
        str(tmp_path),
        "--model",
        str(tiny_model),
        "--num",
        "2",
        "--length",
        "0",
        "--steps",
        "4",
    )
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2


def test_generate_from_a_missing_model_is_one_line(tmp_path):
    missing = tmp_path / "no-model"
    assert_one_line_error(
        invoke("generate", "--params", str(PARAMS), "--root", str(tmp_path), "--model", str(missing)), str(missing)
    )
    assert_one_line_error(invoke("generate", "--params", str(PARAMS), "--root", str(tmp_path), "--num", "0"), "--num")


@pytest.mark.parametrize(
    ("option", "key"),
    [
        ("--top-p=1.5", "evaluate.top_p"),
        ("--steps=0", "evaluate.sample_steps"),
        ("--temperature=0", "evaluate.temperature"),
        ("--device=gpu", "evaluate.device"),
    ],
)
def test_an_out_of_range_generate_option_is_the_schema_error_naming_its_param(tmp_path, option, key):
    assert_one_line_error(invoke("generate", "--params", str(PARAMS), "--root", str(tmp_path), option), key)


def test_generate_on_a_gpu_that_is_not_there_says_so_in_one_line(tmp_path, tiny_model, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ("generate", "--params", str(PARAMS), "--root", str(tmp_path), "--model", str(tiny_model))
    assert_one_line_error(invoke(*args, "--device", "cuda:1"), "no CUDA GPU is visible")
    result = invoke(*args, "--num", "2", "--length", "4", "--steps", "2", "--device", "auto")  # auto: the CPU here
    assert result.exit_code == 0 and len(result.stdout.splitlines()) == 2, result.output


def test_mlflow_ui_binds_localhost_on_the_project_store(tmp_path):
    result = invoke("mlflow-ui", "--params", str(PARAMS), "--root", str(tmp_path), "--dry-run")
    assert result.exit_code == 0, result.output
    assert "--host 127.0.0.1" in result.stdout and "--port 5000" in result.stdout
    assert f"sqlite:///{tmp_path.resolve()}/mlflow.db" in result.stdout


def test_python_m_stages_cli_runs_and_fails_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DBERT_DEBUG", None)
    ok = subprocess.run(
        [sys.executable, "-m", "stages.cli", "params", "--params", str(PARAMS)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "diffusion:" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "stages.cli", "params", "--params", str(PARAMS), "--set", "model.time_design=sideways"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    assert "model.time_design" in bad.stderr


@pytest.fixture
def fake_tune(tmp_path, monkeypatch):
    """The real CLI and stage around a stand-in for Ray Tune (tests/integration/test_tune.py runs the real one):
    it writes the driver's own proposal format."""
    from pipeline.tune import driver, results

    proposed = {"model.time_design": "prefix", "train.lr": 0.0003}

    def run_tune(params, layout, *, parent_run_id=None):
        assert parent_run_id  # trials nest under the stage's MLflow run
        row = {"trial_id": "t1", "best_val_bound": 5.0, "steps": 4, **proposed}
        path = layout.tune_out / "best_params.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(results.proposal_yaml(proposed, row, "tune-test"))
        return driver.TuneOutcome(table=[row], best={**row, "overrides": dict(proposed)}, proposal_path=path)

    monkeypatch.setattr(driver, "run_tune", run_tune)
    for path in ("data/prepared/train", "data/prepared/validation", "data/token_stats"):
        (tmp_path / path).mkdir(parents=True)
    (tmp_path / "data/token_stats/counts.npy").write_bytes(b"")
    return proposed


def test_tune_prints_the_proposal_and_apply_runs_it_as_a_dvc_experiment(tmp_path, fake_tune, monkeypatch):
    from stages import tune

    common = ("tune", "--params", str(PARAMS), "--root", str(tmp_path))
    result = invoke(*common)
    assert result.exit_code == 0, result.output
    assert "model.time_design: prefix" in result.stdout
    assert "dvc exp run --temp -S model.time_design=prefix -S train.lr=0.0003" in result.stdout
    params_before = PARAMS.read_bytes()

    calls = []
    monkeypatch.setattr(tune, "run_command", lambda command, cwd: calls.append((command, cwd)) or 0)
    result = invoke(*common, "--apply")
    assert result.exit_code == 0, result.output
    command, cwd = calls[0]
    assert command[1:] == [
        "-m",
        "dvc",
        "exp",
        "run",
        "--temp",
        "-S",
        "model.time_design=prefix",
        "-S",
        "train.lr=0.0003",
    ]
    assert Path(cwd) == tmp_path
    assert PARAMS.read_bytes() == params_before  # never edits params.yaml

    monkeypatch.setattr(tune, "run_command", lambda command, cwd: 3)
    assert_one_line_error(invoke(*common, "--apply"), "dvc exp run", "exit code 3")

    from pipeline.tracking.store import find_runs

    runs = find_runs(root=tmp_path, stage="tune")
    assert len(runs) == 3 and runs[-1]["status"] == "FINISHED"
    assert runs[-1]["params"]["tune.steps"] and "train.lr" in runs[-1]["params"]


def test_a_tune_proposal_outside_the_schema_is_refused_by_key(tmp_path, fake_tune):
    fake_tune["train.lr"] = -1.0
    assert_one_line_error(invoke("tune", "--params", str(PARAMS), "--root", str(tmp_path), "--apply"), "train.lr")
