"""The exact absorbing-diffusion bound of PAPER §4, in O(B L V) over the logits only.

A denoiser is any callable `denoiser(x_t [B, L], attention_mask [B, L], s [B], positions [B, L])
-> logits [N, V]` that returns the logits of p_theta(x0 | x_t) at the N positions where
`positions` is True (s = t / T in [0, 1]). Unmasked positions are copied through (they contribute
zero), so the MLM head only ever runs where something is masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.diffusion.forward import (
    Denoiser,
    SpecialIds,
    content_mask,
    q_sample,
    stratified_continuous_times,
    stratified_times,
)
from pipeline.diffusion.schedules import Schedule


def subs_log_probs(logits: Tensor, forbidden_ids: Sequence[int]) -> Tensor:
    """log p_theta(x0 | x_t) with zero mass on [MASK] and never-masked ids (SUBS). [N, V], fp32
    (or fp64 when the logits are fp64: the exactness tests use that)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    if forbidden_ids:
        logits = logits.index_fill(-1, torch.as_tensor(list(forbidden_ids), device=logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1)


def position_kl(log_probs: Tensor, x0: Tensor, reveal: Tensor) -> Tensor:
    """KL(q(x_{t-1} | x_t=[M], x0) || p_theta(x_{t-1} | x_t)) per masked position. [N]

    log_probs [N, V]; x0 [N]; reveal [N, V] (token-dependent a(v)) or [N, 1] (one a per row):
    KL = -a(x0) log p(x0) + (1 - a(x0)) log((1 - a(x0)) / m),  m = sum_v p(v) (1 - a(v)).
    """
    lp_x0 = log_probs.gather(1, x0[:, None]).squeeze(1)  # [N]
    if reveal.shape[-1] == 1:  # token-independent: m = 1 - a, the second term vanishes
        return -reveal[:, 0].to(lp_x0.dtype) * lp_x0
    reveal = reveal.to(log_probs.dtype)
    a_x0 = reveal.gather(1, x0[:, None]).squeeze(1)  # [N]
    stay = 1.0 - a_x0
    m = (log_probs.exp() * (1.0 - reveal)).sum(-1)  # [N]
    second = torch.where(
        stay > 0, stay * (torch.log(stay.clamp_min(1e-30)) - torch.log(m.clamp_min(1e-30))), torch.zeros_like(stay)
    )
    return -a_x0 * lp_x0 + second


def continuous_position_loss(log_probs: Tensor, x0: Tensor, weight: Tensor) -> Tensor:
    """Continuous-time (MDLM) bound integrand per masked position. [N]

    weight [N, V] or [N, 1] is w_s(v) = -alpha'(s, v) / (1 - alpha(s, v)). For a token-dependent
    schedule the middle term sum_v p(v) w(v) must stay, or the bound is lost (PAPER §4).
    """
    lp_x0 = log_probs.gather(1, x0[:, None]).squeeze(1)
    if weight.shape[-1] == 1:
        return -weight[:, 0].to(lp_x0.dtype) * lp_x0
    weight = weight.to(log_probs.dtype)
    w_x0 = weight.gather(1, x0[:, None]).squeeze(1)
    return -w_x0 * lp_x0 + (log_probs.exp() * weight).sum(-1) - w_x0


@dataclass
class LossOutput:
    loss: Tensor  # scalar to backpropagate: (bound + hybrid * ce) / content tokens
    bound_sum: float  # estimated NLL bound, nats, summed over the batch
    ce_sum: float  # plain cross-entropy on x0 at masked positions, nats
    num_tokens: int  # content tokens in the batch (the per-token denominator)
    num_masked: int

    @classmethod
    def empty(cls, device: torch.device | str, num_tokens: int) -> LossOutput:
        """A batch where nothing got masked: zero loss that still backpropagates."""
        return cls(torch.zeros((), device=device, requires_grad=True) * 0.0, 0.0, 0.0, num_tokens, 0)


def _rows(table: Tensor, batch_index: Tensor) -> Tensor:
    """Per-row [B, V] or [B, 1] table -> per-position [N, V] / [N, 1], in fp32."""
    return table.float()[batch_index]


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    attention_mask: Tensor,
    schedule: Schedule,
    special: SpecialIds,
    generator: torch.Generator | None = None,
    hybrid_lambda: float = 0.0,
) -> LossOutput:
    """One stochastic estimate of the per-token NLL bound, with stratified t across the batch."""
    batch = x0.shape[0]
    T = schedule.num_timesteps
    maskable = content_mask(x0, special, attention_mask)  # [B, L]
    num_tokens = int(maskable.sum())
    if schedule.continuous:
        eps = getattr(schedule, "eps", 1e-3)
        t = stratified_continuous_times(batch, T, eps, generator)  # [B] steps, float
    else:
        t = stratified_times(batch, T, generator)  # [B] in 1..T
    t = t.to(x0.device)  # drawn on the generator's device (CPU); every schedule table follows t
    x_t, masked = q_sample(x0, t, schedule, maskable, special.mask, generator)
    s_frac = (t / T).to(torch.float32)
    batch_index = masked.nonzero(as_tuple=True)[0]  # [N]
    target = x0[masked]  # [N]
    if target.numel() == 0:
        return LossOutput.empty(x0.device, num_tokens)
    logits = denoiser(x_t, attention_mask, s_frac, masked)  # [N, V]
    log_probs = subs_log_probs(logits, special.forbidden_outputs)
    context = (x0, maskable) if schedule.token_dependent else None
    if schedule.continuous:
        alpha = schedule.alpha_vocab(t, context)
        weight = -schedule.dalpha_vocab(t, context) / (1.0 - alpha).clamp_min(1e-12)
        per_position = continuous_position_loss(log_probs, target, _rows(weight, batch_index))
    else:
        reveal = schedule.reveal_probability(t, t - 1, context)  # [B, V] or [B, 1], on x0's device
        per_position = T * position_kl(log_probs, target, _rows(reveal, batch_index))
    ce = -log_probs.gather(1, target[:, None]).squeeze(1)
    bound_sum = per_position.sum()
    ce_sum = ce.sum()
    loss = (bound_sum + hybrid_lambda * ce_sum) / max(num_tokens, 1)
    return LossOutput(loss, float(bound_sum.detach()), float(ce_sum.detach()), num_tokens, int(target.numel()))


def mlm_loss(
    denoiser: Denoiser,
    x0: Tensor,
    attention_mask: Tensor,
    special: SpecialIds,
    generator: torch.Generator | None = None,
    mask_prob: float = 0.15,
) -> LossOutput:
    """Plain masked-LM cross-entropy (BERT's 15%, all replaced by [MASK]): the fine-tune behind
    the BERT-Mouth baseline, which then samples by Gibbs sampling. Not a bound."""
    maskable = content_mask(x0, special, attention_mask)
    u = torch.rand(x0.shape, generator=generator, dtype=torch.float64).to(x0.device)
    masked = maskable & (u < mask_prob)
    num_tokens = int(maskable.sum())
    if not masked.any():
        return LossOutput.empty(x0.device, num_tokens)
    x_in = torch.where(masked, torch.full_like(x0, special.mask), x0)
    ones = torch.ones(x0.shape[0], dtype=torch.float32, device=x0.device)  # "fully noisy" time
    log_probs = subs_log_probs(denoiser(x_in, attention_mask, ones, masked), special.forbidden_outputs)
    ce = -log_probs.gather(1, x0[masked][:, None]).squeeze(1)
    ce_sum = ce.sum()
    return LossOutput(ce_sum / ce.numel(), float(ce_sum.detach()), float(ce_sum.detach()), num_tokens, int(ce.numel()))


@torch.no_grad()
def sequence_bound(
    denoiser: Denoiser,
    x0: Tensor,
    attention_mask: Tensor,
    schedule: Schedule,
    special: SpecialIds,
    grid: Sequence[int],
    generator: torch.Generator | None = None,
    hidden: Tensor | None = None,
) -> Tensor:
    """NLL bound (nats) of each sequence under the reverse chain on `grid` (descending, T..0).
    [B] float64, on the CPU (computed on x0's device).

    With `hidden` [B, L] bool, the conditional bound on -log p(hidden tokens | the others): the
    chain runs over the hidden positions only, and every other token stays shown at every t.

    Every step t -> s of the chain is evaluated at one sampled x_t ~ q(x_t | x0); with a coarse
    grid this is the bound of that coarser chain (a(v) uses alpha_s, not k one-step KLs).
    """
    T = schedule.num_timesteps
    if grid[0] != T or grid[-1] != 0:
        raise ValueError(f"time grid must run from T={T} down to 0, got {grid[0]}..{grid[-1]}")
    content = content_mask(x0, special, attention_mask)
    # The per-sentence schedule (spindle_paper) always sees the whole sentence.
    context = (x0, content) if schedule.token_dependent else None
    hidden_content = None if hidden is None else hidden.to(content.device) & content
    total = torch.zeros(x0.shape[0], dtype=torch.float64, device=x0.device)
    for t_step, s_step in zip(grid[:-1], grid[1:]):
        t = torch.full((x0.shape[0],), float(t_step), dtype=torch.float64, device=x0.device)
        s = torch.full_like(t, float(s_step))
        x_t, masked = q_sample(x0, t, schedule, content, special.mask, generator)
        if hidden_content is not None:  # same draws as the unconditional bound, shown tokens unmasked
            masked &= hidden_content
            x_t = torch.where(masked, x_t, x0)
        if not masked.any():
            continue
        batch_index = masked.nonzero(as_tuple=True)[0]
        logits = denoiser(x_t, attention_mask, (t / T).float(), masked)
        log_probs = subs_log_probs(logits, special.forbidden_outputs)
        reveal = schedule.reveal_probability(t, s, context)  # on x0's device
        kl = position_kl(log_probs, x0[masked], _rows(reveal, batch_index))
        total.index_add_(0, batch_index, kl.double())
    return total.cpu()
