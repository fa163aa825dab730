"""DiffusionBERT's denoiser p_theta(x0 | x_t, t), standalone: this file imports only torch and
transformers, because `pipeline.model.export` copies it beside the weights of every model with a
time design (`embedding`, `layerwise`, `prefix`), so that anyone can load the export with

    model = AutoModelForMaskedLM.from_pretrained(directory, trust_remote_code=True)
    logits = model(input_ids, attention_mask, s=t / T).logits  # s [B] in [0, 1]; logits [B, L, V]

(`AutoModel` works too). The time-agnostic design (`none`) is exported as its encoder's own
`*ForMaskedLM` and needs no code. The training code's denoiser is `pipeline.model.denoiser`; this
is its twin for users, and tests/unit/test_export.py checks both give the same logits for every
family and design. The encoder is any masked-LM family (BERT, RoBERTa, DistilBERT, ModernBERT):
`config.encoder_layout` names where its parts live, so this file holds no per-family code.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

BERT_LAYOUT = {
    "encoder": "bert",  # the *ForMaskedLM attribute holding the encoder
    "word_embeddings": "embeddings.word_embeddings",  # from the encoder
    "layers": "encoder.layer",  # from the encoder
    "head": ["cls"],  # *ForMaskedLM attributes applied in order: hidden states -> logits
    "token_types": True,  # the encoder takes token_type_ids
    "positions_after_padding": False,  # RoBERTa: content positions count from pad_token_id + 1
}


class DiffusionBertConfig(PretrainedConfig):
    """The encoder's config (`bert`, its `to_dict()` whatever its family) plus the diffusion facts."""

    model_type = "diffusion_bert"

    def __init__(
        self,
        bert: dict | None = None,
        time_design: str = "none",
        num_timesteps: int = 2048,
        diffusion: dict | None = None,
        encoder_layout: dict | None = None,
        **kwargs,
    ) -> None:
        self.bert = dict(bert or {})
        self.time_design = time_design
        self.num_timesteps = int(num_timesteps)
        self.diffusion = dict(diffusion or {})  # schedule name, its settings, hybrid_lambda
        self.encoder_layout = dict(encoder_layout or BERT_LAYOUT)
        super().__init__(**kwargs)

    def encoder_config(self) -> PretrainedConfig:
        values = dict(self.bert)
        return AutoConfig.for_model(str(values.pop("model_type", None) or "bert"), **values)


def _get(root: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


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
    """sinusoid(t) -> Linear(d, 2d) -> ReLU -> Linear(2d, d)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, hidden))

    def forward(self, s: Tensor) -> Tensor:  # [B] -> [B, d]
        first: nn.Linear = self.net[0]  # type: ignore[assignment]
        return self.net(sinusoidal_embedding(s, self.hidden).to(first.weight.dtype))


class DiffusionBertForDenoising(PreTrainedModel):
    """A `*ForMaskedLM` (`mlm`) plus the time conditioning of `config.time_design`:
    `embedding` adds TimeMLP(s) to every token embedding, `layerwise` adds one TimeMLP(s) per layer
    to the hidden states entering it, `prefix` inserts a time token (a row of a T + 1 table) after
    the first token and drops it from the output."""

    config_class = DiffusionBertConfig
    base_model_prefix = "diffusion_bert"

    def __init__(self, config: DiffusionBertConfig) -> None:
        super().__init__(config)
        self.layout = config.encoder_layout
        self.mlm = AutoModelForMaskedLM.from_config(config.encoder_config())
        hidden = self.mlm.config.hidden_size
        design = config.time_design
        self.time_embedding = TimeMLP(hidden) if design == "embedding" else None
        layers = _get(self.encoder, self.layout["layers"])
        self.layer_time = nn.ModuleList(TimeMLP(hidden) for _ in layers) if design == "layerwise" else None
        self.prefix_table = nn.Embedding(config.num_timesteps + 1, hidden) if design == "prefix" else None
        self._layer_offsets: list[Tensor] | None = None
        if self.layer_time is not None:
            for index, layer in enumerate(layers):
                layer.register_forward_pre_hook(self._make_layer_hook(index), with_kwargs=True)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        pass  # every weight comes from the checkpoint

    @property
    def encoder(self) -> nn.Module:
        return _get(self.mlm, self.layout["encoder"])

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

    def position_ids(self, input_ids: Tensor, word_embeddings: nn.Embedding) -> Tensor:
        """The position ids the encoder itself gives `input_ids` [B, L] -> [B, L]."""
        batch, length = input_ids.shape
        if self.layout["positions_after_padding"]:  # RoBERTa's make_positions
            pad = word_embeddings.padding_idx
            assert pad is not None, "positions that count from the padding id need pad_token_id"
            real = input_ids.ne(pad).long()
            return torch.cumsum(real, dim=1) * real + pad
        return torch.arange(length, device=input_ids.device)[None, :].expand(batch, -1)

    def denoise(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        s: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Logits of p_theta(x0 | x_t): [B, L, V], or [N, V] at the N True `positions` [B, L].

        input_ids [B, L]; s [B] = t / T in [0, 1] (ignored by `none`)."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        design = self.config.time_design
        if design != "none" and s is None:
            raise ValueError(f"time design {design!r} needs the time step s = t / T")
        s = torch.zeros(batch, device=input_ids.device) if s is None else s
        words = _get(self.encoder, self.layout["word_embeddings"])
        kwargs: dict = {"attention_mask": attention_mask.long()}
        if design in ("none", "layerwise"):
            kwargs["input_ids"] = input_ids
            if self.layer_time is not None:
                self._layer_offsets = [mlp(s)[:, None, :] for mlp in self.layer_time]
        elif design == "embedding":
            assert self.time_embedding is not None
            embeds = words(input_ids)  # [B, L, d]
            kwargs["inputs_embeds"] = embeds + self.time_embedding(s).to(embeds.dtype)[:, None, :]
            if self.layout["positions_after_padding"]:  # the positions input_ids would get
                kwargs["position_ids"] = self.position_ids(input_ids, words)
        elif design == "prefix":
            assert self.prefix_table is not None
            step = (s.float() * self.config.num_timesteps).round().long().clamp(0, self.config.num_timesteps)
            embeds = words(input_ids)  # [B, L, d]
            time_token = self.prefix_table(step).to(embeds.dtype)[:, None, :]  # [B, 1, d]
            kwargs["inputs_embeds"] = torch.cat([embeds[:, :1], time_token, embeds[:, 1:]], dim=1)  # [B, L+1, d]
            pos = self.position_ids(input_ids, words)  # [B, L]; the time token shares token 0's
            kwargs["position_ids"] = torch.cat([pos[:, :1], pos[:, :1], pos[:, 1:]], dim=1)  # [B, L+1]
            mask = kwargs["attention_mask"]
            kwargs["attention_mask"] = torch.cat([mask[:, :1], torch.ones_like(mask[:, :1]), mask[:, 1:]], dim=1)
            if self.layout["token_types"]:
                kwargs["token_type_ids"] = torch.zeros(batch, length + 1, dtype=torch.long, device=input_ids.device)
        else:
            raise ValueError(f"unknown time design {design!r}")
        try:
            hidden = self.encoder(**kwargs).last_hidden_state  # [B, L(+1), d]
        finally:
            self._layer_offsets = None
        if design == "prefix":
            hidden = torch.cat([hidden[:, :1], hidden[:, 2:]], dim=1)  # drop the time token: [B, L, d]
        if positions is not None:
            hidden = hidden[positions]  # [N, d]
        for name in self.layout["head"]:
            hidden = getattr(self.mlm, name)(hidden)
        return hidden  # logits

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        s: Tensor | None = None,
        positions: Tensor | None = None,
        **_: object,
    ) -> MaskedLMOutput:
        return MaskedLMOutput(logits=self.denoise(input_ids, attention_mask, s, positions))
