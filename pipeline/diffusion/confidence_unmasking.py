"""Confidence-ordered unmasking (MaskGIT; LLaDA's "low-confidence remasking"), unconditional or
from a canvas of fixed tokens: the schedule sets how many positions each step reveals, the model's
confidence which."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from pipeline.diffusion.canvas import starting_canvas
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.host_chain import Predictions, SampleOutput, check_grid, run_resident, runs_resident
from pipeline.diffusion.reverse import CONFIDENCE_SCORES, confidence, draw_categorical, reveal_counts
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.truncation import reveal_chance


@torch.no_grad()
def confidence_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    lengths: Sequence[int] | Tensor | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    *,
    grid: Sequence[int],
    score: str = "prob",
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    cache: bool = False,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    canvas: tuple[Tensor, Tensor] | None = None,
    resident: bool | None = None,
) -> SampleOutput:
    """Confidence-ordered unmasking (MaskGIT; LLaDA's "low-confidence remasking").

    Each step draws a token at every [MASK] from the truncated p_theta(x0 | x_t), then keeps only
    the ones the model is surest of (`score`): as many per row as the schedule's chain would reveal
    in expectation at that step (`reveal_counts`), so the pace follows the noise schedule. The
    rest stay [MASK] and are drawn afresh next step. Not the model's chain: no bound applies.
    """
    if score not in CONFIDENCE_SCORES:
        raise ValueError(f"unknown confidence score {score!r}; choose one of {', '.join(CONFIDENCE_SCORES)}")
    check_grid(schedule, grid)
    T = schedule.num_timesteps
    start = time.perf_counter()
    if runs_resident(device, resident):
        from pipeline.diffusion import resident as on_device

        chain = partial(on_device.confidence_chain, grid=grid, score=score, progress=progress)
        done = run_resident(chain, denoiser, schedule, lengths, canvas, special, cls_id, sep_id, device, seed, start,
                         truncation=(top_k, top_p, temperature))  # fmt: skip
        if done is not None:
            return done
    gen = torch.Generator().manual_seed(seed)
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    batch, width = x.shape
    masked = x == special.mask  # [B, L]
    predictions = Predictions(
        denoiser, special, top_k=top_k, top_p=top_p, temperature=temperature, cache=cache, device=device
    )
    owed = torch.zeros(batch, dtype=torch.float64)  # [B] expected reveals not yet made
    trace: list[int] = []
    for step, (t_step, s_step) in enumerate(itertools.pairwise(grid)):
        u_token = torch.rand(batch, width, generator=gen, dtype=torch.float64)
        if not masked.any():
            trace.append(0)
            continue
        table = predictions.refresh(x, attn, masked, t_step / T)  # [B, L, K]
        b_idx, l_idx = masked.nonzero(as_tuple=True)  # [M]
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        s = torch.full((1,), float(s_step), dtype=torch.float64)
        reveal = schedule.reveal_probability(t, s)[0]  # [V] or [1]
        chance = reveal.expand(len(b_idx)) if reveal.shape[-1] == 1 else reveal_chance(table, b_idx, l_idx, reveal)
        expected = torch.zeros(batch, dtype=torch.float64).index_add_(0, b_idx, chance)  # [B]
        counts = reveal_counts(masked.sum(1), expected, owed, last_step=s_step == 0)  # [B]
        rows = table.at(b_idx, l_idx)  # [M, K]
        column = draw_categorical(rows.probs, u_token[b_idx, l_idx])  # [M]
        drawn = rows.vocab_ids(column)  # [M]
        sure = confidence(rows.probs, column, score)  # [M]
        scores = torch.full((batch, width), float("-inf"), dtype=torch.float64)
        scores[b_idx, l_idx] = sure
        # Rank each row's masked positions by confidence (ties by position) and keep the top counts[b].
        rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [B, L]
        keep = masked & (rank < counts[:, None])
        proposal = torch.zeros_like(x)
        proposal[b_idx, l_idx] = drawn
        x = torch.where(keep, proposal, x)
        masked &= ~keep
        predictions.changed(keep.any(1).nonzero(as_tuple=True)[0])
        trace.append(int(masked.sum()))
        if progress is not None:
            progress(step + 1)
    return predictions.output(x, attn, masked, start, trace)
