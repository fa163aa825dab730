"""Generation: the ancestral reverse process (PAPER §6), confidence-ordered unmasking and
BERT-Mouth Gibbs sampling, each unconditional or from a canvas of fixed tokens.

The reverse step t -> s reveals each masked position with probability sum_v p(v) a(v) and
draws its token proportionally to p(v) a(v), a(v) = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v));
for a token-independent schedule the reveal chance is just a. Truncation (top-k, top-p,
temperature) acts on p_theta(x0 | x_t) only, never on the reveal chance. Draws are float64
inverse-CDF draws from a seeded generator, one uniform per position per step whether or not the
model was called, so the cached sampler returns exactly the tokens of the uncached one.

This module holds the ancestral sampler and names the others: Gibbs in `pipeline.diffusion.gibbs`,
confidence-ordered unmasking in `pipeline.diffusion.confidence_unmasking`, what the host samplers
share in `pipeline.diffusion.host_chain`. Truncation and the draws on what it keeps (sparse under
top-k): `pipeline.diffusion.truncation`; the step maths the device samplers share:
`pipeline.diffusion.reverse`; one interface over all of them: `pipeline.diffusion.sampler`.

Devices: on the CPU these host samplers run the MLM head only at the [MASK] positions left
(finding them is free there). On an accelerator every sampler runs device-resident instead
(`pipeline.diffusion.resident`): canvas, truncation, reveal chances and the float64 draws on the
model's device with fixed shapes, so no step waits for the device; `resident=` forces either.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.diffusion.canvas import starting_canvas
from pipeline.diffusion.confidence_unmasking import confidence_sample as confidence_sample
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.gibbs import gibbs_sample as gibbs_sample
from pipeline.diffusion.host_chain import Predictions, check_grid, run_resident, runs_resident
from pipeline.diffusion.host_chain import SampleOutput as SampleOutput
from pipeline.diffusion.reverse import remdm_probabilities
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.truncation import draw_token, reveal_chance

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    lengths: Sequence[int] | Tensor | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    *,
    grid: Sequence[int],
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    cache: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    canvas: tuple[Tensor, Tensor] | None = None,
    remask: float = 0.0,
    resident: bool | None = None,
) -> SampleOutput:
    """Reverse process on a descending time grid (T ... 0; step skipping = a coarser grid).

    `remask` = eta > 0 turns it into ReMDM (Wang et al. 2025, the "cap" schedule): each step also
    sends a generated token back to [MASK] with probability sigma = min(eta, (1 - alpha_s) /
    alpha_t), and reveals with a' = (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) instead of a,
    so every position is still [MASK] at s with probability 1 - alpha_s, as in the forward
    process. Fixed tokens are never remasked. With remasking it is no longer the model's chain.

    Unconditional from `lengths`, or conditional from `canvas` (ids, attention; see
    `pipeline.diffusion.canvas`): only its [MASK] positions are ever written, which is the
    model's chain conditioned on the fixed tokens. `cache=True` is valid only for a time-agnostic
    denoiser: a row's output is recomputed only after that row changed, so each row costs at most
    its number of [MASK] positions in model calls.
    """
    check_grid(schedule, grid)
    if not 0.0 <= remask <= 1.0:
        raise ValueError(f"the remasking budget eta must lie in [0, 1], got {remask}")
    T = schedule.num_timesteps
    start = time.perf_counter()
    if runs_resident(device, resident):
        from pipeline.diffusion import resident as on_device

        chain = partial(on_device.ancestral_chain, grid=grid, remask=remask, progress=progress)
        done = run_resident(chain, denoiser, schedule, lengths, canvas, special, cls_id, sep_id, device, seed, start,
                         truncation=(top_k, top_p, temperature))  # fmt: skip
        if done is not None:
            return done
        # more top-k ties than the device path keeps: the host path below is exact for any ties
    gen = torch.Generator().manual_seed(seed)
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    batch, width = x.shape
    masked = x == special.mask  # [B, L]
    free = masked.clone()  # the positions this sampler generates (and may remask)
    predictions = Predictions(
        denoiser, special, top_k=top_k, top_p=top_p, temperature=temperature, cache=cache, device=device
    )
    trace: list[int] = []
    for step, (t_step, s_step) in enumerate(itertools.pairwise(grid)):
        # One set of uniforms per step, drawn before any early exit, keeps every path in lockstep.
        u_reveal = torch.rand(batch, width, generator=gen, dtype=torch.float64)
        u_token = torch.rand(batch, width, generator=gen, dtype=torch.float64)
        u_remask = torch.rand(batch, width, generator=gen, dtype=torch.float64) if remask > 0 else None
        if not masked.any() and u_remask is None:
            trace.append(0)
            continue
        # Every row is at the same step: one [1, V] (or [1, 1]) table serves the batch.
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        s = torch.full((1,), float(s_step), dtype=torch.float64)
        sent_back = None
        if u_remask is None:
            reveal = schedule.reveal_probability(t, s)[0]  # [V] or [1]
        else:
            reveal, sigma = remdm_probabilities(schedule, t, s, remask)  # [V] or [1] each
            decoded = free & ~masked  # generated before this step: each may go back to [MASK]
            sent_back = decoded & (u_remask < (sigma[x] if sigma.shape[0] > 1 else sigma))
        if masked.any():
            table = predictions.refresh(x, attn, masked, t_step / T)  # [B, L, K]
            b_idx, l_idx = masked.nonzero(as_tuple=True)  # [M]
            if s_step == 0:  # alpha_0 = 1: a(v) = 1 for every v, so every [MASK] is revealed now
                chance = torch.ones(len(b_idx), dtype=torch.float64)
            elif reveal.shape[-1] == 1:
                chance = reveal.expand(len(b_idx))  # sum_v p(v) a = a
            else:
                chance = reveal_chance(table, b_idx, l_idx, reveal)  # sum_v p(v) a(v), float64
            hit = u_reveal[b_idx, l_idx] < chance
            if hit.any():
                hb, hl = b_idx[hit], l_idx[hit]
                per_id = reveal if reveal.shape[-1] != 1 else None  # p(v) a(v), or p(v) when a is one number
                x[hb, hl] = draw_token(table.at(hb, hl), u_token[hb, hl], per_id)
                masked[hb, hl] = False
                predictions.changed(hb)
        if sent_back is not None and sent_back.any():
            x[sent_back] = special.mask
            masked |= sent_back
            predictions.changed(sent_back.any(1).nonzero(as_tuple=True)[0])
        trace.append(int(masked.sum()))
        if progress is not None:
            progress(step + 1)
    return predictions.output(x, attn, masked, start, trace)


def decode(tokens: Tensor, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Sample ids -> text without special tokens."""
    texts: list[str] = tokenizer.batch_decode(
        tokens.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    return texts
