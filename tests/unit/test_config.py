"""params.yaml schema: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Params, ParamsError, load_params
from pipeline.overrides import parse_override

ROOT = Path(__file__).resolve().parents[2]


def test_the_committed_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert params.diffusion.schedule == "spindle" and params.model.time_design == "none"
    assert set(params.flat()) == set(Params().flat())


def test_overrides_use_dvc_syntax_and_parse_yaml_values():
    params = load_params(ROOT / "params.yaml", ["train.lr=3e-4", "train.packed=true", "evaluate.seeds=[4,5]"])
    assert params.train.lr == 3e-4 and params.train.packed is True and params.evaluate.seeds == [4, 5]
    assert parse_override("model.name_or_path=bert-base-uncased") == (["model", "name_or_path"], "bert-base-uncased")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("trainer.lr=1", "trainer: unknown key"),
        ("train.steps=many", "train.steps"),
        ("train.steps=0", "train.steps: Input should be greater than or equal to 1"),
        ("diffusion.schedule=cubic", "diffusion.schedule"),
        ("model.time_design=sideways", "model.time_design"),
        ("data.validation_fraction=1.5", "data.validation_fraction"),
        ("diffusion.spindle_lambda=0.4", "diffusion.spindle_lambda=0.4 breaks monotonicity"),
        ("evaluate.device=gpu", "evaluate.device"),
    ],
)
def test_a_bad_value_fails_with_a_message_that_names_the_key(override, fragment):
    with pytest.raises(ParamsError) as err:
        load_params(ROOT / "params.yaml", [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_an_override_without_equals_sign_is_refused():
    with pytest.raises(ParamsError, match="key=value"):
        load_params(None, ["train.lr"])


def test_a_missing_params_file_is_named(tmp_path):
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_flat_params_are_dotted_keys():
    flat = Params().flat()
    assert flat["train.lr"] == Params().train.lr and "diffusion.spindle_lambda" in flat


def test_the_evaluation_device_resolves_auto_and_refuses_a_cuda_device_that_is_not_there(monkeypatch):
    """`evaluate.device`: auto takes the GPU only when one is visible; an absent one is named
    before a model is loaded."""
    import torch

    from pipeline.model.precision import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU is visible"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="only 2 CUDA GPU"):
        resolve_device("cuda:2")
    with pytest.raises(ValueError, match="unknown device 'mps'"):
        resolve_device("mps")


# ---------------------------------------------------------------------------------------------
# Experiment files
# ---------------------------------------------------------------------------------------------


def test_an_experiment_file_is_its_overrides_and_keeps_the_carried_rows_fingerprints():
    """experiments/schedules.yaml gives the params the schedule experiment's rows were trained with:
    every committed row under reports/schedules/rows has the fingerprint the file's plan gives it."""
    import json

    from pipeline.ablation.rows import plan
    from pipeline.overrides import experiment_overrides

    root = Path(__file__).resolve().parents[2]
    for experiment, published in (("schedules", "reports/schedules/rows"), ("ablation", "reports/ablation/rows")):
        params = load_params(root / "params.yaml", experiment_overrides(root / f"experiments/{experiment}.yaml"))
        fingerprints = {run.key: run.fingerprint for run in plan(params)}
        carried = {
            p.parent.name: json.loads(p.read_text())["fingerprint"] for p in (root / published).glob("*/result.json")
        }
        assert carried and all(fingerprints[key] == value for key, value in carried.items()), experiment
    for path in sorted((root / "experiments").glob("*.yaml")):  # every experiment file is valid params
        load_params(root / "params.yaml", experiment_overrides(path))


def test_an_experiment_file_equals_the_same_set_arguments_and_set_still_wins(tmp_path):
    from pipeline.overrides import experiment_overrides

    path = tmp_path / "e.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 3.0e-4\nablation:\n  seeds: [0, 2]\n")
    overrides = experiment_overrides(path)
    assert overrides == ["train.steps=7", "train.lr=0.0003", "ablation.seeds=[0, 2]"]
    same = load_params(None, ["train.steps=7", "train.lr=3e-4", "ablation.seeds=[0,2]"])
    assert load_params(None, overrides) == same
    assert load_params(None, [*overrides, "train.steps=9"]).train.steps == 9


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "does not exist"),
        ("- a\n- b\n", "must hold a mapping of param groups"),
        ("steps: 3\n", "'steps' is not a group of keys"),
        ("train:\n  stepz: 3\n", "train.stepz: unknown key"),
    ],
)
def test_a_bad_experiment_file_is_refused_by_name(tmp_path, text, match):
    from pipeline.overrides import experiment_overrides

    path = tmp_path / "e.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ParamsError, match=match):
        load_params(None, experiment_overrides(path))
