"""Where each masked-LM encoder family keeps the parts the denoiser reaches into.

Why this module exists: the time designs (PAPER §5) do not treat the encoder as a black box.
`embedding` and `prefix` look up the token-embedding table themselves, `layerwise` hooks every
encoder layer, `prefix` builds the position ids (and token types) of a sequence with one extra
token, and every design reads logits through the family's own MLM head. The Hugging Face
families agree on none of these names or conventions (BERT: `bert.encoder.layer`, `cls`;
RoBERTa: positions counted from `padding_idx + 1`; DistilBERT: no token types and a head of four
loose modules; ModernBERT: rotary positions, `model.layers`, `head` + `decoder`). One small
adapter per family, kept here, lets `denoiser.py` and `loading.py` stay free of
`if model_type == ...`; supporting another family is one more entry in `FAMILIES`.

Every time design works for every family listed here (see `EncoderFamily.refused` for the
mechanism that refuses a design a family cannot honour, with a message naming both and why).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING


class UnsupportedFamilyError(ValueError):
    """A checkpoint or config whose `model_type` has no adapter here; the message names it."""


class UnsupportedDesignError(ValueError):
    """A time design a family cannot honour; the message names the family, the design and why."""


@dataclass(frozen=True)
class RandomShape:
    """The shape of a randomly initialised encoder, and the tokenizer's special ids it must use
    (pad for padding-aware positions and the embedding's padding row; cls / sep where a family's
    config records them)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int  # content positions the model must accept
    pad_id: int
    cls_id: int
    sep_id: int


def _standard(s: RandomShape) -> dict[str, Any]:
    """The shape under the names BERT, RoBERTa and ModernBERT configs share."""
    return {
        "vocab_size": s.vocab_size,
        "hidden_size": s.hidden_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "intermediate_size": s.intermediate_size,
        "max_position_embeddings": s.max_positions,
        "pad_token_id": s.pad_id,
    }


def _bert_config(s: RandomShape) -> PretrainedConfig:
    return AutoConfig.for_model("bert", **_standard(s))


def _roberta_config(s: RandomShape) -> PretrainedConfig:
    return AutoConfig.for_model(
        "roberta",
        **{
            **_standard(s),
            "max_position_embeddings": s.max_positions + s.pad_id + 1,  # rows 0..pad are never content positions
            "bos_token_id": s.cls_id,
            "eos_token_id": s.sep_id,
        },
    )


def _distilbert_config(s: RandomShape) -> PretrainedConfig:
    return AutoConfig.for_model(
        "distilbert",
        vocab_size=s.vocab_size,
        dim=s.hidden_size,
        n_layers=s.num_layers,
        n_heads=s.num_heads,
        hidden_dim=s.intermediate_size,
        max_position_embeddings=s.max_positions,
        pad_token_id=s.pad_id,
    )


def _modernbert_config(s: RandomShape) -> PretrainedConfig:
    return AutoConfig.for_model(
        "modernbert",
        **_standard(s),
        cls_token_id=s.cls_id,
        sep_token_id=s.sep_id,
        bos_token_id=s.cls_id,
        eos_token_id=s.sep_id,
    )


def _path(root: nn.Module, dotted: str) -> nn.Module:
    module = root
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


@dataclass(frozen=True)
class EncoderFamily:
    """The names and conventions of one Hugging Face masked-LM family (`model_type` = `name`).

    Paths are attribute paths: `encoder` from the `*ForMaskedLM` model, `word_embeddings` and
    `layers` from the encoder, `head` the `*ForMaskedLM` attributes that turn hidden states into
    logits (applied in order), `head_dense` the head's hidden -> hidden transform.
    """

    name: str
    encoder_attr: str
    word_embeddings_path: str
    layers_path: str
    head: tuple[str, ...]
    head_dense: str
    token_types: bool  # the encoder takes token_type_ids
    positions_after_padding: bool  # RoBERTa: content positions count from padding_idx + 1, pads sit at padding_idx
    make_config: Callable[[RandomShape], PretrainedConfig]
    refused: Mapping[str, str] = field(default_factory=dict)  # time design -> why the family cannot take it
    # The encoder uses a prepared [B, 1, L, L] mask as given (pipeline.model.attention); None: it
    # builds its own masks (why), so it gets the 2-D padding mask and cannot take packed rows.
    no_prepared_mask: str | None = None

    # --- the modules ---------------------------------------------------------------------------
    def encoder(self, mlm: nn.Module) -> nn.Module:
        return _path(mlm, self.encoder_attr)

    def word_embeddings(self, mlm: nn.Module) -> nn.Embedding:
        return cast(nn.Embedding, _path(self.encoder(mlm), self.word_embeddings_path))

    def layers(self, mlm: nn.Module) -> nn.ModuleList:
        return cast(nn.ModuleList, _path(self.encoder(mlm), self.layers_path))

    def logits(self, mlm: nn.Module, hidden: Tensor) -> Tensor:
        """The family's MLM head on hidden states [..., d] -> [..., V]."""
        for name in self.head:
            hidden = getattr(mlm, name)(hidden)
        return hidden

    @property
    def head_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of the MLM head (what a base-model checkpoint lacks)."""
        return tuple(f"{name}." for name in self.head)

    # --- positions -----------------------------------------------------------------------------
    def max_positions(self, config: PretrainedConfig) -> int:
        """Content tokens the model accepts (RoBERTa spends padding_idx + 1 rows before position 0)."""
        total = int(config.max_position_embeddings)
        return total - (int(config.pad_token_id) + 1) if self.positions_after_padding else total

    def position_ids(self, mlm: nn.Module, input_ids: Tensor) -> Tensor:
        """The position ids the family itself assigns to `input_ids` [B, L] -> [B, L]."""
        batch, length = input_ids.shape
        if self.positions_after_padding:  # fairseq's make_positions, as RobertaEmbeddings does
            pad = self.word_embeddings(mlm).padding_idx
            if pad is None:
                raise ValueError(f"a {self.name} model needs pad_token_id: its positions count from it")
            real = input_ids.ne(pad).long()
            return torch.cumsum(real, dim=1) * real + pad
        return torch.arange(length, device=input_ids.device)[None, :].expand(batch, -1)

    def embeds_position_ids(self, mlm: nn.Module, input_ids: Tensor) -> Tensor | None:
        """Position ids to pass with `inputs_embeds` built from `input_ids`, so the encoder sees the
        positions it would give `input_ids`; None where its default for embeddings already does."""
        return self.position_ids(mlm, input_ids) if self.positions_after_padding else None

    def sentence_position_ids(self, mlm: nn.Module, index_in_sentence: Tensor, real: Tensor) -> Tensor:
        """Position ids of packed rows [R, P]: each token gets the id it would get as token
        `index_in_sentence` of its sentence standing alone (padding slots: the padding id or 0)."""
        if self.positions_after_padding:
            pad = self.word_embeddings(mlm).padding_idx
            if pad is None:
                raise ValueError(f"a {self.name} model needs pad_token_id: its positions count from it")
            return torch.where(real, index_in_sentence + pad + 1, torch.full_like(index_in_sentence, pad))
        return index_in_sentence

    @property
    def prepared_masks(self) -> bool:
        return self.no_prepared_mask is None

    def check_packing(self, config: PretrainedConfig, design: str) -> None:
        """Refuse packed rows (several sentences per row) where they would not encode each
        sentence exactly as alone; the message names the family, or the design, and why."""
        if self.no_prepared_mask is not None:
            raise UnsupportedDesignError(
                f"packed rows are not supported for the {self.name} family: {self.no_prepared_mask}"
            )
        if design == "prefix":
            raise UnsupportedDesignError(
                "packed rows are not supported for time design 'prefix': its time token takes a slot after each "
                "sentence's [CLS], which a packed row does not lay out; use padded batches (train.tokens_per_batch: null)"
            )
        implementation = getattr(config, "_attn_implementation", None)
        if implementation not in ("eager", "sdpa"):
            raise UnsupportedDesignError(
                f"packed rows need eager or sdpa attention (a block-diagonal mask), the model uses {implementation!r}"
            )

    # --- designs and classes -------------------------------------------------------------------
    def check_design(self, design: str) -> None:
        if design in self.refused:
            raise UnsupportedDesignError(
                f"time design {design!r} is not supported for the {self.name} family: {self.refused[design]}"
            )

    def random_config(self, shape: RandomShape) -> PretrainedConfig:
        return self.make_config(shape)


_FAMILY_LIST = (
    EncoderFamily(
        name="bert",
        encoder_attr="bert",
        word_embeddings_path="embeddings.word_embeddings",
        layers_path="encoder.layer",
        head=("cls",),
        head_dense="cls.predictions.transform.dense",
        token_types=True,
        positions_after_padding=False,
        make_config=_bert_config,
    ),
    EncoderFamily(
        name="roberta",
        encoder_attr="roberta",
        word_embeddings_path="embeddings.word_embeddings",
        layers_path="encoder.layer",
        head=("lm_head",),
        head_dense="lm_head.dense",
        token_types=True,
        positions_after_padding=True,
        make_config=_roberta_config,
    ),
    EncoderFamily(
        name="distilbert",
        encoder_attr="distilbert",
        word_embeddings_path="embeddings.word_embeddings",
        layers_path="transformer.layer",
        head=("vocab_transform", "activation", "vocab_layer_norm", "vocab_projector"),
        head_dense="vocab_transform",
        token_types=False,
        positions_after_padding=False,
        make_config=_distilbert_config,
    ),
    EncoderFamily(
        name="modernbert",
        encoder_attr="model",
        word_embeddings_path="embeddings.tok_embeddings",
        layers_path="layers",
        head=("head", "decoder"),
        head_dense="head.dense",
        token_types=False,
        # Rotary: position_ids feed the rotation, 0-based, so `prefix` keeps content positions as
        # for BERT. Its sliding-window layers window by index, not position id: there the time
        # token (index 1) reaches the first local_attention / 2 tokens; the global layers reach all.
        positions_after_padding=False,
        make_config=_modernbert_config,
        no_prepared_mask="its sliding-window layers build a mask of their own beside the global one",
    ),
)
FAMILIES: Mapping[str, EncoderFamily] = MappingProxyType({f.name: f for f in _FAMILY_LIST})
FAMILY_NAMES: tuple[str, ...] = tuple(FAMILIES)
# Encoder layer classes, for `_no_split_modules` of the denoiser (device maps keep a layer whole).
LAYER_CLASSES = ["BertLayer", "RobertaLayer", "TransformerBlock", "ModernBertEncoderLayer"]


def family_named(name: str) -> EncoderFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedFamilyError(
            f"model type {name!r} is not a supported encoder family; choose one of {', '.join(FAMILY_NAMES)}"
        ) from None


def family_of(config: PretrainedConfig) -> EncoderFamily:
    """The adapter for a config (by its `model_type`)."""
    return family_named(str(getattr(config, "model_type", "")))


def config_from_dict(values: Mapping[str, Any]) -> PretrainedConfig:
    """An encoder config from its `to_dict()` (a dict without `model_type` is BERT's: exports
    written before families were recorded)."""
    values = dict(values)
    name = str(values.get("model_type") or "bert")
    family_named(name)
    return CONFIG_MAPPING[name](**values)


def mlm_class(config: PretrainedConfig) -> type[PreTrainedModel]:
    """The `*ForMaskedLM` class AutoModelForMaskedLM picks for `config` (BertForMaskedLM for BERT)."""
    family_of(config)
    return cast(type[PreTrainedModel], MODEL_FOR_MASKED_LM_MAPPING[type(config)])


def init_missing_head(mlm: nn.Module, family: EncoderFamily, missing: set[str]) -> None:
    """Deterministically initialise the MLM-head weights a checkpoint lacks (`missing`: state-dict
    keys). A module with any missing parameter is set whole: the transform dense layer to the
    identity (so a fresh head reads the pretrained states through norm(act(h)) and the tied word
    embeddings: a sensible MLM at step 0), LayerNorms to (1, 0), an untied decoder weight to the
    word embeddings, every other head parameter (the output biases) to zero."""
    words = family.word_embeddings(mlm).weight
    with torch.no_grad():
        for root in family.head:
            for sub, module in getattr(mlm, root).named_modules():
                prefix = f"{root}.{sub}." if sub else f"{root}."
                own = dict(module.named_parameters(recurse=False))
                if not any(prefix + name in missing for name in own):
                    continue
                if prefix[:-1] == family.head_dense:
                    dense = cast(nn.Linear, module)
                    dense.weight.copy_(torch.eye(dense.weight.shape[0]))
                    if dense.bias is not None:
                        dense.bias.zero_()
                elif isinstance(module, nn.LayerNorm):
                    module.weight.fill_(1.0)
                    if module.bias is not None:
                        module.bias.zero_()
                else:
                    for name, param in own.items():
                        if name == "weight" and param.shape == words.shape:
                            if param is not words:
                                param.copy_(words)
                        else:
                            param.zero_()
