"""The export loads in plain `transformers`, and `load_exported` reads every format.

Tiny random encoders (2 layers, hidden 32) over the default model's WordPiece vocabulary, every
parameter nudged so the time modules matter. A time-agnostic (TAD) export is its family's own
masked LM; the time designs load through `trust_remote_code` with the shipped modeling file;
exports written before format 2 (config `diffusion_bert`, weights under `mlm.`) still load.
"""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, BertForMaskedLM

from pipeline.artifacts import write_json
from pipeline.diffusion.schedules import build_schedule
from pipeline.model import modeling_diffusion_bert
from pipeline.model.denoiser import DiffusionBertForDenoising
from pipeline.model.export import (
    DIFFUSION_CONFIG_FILE,
    MODELING_FILE,
    SCHEDULE_FILE,
    encoder_layout,
    export_model,
    load_exported,
)
from pipeline.model.families import FAMILIES, FAMILY_NAMES
from pipeline.model.loading import build_denoiser, random_encoder_config

T = 50
TIMED = ["embedding", "layerwise", "prefix"]
DIFFUSION = {"schedule": "linear", "num_timesteps": T, "hybrid_lambda": 0.01}
SENTENCES = ["the cat sat on the mat .", "stocks fell sharply on monday after the report", "hello there"]


def tiny(family: str, design: str, tokenizer, source: str = "random") -> DiffusionBertForDenoising:
    config = random_encoder_config(family, tokenizer, 32, 2, 2, 64, max_positions=32)
    model = build_denoiser(source, time_design=design, num_timesteps=T, random_config=config, diffusion=DIFFUSION)
    with torch.no_grad():  # make every part non-trivial (the time modules' last layers start at zero)
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return model.eval()


def batch(tokenizer):
    """Real WordPieces with padding and a few [MASK]s, and one time step per row: [3, L], [3]."""
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"].bool()
    ids[0, 2:4] = tokenizer.mask_token_id
    return ids, attn, torch.tensor([0.1, 0.5, 0.9])


def export(model, tokenizer, directory: Path) -> Path:
    return export_model(model, tokenizer, build_schedule("linear", T), directory)


def strings(value):
    """Every string in a JSON value, keys included."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_time_agnostic_export_is_its_familys_plain_masked_lm(family, tokenizer, tmp_path):
    model = tiny(family, "none", tokenizer)
    export(model, tokenizer, tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == family
    assert not (tmp_path / MODELING_FILE).exists()
    ids, attn, _ = batch(tokenizer)
    with torch.no_grad():
        expected = model.denoise(ids, attn)
        mlm = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(mlm(input_ids=ids, attention_mask=attn.long()).logits, expected, atol=1e-5)
        if family == "bert":
            bert = BertForMaskedLM.from_pretrained(tmp_path).eval()
            assert torch.allclose(bert(input_ids=ids, attention_mask=attn.long()).logits, expected, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("design", TIMED)
def test_a_time_conditioned_export_loads_through_trust_remote_code(family, design, tokenizer, tmp_path):
    model = tiny(family, design, tokenizer)
    export(model, tokenizer, tmp_path)
    assert (tmp_path / MODELING_FILE).is_file()
    ids, attn, s = batch(tokenizer)
    with torch.no_grad():
        expected = model.denoise(ids, attn, s)
        loaded = AutoModelForMaskedLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
        assert type(loaded).__module__ != DiffusionBertForDenoising.__module__  # the shipped file's class
        assert torch.allclose(loaded(ids, attn, s=s).logits, expected, atol=1e-5)
        if family == "bert":
            base = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
            assert torch.allclose(base.denoise(ids, attn, s), expected, atol=1e-5)


def test_the_shipped_modeling_file_needs_only_torch_and_transformers(tokenizer, tmp_path):
    export(tiny("bert", "layerwise", tokenizer), tokenizer, tmp_path)
    tree = ast.parse((tmp_path / MODELING_FILE).read_text(encoding="utf-8"))
    roots = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    roots |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers"}
    assert encoder_layout(FAMILIES["bert"]) == modeling_diffusion_bert.BERT_LAYOUT


@pytest.mark.parametrize("design", ["none", *TIMED])
def test_load_exported_round_trips_the_new_format(design, tokenizer, tmp_path):
    model = tiny("bert", design, tokenizer)
    export(model, tokenizer, tmp_path)
    assert json.loads((tmp_path / DIFFUSION_CONFIG_FILE).read_text())["format_version"] == 2
    loaded, loaded_tokenizer, schedule = load_exported(tmp_path)
    assert isinstance(loaded, DiffusionBertForDenoising) and type(loaded.mlm) is type(model.mlm)
    assert loaded.config.time_design == design and loaded.config.num_timesteps == T
    assert loaded.config.diffusion == DIFFUSION and schedule.num_timesteps == T
    assert loaded_tokenizer.mask_token_id == tokenizer.mask_token_id
    ids, attn, s = batch(tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded.denoise(ids, attn, s), model.denoise(ids, attn, s), atol=1e-5)


@pytest.mark.parametrize("design", ["none", *TIMED])
def test_load_exported_still_reads_exports_written_before_format_2(design, tokenizer, tmp_path):
    model = tiny("bert", design, tokenizer)
    model.save_pretrained(tmp_path)  # what export_model wrote before: config diffusion_bert, weights under mlm.
    tokenizer.save_pretrained(tmp_path)
    write_json(build_schedule("linear", T).describe(), tmp_path / SCHEDULE_FILE)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "diffusion_bert"
    loaded, _, schedule = load_exported(tmp_path)
    assert loaded.config.time_design == design and schedule.num_timesteps == T
    ids, attn, s = batch(tokenizer)
    with torch.no_grad():
        assert torch.allclose(loaded.denoise(ids, attn, s), model.denoise(ids, attn, s), atol=1e-5)


@pytest.mark.parametrize("design", ["none", "prefix"])
def test_the_exported_configs_name_no_local_path(design, tokenizer, tmp_path):
    checkpoint = tmp_path / "checkpoint"  # an encoder loaded from a directory records its absolute path
    config = random_encoder_config("bert", tokenizer, 32, 2, 2, 64, max_positions=32)
    AutoModelForMaskedLM.from_config(config).save_pretrained(checkpoint)
    model = tiny("bert", design, tokenizer, source=str(checkpoint))
    assert model.mlm.config.name_or_path == str(checkpoint)
    out = export(model, tokenizer, tmp_path / "export")
    for name in ("config.json", DIFFUSION_CONFIG_FILE, SCHEDULE_FILE, "tokenizer_config.json"):
        text = (out / name).read_text(encoding="utf-8")
        assert str(tmp_path) not in text and sys.prefix not in text, name
        assert not [v for v in strings(json.loads(text)) if v.startswith(("/", "~"))], name


def test_an_export_of_a_newer_format_is_refused_by_name(tokenizer, tmp_path):
    export(tiny("bert", "none", tokenizer), tokenizer, tmp_path)
    write_json({"format_version": 99, "time_design": "none", "num_timesteps": T}, tmp_path / DIFFUSION_CONFIG_FILE)
    with pytest.raises(ValueError, match="format 99"):
        load_exported(tmp_path)
