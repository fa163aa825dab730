"""The BERT denoiser p_theta(x0 | x_t, t) and the four ways the time step enters it (PAPER §5).

The encoder is any masked-LM family in `pipeline.model.families` (BERT, RoBERTa, DistilBERT,
ModernBERT); this module only reaches into it through that family's adapter.

- `none` (TAD): plain `*ForMaskedLM`; the noise level is read from the share of [MASK].
- `embedding`: a time embedding added to the word embeddings (last layer zero-initialised).
- `layerwise` (LTE): per layer, sinusoid(t) -> Linear(d, 2d) -> ReLU -> Linear(2d, d) added to
  the hidden states entering that layer (last layer zero-initialised).
- `prefix` (PTE): a time token after [CLS] from a dedicated table of T + 1 rows, so its ids never
  collide with WordPieces; content tokens keep the position ids their family gives them.

With zero-initialised additions, `none`, `embedding` and `layerwise` compute exactly what the
pretrained encoder computes at initialisation, for every t. `prefix` cannot (one more token
changes attention).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from pipeline.model.attention import attention_mask_4d, takes_prepared_mask
from pipeline.model.families import LAYER_CLASSES, EncoderFamily, config_from_dict, family_of, mlm_class
from pipeline.tensors import at_positions
from pipeline.vocab import TIME_DESIGNS


class DiffusionBertConfig(PretrainedConfig):
    """An encoder config plus the diffusion facts the model needs to be used on its own.

    `bert` holds the encoder's `to_dict()` whatever its family, `model_type` included (the key
    keeps its name so exports written before other families were supported still load; a dict
    without `model_type` is BERT's).
    """

    model_type = "diffusion_bert"

    def __init__(
        self,
        bert: dict | None = None,
        time_design: str = "none",
        num_timesteps: int = 2048,
        diffusion: dict | None = None,
        **kwargs,
    ) -> None:
        if time_design not in TIME_DESIGNS:
            raise ValueError(f"unknown time design {time_design!r}; choose one of {', '.join(TIME_DESIGNS)}")
        self.bert = dict(bert or {})
        self.time_design = time_design
        self.num_timesteps = int(num_timesteps)
        self.diffusion = dict(diffusion or {})  # schedule name, lambda, ... for `dbert generate`
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        """The encoder's own config (BertConfig, RobertaConfig, ...), rebuilt from `bert`."""
        return config_from_dict(self.bert)

    @property
    def family(self) -> str:
        return str(self.bert.get("model_type") or "bert")


def sinusoidal_embedding(s: Tensor, dim: int, scale: float = 1000.0) -> Tensor:
    """Transformer-style features of the time fraction s in [0, 1]: [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=s.device, dtype=torch.float32) / max(half, 1))
    args = (s.float() * scale)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimeMLP(nn.Module):
    """sinusoid(t) -> Linear(d, 2d) -> ReLU -> Linear(2d, d); the last layer starts at zero."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        out = cast(nn.Linear, self.net[2])
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def forward(self, s: Tensor) -> Tensor:  # [B] -> [B, d]
        dtype = cast(nn.Linear, self.net[0]).weight.dtype
        return self.net(sinusoidal_embedding(s, self.hidden).to(dtype))


class DiffusionBertForDenoising(PreTrainedModel):
    """A `*ForMaskedLM` (`mlm`) plus time conditioning; `denoise` returns logits only where asked.

    Its state-dict keys are the MLM's under `mlm.` (`mlm.bert.*`, `mlm.cls.*` for BERT) plus the
    time modules'. A family that cannot take the config's time design is refused (ValueError).
    """

    config_class = DiffusionBertConfig
    base_model_prefix = "diffusion_bert"
    _no_split_modules = LAYER_CLASSES

    def __init__(self, config: DiffusionBertConfig, mlm: PreTrainedModel | None = None) -> None:
        super().__init__(config)
        if mlm is None:
            encoder_config = config.encoder_config()
            mlm = mlm_class(encoder_config)(encoder_config)
        family_of(mlm.config).check_design(config.time_design)
        self.mlm = mlm
        hidden = self.mlm.config.hidden_size
        design = config.time_design
        self.time_embedding = TimeMLP(hidden) if design == "embedding" else None
        layers = self.encoder_family.layers(self.mlm)
        self.layer_time = nn.ModuleList(TimeMLP(hidden) for _ in range(len(layers))) if design == "layerwise" else None
        self.prefix_table = nn.Embedding(config.num_timesteps + 1, hidden) if design == "prefix" else None
        if self.prefix_table is not None:
            nn.init.normal_(self.prefix_table.weight, std=getattr(self.mlm.config, "initializer_range", 0.02))
        self._layer_offsets: list[Tensor] | None = None
        if self.layer_time is not None:
            for index, layer in enumerate(layers):
                layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True)
        self.post_init()  # transformers 5: collects the MLM's tied weights for save / load

    # transformers calls this for weights missing from a checkpoint; the encoder's own init
    # covers its modules, ours only need the zero start.
    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, TimeMLP):
            module.reset_parameters()

    @property
    def encoder_family(self) -> EncoderFamily:
        """The adapter of the MLM's family (looked up, not stored: the model stays deep-copyable)."""
        return family_of(self.mlm.config)

    @property
    def time_agnostic(self) -> bool:
        return self.config.time_design == "none"

    @property
    def max_positions(self) -> int:
        return self.encoder_family.max_positions(self.mlm.config)

    def _make_layer_hook(self, index: int):
        def hook(module, args, kwargs):
            if self._layer_offsets is None:
                return None
            offset = self._layer_offsets[index]  # [B, 1, d]
            if args:
                return (args[0] + offset.to(args[0].dtype), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"] + offset.to(kwargs["hidden_states"].dtype)
            return args, kwargs

        return hook

    def denoise(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        s: Tensor | None = None,
        positions: Tensor | None = None,
        *,
        segments: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits of p_theta(x0 | x_t): [B, L, V], or [N, V] at the masked `positions`.

        input_ids [B, L]; s [B] = t / T in [0, 1] (ignored by `none`); `positions` either a bool
        mask [B, L] or N flat indices into B * L (fixed-size: no host round trip to find them).

        Packed rows (`pipeline.diffusion.packing`): `segments` [R, P] names each slot's sentence
        (k >= 1 is sentence k - 1 of s; 0 is padding), `position_ids` [R, P] its index inside it;
        attention stays inside a sentence, so each is encoded as if it stood alone.
        """
        batch, length = input_ids.shape
        if length > self.max_positions and segments is None:
            raise ValueError(f"sequence length {length} exceeds the model's {self.max_positions} position embeddings")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        design = self.config.time_design
        if design != "none" and s is None:
            raise ValueError(f"time design {design!r} needs the time step s")
        family = self.encoder_family
        if segments is not None:
            family.check_packing(self.mlm.config, design)
        encoder = family.encoder(self.mlm)
        implementation = str(getattr(self.mlm.config, "_attn_implementation", None))
        prepared = takes_prepared_mask(implementation) and family.prepared_masks
        kwargs: dict = {}
        if segments is not None:
            kwargs["attention_mask"] = attention_mask_4d(implementation, self._mask_dtype(), segments=segments)
            assert position_ids is not None, "packed rows need their position ids"
            kwargs["position_ids"] = family.sentence_position_ids(self.mlm, position_ids, segments > 0)
        elif prepared:
            kwargs["attention_mask"] = attention_mask_4d(implementation, self._mask_dtype(), padding=attention_mask)
        else:
            kwargs["attention_mask"] = attention_mask.long()
        if design == "none":
            kwargs["input_ids"] = input_ids
        elif design == "embedding":
            assert s is not None and self.time_embedding is not None
            embeds = family.word_embeddings(self.mlm)(input_ids)  # [B, L, d]
            kwargs["inputs_embeds"] = embeds + self._per_token(self.time_embedding(s).to(embeds.dtype), segments)
            if "position_ids" not in kwargs:
                position_ids = family.embeds_position_ids(self.mlm, input_ids)  # the ids input_ids would get
                if position_ids is not None:
                    kwargs["position_ids"] = position_ids
        elif design == "layerwise":
            assert s is not None and self.layer_time is not None
            kwargs["input_ids"] = input_ids
            self._layer_offsets = [self._per_token(mlp(s), segments) for mlp in self.layer_time]
        elif design == "prefix":
            assert s is not None and self.prefix_table is not None
            step = (s.float() * self.config.num_timesteps).round().long().clamp(0, self.config.num_timesteps)
            words = family.word_embeddings(self.mlm)(input_ids)  # [B, L, d]
            time_token = self.prefix_table(step).to(words.dtype)[:, None, :]  # [B, 1, d]
            kwargs["inputs_embeds"] = torch.cat([words[:, :1], time_token, words[:, 1:]], dim=1)  # [B, L+1, d]
            pos = family.position_ids(self.mlm, input_ids)  # [B, L]; the time token shares token 0's
            kwargs["position_ids"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)  # [B, L+1]
            with_time = torch.cat(
                [attention_mask[:, :1], torch.ones_like(attention_mask[:, :1]), attention_mask[:, 1:]], 1
            )
            kwargs["attention_mask"] = (
                attention_mask_4d(implementation, self._mask_dtype(), padding=with_time)
                if prepared
                else with_time.long()
            )
            if family.token_types:
                kwargs["token_type_ids"] = torch.zeros(batch, length + 1, dtype=torch.long, device=input_ids.device)
        try:
            hidden = encoder(**kwargs).last_hidden_state  # [B, L(+1), d]
        finally:
            self._layer_offsets = None
        if design == "prefix":
            hidden = torch.cat([hidden[:, :1], hidden[:, 2:]], dim=1)  # drop the time token: [B, L, d]
        if positions is not None:
            hidden = at_positions(hidden, positions)  # [N, d]
        return family.logits(self.mlm, hidden)

    def _mask_dtype(self) -> torch.dtype:
        """The dtype transformers gives an eager mask: that of the embeddings' output."""
        return self.encoder_family.word_embeddings(self.mlm).weight.dtype

    @staticmethod
    def _per_token(per_sentence: Tensor, segments: Tensor | None) -> Tensor:
        """A time feature per sentence [B, d] -> broadcast over its tokens: [B, 1, d], or for
        packed rows [R, P, d] read through the segment ids (padding slots get zeros)."""
        if segments is None:
            return per_sentence[:, None, :]
        table = torch.cat([per_sentence.new_zeros(1, per_sentence.shape[-1]), per_sentence])  # [1 + B, d]
        return table[segments]  # [R, P, d]

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        s: Tensor | None = None,
        positions: Tensor | None = None,
        segments: Tensor | None = None,
        position_ids: Tensor | None = None,
        **_: object,
    ) -> MaskedLMOutput:
        return MaskedLMOutput(
            logits=self.denoise(input_ids, attention_mask, s, positions, segments=segments, position_ids=position_ids)
        )


def register_auto_classes() -> None:
    """Let AutoConfig / AutoModel resolve `diffusion_bert` (export round trip)."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register("diffusion_bert", DiffusionBertConfig)
        AutoModel.register(DiffusionBertConfig, DiffusionBertForDenoising)
    except ValueError:
        pass  # already registered
