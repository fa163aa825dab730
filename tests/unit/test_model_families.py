"""The denoiser over every supported masked-LM family (BERT, RoBERTa, DistilBERT, ModernBERT).

Tiny random encoders (2 layers, hidden 32, 2 heads) over the default model's WordPiece
vocabulary; every time design either runs for a family or is refused by name. The family
adapters are checked against the families' own computations (RoBERTa's positions), against the
legacy BERT code path (bit for bit), through a few training steps, an export round trip and
checkpoints saved with and without an MLM head.
"""

from __future__ import annotations

import dataclasses
from typing import get_args

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from pipeline.assembly.model import model_from_params
from pipeline.config import ModelParams, ParamsError, load_params
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import diffusion_loss
from pipeline.diffusion.schedules import build_schedule
from pipeline.model import families as families_module
from pipeline.model.denoiser import DiffusionBertConfig, DiffusionBertForDenoising
from pipeline.model.export import export_model, load_exported
from pipeline.model.families import FAMILIES, FAMILY_NAMES, UnsupportedDesignError
from pipeline.model.loading import (
    ModelLoadError,
    build_denoiser,
    load_mlm,
    random_bert_config,
    random_encoder_config,
)
from pipeline.vocab import TIME_DESIGNS
from tests.support.tiny import TINY_MODEL

ZERO_INIT = ["none", "embedding", "layerwise"]
T = 50
SENTENCES = ["the cat sat on the mat .", "stocks fell sharply on monday after the report", "hello there"]


def tiny_config(family: str, tokenizer, positions: int = 32):
    return random_encoder_config(family, tokenizer, 32, 2, 2, 64, max_positions=positions)


def tiny(family: str, design: str, tokenizer, seed: int = 0) -> DiffusionBertForDenoising:
    config = tiny_config(family, tokenizer)
    return build_denoiser("random", time_design=design, num_timesteps=T, random_config=config, seed=seed).eval()


def batch(tokenizer):
    """Real WordPieces with [CLS], [SEP], [PAD] (0) and a few [MASK]s: [3, L]."""
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ids, attn = enc["input_ids"], enc["attention_mask"].bool()
    ids[0, 2:4] = tokenizer.mask_token_id
    assert not attn.all() and (ids == tokenizer.pad_token_id).any()
    return ids, attn


def perturb_time_modules(model: DiffusionBertForDenoising) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("mlm."):
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def refusal(family: str, design: str) -> str | None:
    return FAMILIES[family].refused.get(design)


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("design", TIME_DESIGNS)
def test_every_design_runs_for_every_family_or_is_refused_by_name(family, design, tokenizer):
    """Shapes and finiteness, with and without `positions`; at init the zero-initialised designs
    equal the plain MLM at every position, pads included (RoBERTa's `embedding` design only does
    if its embeddings get the padding-aware position ids RoBERTa gives input_ids); once the time
    modules move, the output depends on s (a wrong layer list or embedding table would not)."""
    if refusal(family, design):
        with pytest.raises(ModelLoadError, match=f"time design '{design}' is not supported for the {family} family"):
            tiny(family, design, tokenizer)
        return
    model = tiny(family, design, tokenizer)
    assert model.config.family == family and model.encoder_family is FAMILIES[family]
    ids, attn = batch(tokenizer)
    s = torch.tensor([0.1, 0.5, 0.9])
    positions = (ids == tokenizer.mask_token_id) | (torch.arange(ids.shape[1]) == 1)
    with torch.no_grad():
        full = model.denoise(ids, attn, s)
        some = model.denoise(ids, attn, s, positions)
        assert full.shape == (*ids.shape, tokenizer.vocab_size) and torch.isfinite(full).all()
        assert some.shape == (int(positions.sum()), tokenizer.vocab_size) and torch.isfinite(some).all()
        assert torch.allclose(some, full[positions], atol=1e-5)
        if design in ZERO_INIT:
            reference = model.mlm(input_ids=ids, attention_mask=attn.long()).logits
            for t in (0.2, 0.9):
                assert torch.equal(model.denoise(ids, attn, torch.full((3,), t)), reference), f"differs at s={t}"
        if design != "none":
            perturb_time_modules(model)
            early = model.denoise(ids, attn, torch.full((3,), 0.1))
            late = model.denoise(ids, attn, torch.full((3,), 0.9))
            assert torch.isfinite(early).all() and not torch.allclose(early, late, atol=1e-4)


def reference_position_ids(family: str, mlm, ids):
    """What the family itself computes, without the adapter."""
    if family == "roberta":
        embeddings = mlm.roberta.embeddings
        return embeddings.create_position_ids_from_input_ids(ids, embeddings.padding_idx)
    return torch.arange(ids.shape[1])[None, :].expand(ids.shape[0], -1)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prefix_design_keeps_the_familys_own_content_position_ids(family, tokenizer):
    model = tiny(family, "prefix", tokenizer)
    ids, attn = batch(tokenizer)
    seen = {}
    encoder = model.encoder_family.encoder(model.mlm)
    hook = encoder.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        model.denoise(ids, attn, torch.zeros(3))
    hook.remove()
    own = reference_position_ids(family, model.mlm, ids)  # [B, L]
    expected = torch.cat([own[:, :1], own[:, :1], own[:, 1:]], dim=1)  # the time token shares [CLS]'s
    assert torch.equal(seen["position_ids"], expected)
    assert ("token_type_ids" in seen) == (family in ("bert", "roberta"))
    if family == "roberta":  # content counts from padding_idx + 1, pads sit at padding_idx
        pad = tokenizer.pad_token_id
        assert model.mlm.config.pad_token_id == pad
        assert expected[0, 0] == pad + 1 and expected[2, -1] == pad


def test_roberta_prefix_equals_a_hand_built_roberta_forward(tokenizer):
    """End to end against RoBERTa's own modules: [<s>, time, content...] at RoBERTa's positions."""
    model = tiny("roberta", "prefix", tokenizer)
    ids, attn = batch(tokenizer)
    s = torch.tensor([0.0, 0.5, 1.0])
    roberta, head = model.mlm.roberta, model.mlm.lm_head
    with torch.no_grad():
        words = roberta.embeddings.word_embeddings(ids)
        time = model.prefix_table((s * T).round().long())[:, None, :]
        own = roberta.embeddings.create_position_ids_from_input_ids(ids, roberta.embeddings.padding_idx)
        hidden = roberta(
            inputs_embeds=torch.cat([words[:, :1], time, words[:, 1:]], dim=1),
            position_ids=torch.cat([own[:, :1], own[:, :1], own[:, 1:]], dim=1),
            attention_mask=torch.cat([attn[:, :1], torch.ones_like(attn[:, :1]), attn[:, 1:]], dim=1).long(),
        ).last_hidden_state
        expected = head(torch.cat([hidden[:, :1], hidden[:, 2:]], dim=1))
        assert torch.allclose(model.denoise(ids, attn, s), expected, atol=1e-6)


def legacy_bert_logits(model: DiffusionBertForDenoising, ids, attn, s):
    """The BERT-only forward the denoiser had before families: the published numbers' code path."""
    bert, design = model.mlm.bert, model.config.time_design
    batch_size, length = ids.shape
    kwargs: dict = {"attention_mask": attn.long()}
    if design in ("none", "layerwise"):
        kwargs["input_ids"] = ids
        if design == "layerwise":
            model._layer_offsets = [mlp(s)[:, None, :] for mlp in model.layer_time]
    elif design == "embedding":
        embeds = bert.embeddings.word_embeddings(ids)
        kwargs["inputs_embeds"] = embeds + model.time_embedding(s).to(embeds.dtype)[:, None, :]
    else:
        step = (s.float() * model.config.num_timesteps).round().long().clamp(0, model.config.num_timesteps)
        words = bert.embeddings.word_embeddings(ids)
        kwargs["inputs_embeds"] = torch.cat([words[:, :1], model.prefix_table(step)[:, None, :], words[:, 1:]], 1)
        pos = torch.arange(length)
        kwargs["position_ids"] = torch.cat([pos[:1], pos[:1], pos[1:]])[None, :].expand(batch_size, -1)
        ones = torch.ones_like(attn[:, :1])
        kwargs["attention_mask"] = torch.cat([attn[:, :1], ones, attn[:, 1:]], 1).long()
        kwargs["token_type_ids"] = torch.zeros(batch_size, length + 1, dtype=torch.long)
    try:
        hidden = bert(**kwargs).last_hidden_state
    finally:
        model._layer_offsets = None
    if design == "prefix":
        hidden = torch.cat([hidden[:, :1], hidden[:, 2:]], dim=1)
    return model.mlm.cls(hidden)


@pytest.mark.parametrize("design", TIME_DESIGNS)
def test_the_bert_family_is_the_legacy_bert_path_bit_for_bit(design, tokenizer):
    legacy_config = random_bert_config(tokenizer.vocab_size, 32, 2, 2, 64, max_positions=32)
    family_config = tiny_config("bert", tokenizer)
    assert family_config.to_dict() == legacy_config.to_dict()
    legacy = build_denoiser("random", time_design=design, num_timesteps=T, random_config=legacy_config, seed=3)
    model = build_denoiser("random", time_design=design, num_timesteps=T, random_config=family_config, seed=3)
    state, legacy_state = model.state_dict(), legacy.state_dict()
    assert list(state) == list(legacy_state) and all(torch.equal(state[k], legacy_state[k]) for k in state)
    assert all(k.startswith(("mlm.bert.", "mlm.cls.")) for k in state if k.startswith("mlm."))
    perturb_time_modules(model.eval())
    ids, attn = batch(tokenizer)
    s = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(model.denoise(ids, attn, s), legacy_bert_logits(model, ids, attn, s))


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("design", TIME_DESIGNS)
def test_a_few_diffusion_steps_lower_the_loss(family, design, tokenizer):
    if refusal(family, design):
        pytest.skip(refusal(family, design))
    model = tiny(family, design, tokenizer).train()
    schedule = build_schedule("linear", T)
    special = SpecialIds.from_tokenizer(tokenizer)
    ids, attn = batch(tokenizer)
    ids[0, 2:4] = ids[1, 2:4]  # no [MASK] in x0

    def loss():
        gen = torch.Generator().manual_seed(7)  # the same x_t every time: the loss must fall
        return diffusion_loss(model.denoise, ids, attn, schedule, special, gen).loss

    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = float(loss())
    for _ in range(3):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        end = float(loss())
    assert torch.isfinite(torch.tensor([start, end])).all() and end < start


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("design", TIME_DESIGNS)
def test_export_round_trips_every_family_and_design(family, design, tokenizer, tmp_path):
    if refusal(family, design):
        pytest.skip(refusal(family, design))
    model = tiny(family, design, tokenizer)
    with torch.no_grad():  # make every part non-trivial so the round trip is meaningful
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    export_model(model, tokenizer, build_schedule("linear", T), tmp_path)
    loaded, _, schedule = load_exported(tmp_path)
    assert type(loaded.mlm) is type(model.mlm) and loaded.config.family == family and schedule.num_timesteps == T
    assert loaded.config.time_design == design and loaded.max_positions == model.max_positions
    ids, attn = batch(tokenizer)
    s = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.equal(loaded.denoise(ids, attn, s), model.eval().denoise(ids, attn, s))


def small_encoder_config(family: str, tokenizer):
    return tiny_config(family, tokenizer)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_checkpoint_with_an_mlm_head_keeps_its_head(family, tokenizer, tmp_path):
    config = small_encoder_config(family, tokenizer)
    torch.manual_seed(1)
    saved = AutoModelForMaskedLM.from_config(config)
    head_prefixes = FAMILIES[family].head_prefixes
    with torch.no_grad():  # a head no initialiser would produce
        for name, p in saved.named_parameters():
            if name.startswith(head_prefixes):
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    saved.save_pretrained(tmp_path)
    loaded = load_mlm(str(tmp_path))
    head = {n: p for n, p in saved.state_dict().items() if n.startswith(head_prefixes)}
    assert head and all(torch.equal(loaded.state_dict()[n], p) for n, p in head.items())
    model = build_denoiser(str(tmp_path), time_design="none").eval()
    ids, attn = batch(tokenizer)
    with torch.no_grad():
        assert torch.equal(model.denoise(ids, attn), saved.eval()(input_ids=ids, attention_mask=attn.long()).logits)


def leave_missing_weights_uninitialised(monkeypatch, config) -> None:
    """The transformers 5 pitfall, forced: every weight missing from the checkpoint comes back NaN
    (as an uninitialised `cls.predictions.bias` can), so only `init_mlm_head` can make it finite."""
    mlm_class = type(AutoModelForMaskedLM.from_config(config))
    original = mlm_class.from_pretrained.__func__

    def poisoned(cls, *args, **kwargs):
        model, info = original(cls, *args, **kwargs)
        with torch.no_grad():
            for key in info["missing_keys"]:
                model.get_parameter(key).fill_(float("nan"))
        return model, info

    monkeypatch.setattr(mlm_class, "from_pretrained", classmethod(poisoned))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_checkpoint_without_an_mlm_head_gets_a_finite_deterministic_head(family, tokenizer, tmp_path, monkeypatch):
    """Only the base model saved (AutoModel): every head parameter must come out of
    `init_mlm_head` (identity transform, LayerNorm (1, 0), zero output bias, tied decoder), never
    left to whatever transformers 5 leaves in a missing bias."""
    config = small_encoder_config(family, tokenizer)
    torch.manual_seed(2)
    base = AutoModel.from_config(config)
    base.save_pretrained(tmp_path)
    leave_missing_weights_uninitialised(monkeypatch, config)
    first, second = load_mlm(str(tmp_path), seed=0), load_mlm(str(tmp_path), seed=5)
    adapter = FAMILIES[family]
    for (name, p), (_, q) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.isfinite(p).all() and torch.equal(p, q), name
    words = adapter.word_embeddings(first).weight
    assert torch.equal(words, base.get_input_embeddings().weight)  # the encoder is the checkpoint's
    for name, p in first.named_parameters():
        if not name.startswith(adapter.head_prefixes):
            continue
        if name.startswith(adapter.head_dense + "."):
            expected = torch.eye(p.shape[0]) if name.endswith("weight") else torch.zeros_like(p)
        elif p.shape == words.shape:
            expected = words  # the decoder stays tied to the word embeddings
        elif "norm" in name.lower() and name.endswith("weight"):
            expected = torch.ones_like(p)
        else:
            expected = torch.zeros_like(p)
        assert torch.equal(p, expected), name
    model = build_denoiser(str(tmp_path), time_design="layerwise").eval()
    ids, attn = batch(tokenizer)
    with torch.no_grad():
        assert torch.isfinite(model.denoise(ids, attn, torch.full((3,), 0.5))).all()


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_random_families_take_their_special_ids_and_positions_from_the_tokenizer(family, tokenizer):
    config = tiny_config(family, tokenizer, positions=32)
    assert config.model_type == family and config.pad_token_id == tokenizer.pad_token_id
    if family in ("roberta", "modernbert"):
        assert (config.bos_token_id, config.eos_token_id) == (tokenizer.cls_token_id, tokenizer.sep_token_id)
    model = build_denoiser("random", random_config=config, max_seq_len=32)
    assert model.encoder_family.word_embeddings(model.mlm).padding_idx == tokenizer.pad_token_id
    assert model.max_positions == 32
    ids = torch.full((1, 32), tokenizer.mask_token_id)
    ids[0, 0], ids[0, -1] = tokenizer.cls_token_id, tokenizer.sep_token_id
    with torch.no_grad():
        assert torch.isfinite(model.eval().denoise(ids)).all()  # the last position fits the table
    with pytest.raises(ModelLoadError, match="above the model's 32 positions"):
        build_denoiser("random", random_config=config, max_seq_len=33)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_model_from_params_builds_the_family_params_name(family):
    params = load_params(None, [*TINY_MODEL, f"model.family={family}", "model.time_design=layerwise"])
    model = model_from_params(params, build_schedule("linear", params.diffusion.num_timesteps))
    assert model.mlm.config.model_type == family and model.config.family == family


def test_the_params_schema_knows_exactly_the_supported_families():
    assert get_args(ModelParams.model_fields["family"].annotation) == FAMILY_NAMES
    assert load_params(None, []).model.family == "bert"
    with pytest.raises(ParamsError, match=r"model.family"):
        load_params(None, ["model.family=electra"])


def test_an_unsupported_family_is_refused_by_name(tokenizer, tmp_path):
    electra = AutoConfig.for_model(
        "electra", vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    message = "'electra' is not a supported encoder family; choose one of bert, roberta, distilbert, modernbert"
    with pytest.raises(ModelLoadError, match=message):
        build_denoiser("random", random_config=electra)
    with pytest.raises(ModelLoadError, match="'electra' is not a supported"):
        random_encoder_config("electra", tokenizer, 16, 1, 2, 32)
    AutoModelForMaskedLM.from_config(electra).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=message):
        load_mlm(str(tmp_path))


def test_a_design_a_family_refuses_is_refused_naming_family_design_and_reason(tokenizer, monkeypatch):
    strict = dataclasses.replace(FAMILIES["distilbert"], refused={"prefix": "no room for a time token"})
    with pytest.raises(UnsupportedDesignError, match="'prefix' is not supported for the distilbert family: no room"):
        strict.check_design("prefix")
    monkeypatch.setattr(families_module, "FAMILIES", {**FAMILIES, "distilbert": strict})
    config = tiny_config("distilbert", tokenizer)
    with pytest.raises(ModelLoadError, match="'prefix' is not supported for the distilbert family: no room"):
        build_denoiser("random", time_design="prefix", random_config=config)
    with pytest.raises(ValueError, match="'prefix' is not supported for the distilbert family"):
        DiffusionBertForDenoising(DiffusionBertConfig(bert=config.to_dict(), time_design="prefix"))
    build_denoiser("random", time_design="layerwise", random_config=config)  # the others still build


def test_a_config_written_before_families_reads_as_bert():
    legacy = random_bert_config(50, 16, 1, 2, 32).to_dict()
    del legacy["model_type"]
    config = DiffusionBertConfig(bert=legacy)
    assert config.family == "bert" and type(config.encoder_config()).__name__ == "BertConfig"
