"""Generation: the ancestral reverse process (PAPER §6) and BERT-Mouth Gibbs sampling.

The reverse step t -> s reveals each masked position with probability sum_v p(v) a(v) and
draws its token proportionally to p(v) a(v), a(v) = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v));
for a token-independent schedule the reveal chance is just a. Truncation (top-k, top-p,
temperature) acts on p_theta(x0 | x_t) only, never on the reveal chance. Draws are float64
inverse-CDF draws from a seeded generator, one uniform per position per step whether or not the
model was called, so the cached sampler returns exactly the tokens of the uncached one.

Devices: everything handed to the denoiser is on `device`, and truncation runs there; the
canvas, the [B, L, V] probabilities (host memory) and the seeded draws stay on the CPU, so the
only copies per model call are the inputs up and one [N, V] float32 table down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.schedules import Schedule


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] including [CLS] / [SEP] / [PAD]
    attention_mask: Tensor  # [B, L]
    model_calls: int  # forward invocations
    row_calls: Tensor  # [B] forwards each sequence took part in
    seconds: float
    model_seconds: float = 0.0
    trace: list[int] = field(default_factory=list)  # masked positions left after each step


def initial_canvas(
    lengths: Sequence[int] | Tensor, special: SpecialIds, cls_id: int, sep_id: int
) -> tuple[Tensor, Tensor]:
    """[CLS] [MASK]*n [SEP] [PAD]... for each content length n: (ids [B, L], attention [B, L])."""
    lengths = torch.as_tensor(lengths, dtype=torch.long)
    if (lengths < 1).any():
        raise ValueError("every sample needs a content length >= 1")
    width = int(lengths.max()) + 2
    pos = torch.arange(width)[None, :]  # [1, L]
    ids = torch.full((len(lengths), width), special.pad, dtype=torch.long)
    ids[pos <= lengths[:, None]] = special.mask
    ids[:, 0] = cls_id
    ids[torch.arange(len(lengths)), lengths + 1] = sep_id
    return ids, pos <= lengths[:, None] + 1


def truncated_probs(
    logits: Tensor, forbidden_ids: Sequence[int], top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0
) -> Tensor:
    """p_theta(x0 | x_t) after SUBS, temperature, top-k and top-p. [N, V] float32.

    Probabilities are accurate to float32 (1e-7 relative); the draws that use them accumulate
    their CDF in float64 (`draw_categorical`), which is what keeps tails from being cut off.
    """
    logits = logits.float() / temperature
    if forbidden_ids:
        logits = logits.index_fill(-1, torch.as_tensor(list(forbidden_ids), device=logits.device), float("-inf"))
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop_sorted = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the token that crosses p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.softmax(logits, dim=-1)


def draw_categorical(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised weights [N, V] with float64 uniforms [N]; the CDF is
    accumulated in float64. [N]"""
    cdf = weights.double().cumsum(-1)
    target = uniforms * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return index.clamp_max(weights.shape[-1] - 1)


def reveal_chance(probs: Tensor, b_idx: Tensor, l_idx: Tensor, reveal: Tensor, chunk: int = 512) -> Tensor:
    """sum_v p(v) a(v) at the masked positions (b_idx, l_idx), accumulated in float64. [M]

    In float32 a sum over 30,522 ids is off by ~5e-6: a chance that must be 1 comes out below
    it, and a position can stay masked when it must be revealed. Chunks of `chunk` positions
    bound the float64 copy at chunk * V * 8 bytes.
    """
    reveal = reveal.to(torch.float64)
    out = torch.empty(len(b_idx), dtype=torch.float64)
    for start in range(0, len(b_idx), chunk):
        rows = probs[b_idx[start : start + chunk], l_idx[start : start + chunk]].double()  # [c, V]
        out[start : start + chunk] = rows @ reveal
    return out.clamp_(0.0, 1.0)


@torch.no_grad()
def ancestral_sample(
    denoiser: Denoiser,
    schedule: Schedule,
    lengths: Sequence[int] | Tensor,
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
) -> SampleOutput:
    """Reverse process on a descending time grid (T ... 0; step skipping = a coarser grid).

    `cache=True` is valid only for a time-agnostic denoiser: a row's output is recomputed only
    after that row changed, so each row costs at most its length in model calls.
    """
    T = schedule.num_timesteps
    if grid[0] != T or grid[-1] != 0:
        raise ValueError(f"time grid must run from T={T} down to 0, got {grid[0]}..{grid[-1]}")
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x, attn = initial_canvas(lengths, special, cls_id, sep_id)
    batch, width = x.shape
    masked = x == special.mask  # [B, L]
    forbidden = special.forbidden_outputs
    probs: Tensor | None = None  # [B, L, V] float32 truncated p; valid where masked
    stale = torch.ones(batch, dtype=torch.bool)
    row_calls = torch.zeros(batch, dtype=torch.long)
    calls, model_seconds, trace = 0, 0.0, []
    for step, (t_step, s_step) in enumerate(zip(grid[:-1], grid[1:])):
        # One set of uniforms per step, drawn before any early exit, keeps every path in lockstep.
        u_reveal = torch.rand(batch, width, generator=gen, dtype=torch.float64)
        u_token = torch.rand(batch, width, generator=gen, dtype=torch.float64)
        if not masked.any():
            trace.append(0)
            continue
        need = masked.any(1) & (stale if cache else torch.ones_like(stale))
        if need.any():
            rows = need.nonzero(as_tuple=True)[0]
            s_frac = torch.full((len(rows),), t_step / T, dtype=torch.float32, device=device)
            sel = masked[rows].to(device)
            tick = time.perf_counter()
            logits = denoiser(x[rows].to(device), attn[rows].to(device), s_frac, sel)  # [N, V]
            model_seconds += time.perf_counter() - tick
            calls += 1
            row_calls[rows] += 1
            # Truncation runs where the logits are; one [N, V] copy to the CPU bookkeeping per call.
            p = truncated_probs(logits, forbidden, top_k, top_p, temperature).cpu()  # [N, V] fp32
            if probs is None:
                probs = torch.zeros(batch, width, p.shape[-1], dtype=torch.float32)
            sel_b, sel_l = masked[rows].nonzero(as_tuple=True)  # = sel, without a device -> host copy
            probs[rows[sel_b], sel_l] = p  # in place, row-major like the model's output
            stale[rows] = False
        assert probs is not None  # every row is stale at the first step
        # Every row is at the same step: one [1, V] (or [1, 1]) reveal table serves the batch.
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        s = torch.full((1,), float(s_step), dtype=torch.float64)
        reveal = schedule.reveal_probability(t, s)[0]  # [V] or [1]
        b_idx, l_idx = masked.nonzero(as_tuple=True)  # [M]
        if s_step == 0:  # alpha_0 = 1: a(v) = 1 for every v, so every [MASK] is revealed now
            chance = torch.ones(len(b_idx), dtype=torch.float64)
        elif reveal.shape[-1] == 1:
            chance = reveal.expand(len(b_idx))  # sum_v p(v) a = a
        else:
            chance = reveal_chance(probs, b_idx, l_idx, reveal)  # sum_v p(v) a(v), float64
        hit = u_reveal[b_idx, l_idx] < chance
        if hit.any():
            hb, hl = b_idx[hit], l_idx[hit]
            weights = probs[hb, hl].double()  # [H, V]
            if reveal.shape[-1] != 1:
                weights = weights * reveal[None, :]
            x[hb, hl] = draw_categorical(weights, u_token[hb, hl])
            masked[hb, hl] = False
            stale[hb] = True
        trace.append(int(masked.sum()))
        if progress is not None:
            progress(step + 1)
    if masked.any():  # cannot happen on a grid that ends at 0 (a = 1 there); guard anyway
        raise RuntimeError("sampling ended with [MASK] tokens left")
    return SampleOutput(x, attn, calls, row_calls, time.perf_counter() - start, model_seconds, trace)


@torch.no_grad()
def gibbs_sample(
    denoiser: Denoiser,
    lengths: Sequence[int] | Tensor,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    *,
    sweeps: int = 2,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> SampleOutput:
    """BERT-Mouth (Wang & Cho 2019): from all [MASK], repeatedly mask one position per row and
    resample it from the MLM. The first sweep visits positions in a random order, so every
    [MASK] is filled; later sweeps revisit every position in a fresh random order."""
    start = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    x, attn = initial_canvas(lengths, special, cls_id, sep_id)
    lengths_t = torch.as_tensor(lengths, dtype=torch.long)
    batch, width = x.shape
    forbidden = special.forbidden_outputs
    calls, model_seconds = 0, 0.0
    rows = torch.arange(batch)
    for _ in range(max(1, sweeps)):
        # [B, Lmax] random order of each row's content positions (1..n); rows shorter than Lmax
        # keep revisiting their own positions, which is harmless.
        keys = torch.rand(batch, width - 2, generator=gen, dtype=torch.float64)
        keys[torch.arange(width - 2)[None, :] >= lengths_t[:, None]] = 2.0
        order = keys.argsort(1) + 1
        for j in range(width - 2):
            pos = torch.minimum(order[:, j], lengths_t)  # [B]
            x[rows, pos] = special.mask
            sel = torch.zeros_like(x, dtype=torch.bool)
            sel[rows, pos] = True
            s_frac = torch.ones(batch, dtype=torch.float32, device=device)
            tick = time.perf_counter()
            logits = denoiser(x.to(device), attn.to(device), s_frac, sel.to(device))  # [B, V]
            model_seconds += time.perf_counter() - tick
            calls += 1
            p = truncated_probs(logits, forbidden, top_k, top_p, temperature).cpu()  # [B, V] fp32
            u = torch.rand(batch, generator=gen, dtype=torch.float64)
            x[rows, pos] = draw_categorical(p, u)
    return SampleOutput(x, attn, calls, torch.full((batch,), calls), time.perf_counter() - start, model_seconds)


def decode(tokens: Tensor, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Sample ids -> text without special tokens."""
    texts: list[str] = tokenizer.batch_decode(
        tokens.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    return texts
