"""The exact absorbing-diffusion bound of PAPER §4, in O(B L V) over the logits only.

A denoiser is any callable `denoiser(x_t [B, L], attention_mask [B, L], s [B], positions [B, L])
-> logits [N, V]` that returns the logits of p_theta(x0 | x_t) at the N positions where
`positions` is True (s = t / T in [0, 1]). Unmasked positions are copied through (they contribute
zero), so the MLM head only ever runs where something is masked.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.diffusion.forward import Denoiser, SpecialIds, content_mask, q_sample
from pipeline.diffusion.noising import NoisedBatch, noise_for_diffusion, noise_for_mlm
from pipeline.diffusion.packing import SentenceRows
from pipeline.diffusion.schedules import Schedule
from pipeline.tensors import id_tensor, upload


def subs_log_probs(logits: Tensor, forbidden_ids: Sequence[int]) -> Tensor:
    """log p_theta(x0 | x_t) with zero mass on [MASK] and never-masked ids (SUBS). [N, V], fp32
    (or fp64 when the logits are fp64: the exactness tests use that)."""
    if logits.dtype != torch.float64:
        logits = logits.float()
    if forbidden_ids:
        logits = logits.index_fill(-1, id_tensor(forbidden_ids, logits.device), float("-inf"))
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
    """One batch's loss. The sums stay tensors on the loss's device, so a training step never
    waits for them; the counts are host integers, known before the step (`NoisedBatch`)."""

    loss: Tensor  # scalar to backpropagate: (bound + hybrid * ce) / content tokens
    bound_sum: Tensor  # estimated NLL bound, nats, summed over the batch (0-dim, detached)
    ce_sum: Tensor  # plain cross-entropy on x0 at masked positions, nats (0-dim, detached)
    num_tokens: int  # content tokens in the batch (the per-token denominator)
    num_masked: int

    @classmethod
    def empty(cls, device: torch.device | str, num_tokens: int) -> LossOutput:
        """A batch where nothing got masked: zero loss that still backpropagates."""
        zero = torch.zeros((), device=device)
        return cls(torch.zeros((), device=device, requires_grad=True) * 0.0, zero, zero, num_tokens, 0)


def _rows(table: Tensor, batch_index: Tensor) -> Tensor:
    """Per-row [B, V] or [B, 1] table -> per-position [N, V] / [N, 1], in fp32."""
    return table.float().index_select(0, batch_index)


def _logits(denoiser: Denoiser, noised: NoisedBatch, packed: SentenceRows | None) -> Tensor:
    """The denoiser at the masked positions, [N, V] in the padded layout's order."""
    if packed is None:
        return denoiser(noised.x_t, noised.attention_mask, noised.s_frac, noised.flat_positions)
    segments = {"segments": packed.segments, "position_ids": packed.position_ids}
    # the model's own denoiser takes packed rows (pipeline.model.denoiser); its padding mask is unused
    return denoiser(packed.input_ids, packed.segments > 0, noised.s_frac, packed.flat_positions, **segments)


def bound_loss(
    denoiser: Denoiser,
    noised: NoisedBatch,
    schedule: Schedule,
    special: SpecialIds,
    hybrid_lambda: float = 0.0,
    packed: SentenceRows | None = None,
) -> LossOutput:
    """The per-token NLL bound of a batch noised on the host (`noise_for_diffusion`), computed
    where its tensors are, with no host round trip. `packed`: the same batch laid out as packed
    rows (`pack_rows`), which gives the same loss without computing on padding."""
    if noised.num_masked == 0:
        return LossOutput.empty(noised.device, noised.num_tokens)
    T = schedule.num_timesteps
    logits = _logits(denoiser, noised, packed)  # [N, V]
    log_probs = subs_log_probs(logits, special.forbidden_outputs)
    context = (noised.x0, noised.content) if schedule.token_dependent else None
    t = noised.t
    if schedule.continuous:
        weight = -schedule.dalpha_vocab(t, context) / schedule.masked_vocab(t, context).clamp_min(1e-12)
        per_position = continuous_position_loss(log_probs, noised.target, _rows(weight, noised.batch_index))
    else:
        reveal = schedule.reveal_probability(t, t - 1, context)  # [B, V] or [B, 1], on t's device
        per_position = T * position_kl(log_probs, noised.target, _rows(reveal, noised.batch_index))
    ce = -log_probs.gather(1, noised.target[:, None]).squeeze(1)
    bound_sum = per_position.sum()
    ce_sum = ce.sum()
    loss = (bound_sum + hybrid_lambda * ce_sum) / max(noised.num_tokens, 1)
    return LossOutput(loss, bound_sum.detach(), ce_sum.detach(), noised.num_tokens, noised.num_masked)


def cross_entropy_loss(
    denoiser: Denoiser, noised: NoisedBatch, special: SpecialIds, packed: SentenceRows | None = None
) -> LossOutput:
    """Masked-LM cross-entropy of a batch masked on the host (`noise_for_mlm`). Not a bound."""
    if noised.num_masked == 0:
        return LossOutput.empty(noised.device, noised.num_tokens)
    log_probs = subs_log_probs(_logits(denoiser, noised, packed), special.forbidden_outputs)
    ce_sum = -log_probs.gather(1, noised.target[:, None]).squeeze(1).sum()
    return LossOutput(
        ce_sum / noised.num_masked, ce_sum.detach(), ce_sum.detach(), noised.num_tokens, noised.num_masked
    )


def diffusion_loss(
    denoiser: Denoiser,
    x0: Tensor,
    attention_mask: Tensor,
    schedule: Schedule,
    special: SpecialIds,
    generator: torch.Generator | None = None,
    hybrid_lambda: float = 0.0,
) -> LossOutput:
    """One stochastic estimate of the per-token NLL bound, with stratified t across the batch:
    the noise drawn on the host (`noise_for_diffusion`), the loss on x0's device."""
    noised = noise_for_diffusion(x0.cpu(), attention_mask.cpu(), schedule, special, generator)
    return bound_loss(denoiser, noised.uploaded(x0.device), schedule, special, hybrid_lambda)


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
    noised = noise_for_mlm(x0.cpu(), attention_mask.cpu(), special, generator, mask_prob)
    return cross_entropy_loss(denoiser, noised.uploaded(x0.device), special)


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
    device = x0.device
    # The noise is drawn on the host, as in training, so the masked positions (and how many there
    # are) are known before each step: the device never has to report them.
    x0_host, attn_host = x0.cpu(), attention_mask.cpu()
    content_host = content_mask(x0_host, special, attn_host)
    content = content_host.to(device)
    # The per-sentence schedule (spindle_paper) always sees the whole sentence.
    context = (x0, content) if schedule.token_dependent else None
    hidden_content = None if hidden is None else hidden.cpu() & content_host
    batch, width = x0.shape
    flat_x0 = x0.reshape(-1)
    total = torch.zeros(batch, dtype=torch.float64, device=device)
    top = torch.full((batch,), float(T), dtype=torch.float64, device=device)
    schedule.reveal_probability(top, top, context)  # its tables move to the device now, not mid-chain
    id_tensor(special.forbidden_outputs, device)  # and the ids SUBS excludes
    for t_step, s_step in itertools.pairwise(grid):
        t_host = torch.full((batch,), float(t_step), dtype=torch.float64)
        _, masked = q_sample(x0_host, t_host, schedule, content_host, special.mask, generator)
        if hidden_content is not None:  # same draws as the unconditional bound, shown tokens unmasked
            masked &= hidden_content
        if not masked.any():  # a host tensor: no wait
            continue
        flat = upload(masked.reshape(-1).nonzero(as_tuple=True)[0], device)  # [N] into B * L
        rows = torch.div(flat, width, rounding_mode="floor")  # [N]
        x_t = flat_x0.index_fill(0, flat, special.mask).view(batch, width)
        t = torch.full((batch,), float(t_step), dtype=torch.float64, device=device)
        s = torch.full_like(t, float(s_step))
        logits = denoiser(x_t, attention_mask, (t / T).float(), flat)
        log_probs = subs_log_probs(logits, special.forbidden_outputs)
        reveal = schedule.reveal_probability(t, s, context)  # on x0's device
        kl = position_kl(log_probs, flat_x0.index_select(0, flat), _rows(reveal, rows))
        total.index_add_(0, rows, kl.double())
    return total.cpu()
