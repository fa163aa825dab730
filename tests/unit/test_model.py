"""The BERT denoiser: time designs at initialisation, loading, export round trip, bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModel

from pipeline.model.denoiser import DiffusionBertForDenoising, register_auto_classes
from pipeline.model.loading import ModelLoadError, build_denoiser, load_mlm, random_bert_config

DESIGNS = ["none", "prefix", "layerwise", "embedding"]


def tiny_config(vocab: int = 50, positions: int = 32):
    return random_bert_config(
        vocab, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48, max_positions=positions
    )


def tiny(design: str, T: int = 100) -> DiffusionBertForDenoising:
    return build_denoiser("random", time_design=design, num_timesteps=T, random_config=tiny_config(), seed=0).eval()


def batch(vocab: int = 50):
    ids = torch.randint(5, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    attn = torch.ones_like(ids, dtype=torch.bool)
    attn[2, 6:] = False
    return ids, attn


@pytest.mark.parametrize("design", ["none", "layerwise", "embedding"])
def test_zero_initialised_designs_reproduce_the_pretrained_logits_for_every_t(design):
    model = tiny(design)
    ids, attn = batch()
    with torch.no_grad():
        reference = model.mlm(input_ids=ids, attention_mask=attn.long()).logits
        for s in torch.linspace(0, 1, 11):
            out = model.denoise(ids, attn, torch.full((3,), float(s)))
            assert torch.equal(out, reference), f"differs at s={float(s)}"


@pytest.mark.slow
@pytest.mark.parametrize("design", ["none", "layerwise", "embedding"])
def test_minilm_denoiser_equals_pretrained_minilm_at_init(design, tokenizer):
    model = build_denoiser("default", time_design=design, num_timesteps=2048).eval()
    reference = load_mlm("default").eval()
    enc = tokenizer(["the cat sat on the mat .", "stocks fell sharply on monday"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**enc).logits
        for s in (0.0, 0.37, 1.0):
            out = model.denoise(enc["input_ids"], enc["attention_mask"].bool(), torch.full((2,), s))
            assert torch.equal(out, expected)


def test_prefix_design_uses_its_own_time_table_and_depends_on_t():
    model = tiny("prefix", T=100)
    assert model.prefix_table.num_embeddings == 101  # ids 0..T, never WordPiece rows
    assert model.mlm.bert.embeddings.word_embeddings.num_embeddings == 50
    ids, attn = batch()
    with torch.no_grad():
        early = model.denoise(ids, attn, torch.zeros(3))
        late = model.denoise(ids, attn, torch.ones(3))
    assert early.shape == (3, 9, 50) and not torch.allclose(early, late)


def test_prefix_design_keeps_content_position_ids():
    model = tiny("prefix")
    seen = {}
    hook = model.mlm.bert.embeddings.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(pos=kwargs.get("position_ids")), with_kwargs=True
    )
    ids, attn = batch()
    with torch.no_grad():
        model.denoise(ids, attn, torch.zeros(3))
    hook.remove()
    assert seen["pos"][0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]


def test_logits_at_selected_positions_equal_the_full_logits_there():
    model = tiny("layerwise")
    ids, attn = batch()
    positions = torch.rand(ids.shape, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        full = model.denoise(ids, attn, torch.full((3,), 0.5))
        some = model.denoise(ids, attn, torch.full((3,), 0.5), positions)
    assert torch.allclose(some, full[positions], atol=1e-6)


@pytest.mark.parametrize("design", DESIGNS)
def test_export_round_trips_every_time_design_through_from_pretrained(design, tmp_path):
    model = tiny(design)
    with torch.no_grad():  # make the time modules non-trivial so the round trip is meaningful
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    register_auto_classes()
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DiffusionBertForDenoising) and loaded.config.time_design == design
    ids, attn = batch()
    s = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.allclose(loaded.denoise(ids, attn, s), model.denoise(ids, attn, s), atol=1e-6)


def test_minilm_loads_with_a_deterministic_finite_mlm_head():
    first, second = load_mlm("default"), load_mlm("default")
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
    assert torch.equal(first.cls.predictions.bias, torch.zeros_like(first.cls.predictions.bias))


def test_a_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        build_denoiser(str(tmp_path / "no-such-model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        build_denoiser(str(empty))


def test_an_unknown_time_design_is_refused_by_name():
    with pytest.raises(ModelLoadError, match="unknown time design 'sideways'"):
        build_denoiser("random", time_design="sideways", random_config=tiny_config())


def test_a_sequence_longer_than_the_position_table_is_refused():
    with pytest.raises(ModelLoadError, match="above the model's 32 positions"):
        build_denoiser("random", random_config=tiny_config(positions=32), max_seq_len=64)
    model = tiny("none")
    with pytest.raises(ValueError, match="exceeds the model's 32 position"):
        model.denoise(torch.ones(1, 40, dtype=torch.long))


def test_importing_the_library_does_not_import_ray_mlflow_or_dvc():
    code = (
        "import sys, pipeline, pipeline.config, pipeline.diffusion.loss, pipeline.diffusion.samplers, "
        "pipeline.model.loading, pipeline.data.stats, pipeline.eval.metrics\n"
        "bad = [m for m in ('ray', 'mlflow', 'dvc') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
