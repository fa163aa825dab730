"""params.yaml schema: defaults, overrides, and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import Params, ParamsError, load_params, parse_override

ROOT = Path(__file__).resolve().parents[1]


def test_the_committed_params_file_is_valid_and_complete():
    params = load_params(ROOT / "params.yaml")
    assert params.diffusion.schedule == "spindle" and params.model.time_design == "none"
    assert set(params.flat()) == set(Params().flat())


def test_overrides_use_dvc_syntax_and_parse_yaml_values():
    params = load_params(ROOT / "params.yaml", ["train.lr=3e-4", "train.packed=true", "evaluate.seeds=[4,5]"])
    assert params.train.lr == 3e-4 and params.train.packed is True and params.evaluate.seeds == [4, 5]
    assert parse_override("model.name_or_path=bert-base-uncased") == (["model", "name_or_path"], "bert-base-uncased")


@pytest.mark.parametrize(
    "override,fragment",
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
