"""Forward process q(x_t | x0) of absorbing-state diffusion, and time sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

from pipeline.diffusion.schedules import Schedule
from pipeline.tensors import at_positions as at_positions  # the Denoiser contract's helper, for toy denoisers

# The network the process is learned with: denoiser(x_t [B, L], attention_mask [B, L],
# s [B] (the time step as a fraction in [0, 1]), positions) -> logits [B, L, V], or [N, V] at
# the N `positions`: a bool mask [B, L], or flat indices [N] into B * L (what training passes:
# their count is known on the host, so the step never waits for the device to find them).
# Training, the bound and the samplers call it through this one signature.
Denoiser = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


@dataclass(frozen=True)
class SpecialIds:
    """Ids the diffusion treats specially: `mask` absorbs; `never_masked` are never noised and
    never generated ([CLS], [SEP], [PAD], and any other special token but [UNK])."""

    mask: int
    pad: int
    never_masked: tuple[int, ...]

    @property
    def forbidden_outputs(self) -> tuple[int, ...]:
        """Ids the denoiser may never predict as x0 (SUBS): never-masked ones and [MASK]."""
        return tuple(sorted(set(self.never_masked) | {self.mask}))

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> SpecialIds:
        """Special tokens (but [MASK] and [UNK]) plus BERT's `[unusedN]` placeholder rows, which
        never occur in text and so must never be generated."""
        specials = set(tokenizer.all_special_ids) - {tokenizer.mask_token_id}
        if tokenizer.unk_token_id is not None:
            specials.discard(tokenizer.unk_token_id)
        vocab = tokenizer.get_vocab()
        specials |= {i for token, i in vocab.items() if token.startswith("[unused") and token.endswith("]")}
        return cls(mask=tokenizer.mask_token_id, pad=tokenizer.pad_token_id, never_masked=tuple(sorted(specials)))


def content_mask(ids: Tensor, special: SpecialIds, attention_mask: Tensor | None = None) -> Tensor:
    """True where a position holds real content that the forward process may mask. [B, L]"""
    keep = ~torch.isin(ids, torch.as_tensor(special.never_masked, device=ids.device))
    if attention_mask is not None:
        keep &= attention_mask.bool()
    return keep


def _draw_device(generator: torch.Generator | None) -> torch.device:
    """Where draws from `generator` are made: its own device (the CPU for the default generator).

    Noise is drawn there and then moved to the data, so a seeded CPU generator gives the same
    noise whatever device the model runs on."""
    return generator.device if generator is not None else torch.device("cpu")


def _stratified_fractions(batch: int, generator: torch.Generator | None) -> Tensor:
    """One point per stratum, (u + pi(i)) / B with a random permutation pi of the strata. [B] in (0, 1),
    on the generator's device (the CPU by default).

    The permutation matters: batches are length-sorted, so handing stratum i to row i would
    always give the longest rows the largest t (time correlated with sentence length)."""
    device = _draw_device(generator)
    u = torch.rand((), generator=generator, dtype=torch.float64, device=device)
    strata = torch.randperm(batch, generator=generator, device=device).to(torch.float64)  # [B]
    return (u + strata) / batch


def stratified_times(batch: int, num_timesteps: int, generator: torch.Generator | None = None) -> Tensor:
    """Integer t in 1..T, one per row, stratified t = ceil(T (u + pi(i)) / B) to cut variance. [B]"""
    frac = _stratified_fractions(batch, generator)
    return (frac * num_timesteps).ceil().clamp(1, num_timesteps)


def stratified_continuous_times(
    batch: int, num_timesteps: int, eps: float, generator: torch.Generator | None = None
) -> Tensor:
    """Continuous t (in steps) with t/T ~ U[eps, 1], stratified across the batch. [B]"""
    frac = _stratified_fractions(batch, generator)
    return (eps + (1.0 - eps) * frac) * num_timesteps


def q_sample(
    x0: Tensor,
    t: Tensor,
    schedule: Schedule,
    maskable: Tensor,
    mask_id: int,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Noise x0 [B, L] to step t [B]: each maskable position stays with prob alpha_t(x0_i).

    Returns (x_t [B, L], masked [B, L] bool), on x0's device. t may be on the CPU; the uniforms
    are drawn on the generator's device (float64) and moved to x0's.
    """
    alpha = schedule.alpha(t, x0, maskable)  # [B, L] float64, on x0's device
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64, device=_draw_device(generator)).to(x0.device)
    masked = maskable & (u >= alpha)
    return torch.where(masked, torch.full_like(x0, mask_id), x0), masked
