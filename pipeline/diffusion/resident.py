"""The samplers on an accelerator: canvas, truncation, reveal chances and float64 draws all on the
model's device, with fixed shapes, so no step waits for the device to answer the host.

The host samplers (`pipeline.diffusion.samplers`) find the [MASK] positions left at every step
and run the MLM head there only: cheap on a CPU, where the host *is* the device, but on a GPU
each `nonzero` or `.any()` stops the host until the device has caught up. Here every step works
on the slots a sampler may write (the canvas's [MASK] positions, known before the first step):
the model is asked at all of them, a revealed slot simply keeps its token, and the [MASK] left
are read once, after the chain. The maths and the uniforms are the host samplers', so the
distribution is the same (the chi-square contract tests run on both); the tokens match the host
path's up to float rounding of the truncated probabilities. Caching does not apply here: skipping
unchanged rows needs the host to know which rows changed.

Top-k keeps the top k + `TOP_K_MARGIN` entries and drops those below the k-th, so ties with the
k-th are kept as on the host; more than `TOP_K_MARGIN` ties would be cut, which is detected on
the device and answered, after the chain, by running the host sampler instead.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.reverse import (
    confidence,
    draw_categorical,
    remdm_probabilities,
    reveal_counts,
    top_p_mask,
)
from pipeline.diffusion.schedules import Schedule
from pipeline.tensors import id_tensor, upload

TOP_K_MARGIN = 16
DRAW_CHUNK = 2048  # positions per float64 CDF: bounds its memory at DRAW_CHUNK * K * 8 bytes


class ForwardTimer:
    """The denoiser's share of a sampler's time without waiting for the device at every call:
    CUDA events around each forward, read once at the end; wall clock elsewhere (a CPU forward
    is synchronous)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self.wall = 0.0
        self.calls = 0

    def __call__(self, denoiser: Denoiser, *args: Tensor) -> Tensor:
        self.calls += 1
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            end = torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]
            start.record()
            logits = denoiser(*args)
            end.record()
            self.events.append((start, end))
            return logits
        tick = time.perf_counter()
        logits = denoiser(*args)
        self.wall += time.perf_counter() - tick
        return logits

    def seconds(self) -> float:
        """Total forward seconds (waits for the device once, on CUDA)."""
        if not self.events:
            return self.wall
        self.events[-1][1].synchronize()
        return self.wall + float(sum(a.elapsed_time(b) for a, b in self.events)) / 1000.0


def device_generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded generator on `device`, so the draws are made where the canvas is. On the CPU it
    is the host samplers' stream; on a GPU the stream is the GPU's own (other numbers, same law)."""
    return torch.Generator(device=device).manual_seed(seed)


def truncate_fixed(
    logits: Tensor, forbidden: Tensor, top_k: int, top_p: float, temperature: float
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Truncated p_theta(x0 | x_t) with a fixed width: (probs [M, K], ids [M, K] ascending or
    None for dense rows, overflow [M] bool: more ties with the k-th logit than the margin holds)."""
    scaled = logits.float() / temperature  # [M, V], a new tensor
    scaled.index_fill_(-1, forbidden, float("-inf"))
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        width = min(top_k + TOP_K_MARGIN, vocab)
        values, ids = torch.topk(scaled, width, dim=-1)  # [M, W], descending
        kth = values[:, top_k - 1 : top_k]  # [M, 1]
        values = values.masked_fill(values < kth, float("-inf"))  # ties with the k-th stay
        overflow = (values[:, -1] == kth[:, 0]) & kth[:, 0].isfinite() & (width < vocab)
        ids, by_id = ids.sort(-1)  # ascending ids: the CDF order of the host path
        values = values.gather(-1, by_id)
        if top_p < 1.0:
            values = top_p_mask(values, top_p)
        return torch.softmax(values, dim=-1), ids, overflow
    if top_p < 1.0:
        scaled = top_p_mask(scaled, top_p)
    overflow = torch.zeros(scaled.shape[0], dtype=torch.bool, device=scaled.device)
    return torch.softmax(scaled, dim=-1), None, overflow


def _entries(per_id: Tensor, ids: Tensor | None) -> Tensor:
    """A per-id table [V] at every kept entry: [M, K] (dense rows: [V], broadcast)."""
    return per_id if ids is None else per_id.index_select(0, ids.reshape(-1)).view(ids.shape)


def reveal_chances(probs: Tensor, ids: Tensor | None, reveal: Tensor) -> Tensor:
    """sum_v p(v) a(v) per slot, accumulated in float64 in chunks. [M] float64"""
    reveal = reveal.to(torch.float64)
    out = torch.empty(probs.shape[0], dtype=torch.float64, device=probs.device)
    for start in range(0, probs.shape[0], DRAW_CHUNK):
        p = probs[start : start + DRAW_CHUNK].double()
        piece = ids[start : start + DRAW_CHUNK] if ids is not None else None
        out[start : start + DRAW_CHUNK] = p @ reveal if piece is None else (p * _entries(reveal, piece)).sum(-1)
    return out.clamp_(0.0, 1.0)


def draw_tokens(probs: Tensor, ids: Tensor | None, uniforms: Tensor, reveal: Tensor | None = None) -> Tensor:
    """A token per slot from p(v), or from p(v) a(v) given a per-id `reveal` [V]: [M] ids.
    Column by inverse CDF as on the host (`draw_categorical`), in chunks of slots."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for start in range(0, probs.shape[0], DRAW_CHUNK):
        stop = start + DRAW_CHUNK
        weights = probs[start:stop].double()
        piece = ids[start:stop] if ids is not None else None
        if reveal is not None:
            weights = weights * _entries(reveal.to(torch.float64), piece)
        column = draw_categorical(weights, uniforms[start:stop])
        out[start:stop] = column if piece is None else piece.gather(-1, column[:, None]).squeeze(-1)
    return out


def _tables_on(schedule: Schedule, device: torch.device) -> None:
    """Move the schedule's per-id tables to the device before the chain (they are cached there),
    so that no step waits on their upload."""
    t = torch.ones(1, dtype=torch.float64, device=device)
    schedule.reveal_probability(t, t)


class Slots:
    """The slots a sampler writes: flat indices [M] into B * L (row-major) and their rows [M],
    fixed for the whole chain and computed on the host before it starts."""

    def __init__(self, free_host: Tensor, device: torch.device) -> None:
        batch, width = free_host.shape
        flat = free_host.reshape(-1).nonzero(as_tuple=True)[0]
        self.batch, self.width, self.count = batch, width, int(flat.numel())
        self.flat = upload(flat, device)  # [M]
        self.rows = torch.div(self.flat, width, rounding_mode="floor")  # [M]

    def read(self, table: Tensor) -> Tensor:
        """A [B, L] table at the slots: [M]."""
        return table.reshape(-1).index_select(0, self.flat)

    def write(self, table: Tensor, values: Tensor) -> Tensor:
        """A copy of the [B, L] table with `values` [M] at the slots."""
        return table.reshape(-1).index_copy(0, self.flat, values).view(self.batch, self.width)


class Chain:
    """What every resident chain keeps: the model call at the slots, truncation, the overflow
    flag and the trace of [MASK] left, all on the device until `finish`."""

    def __init__(
        self,
        denoiser: Denoiser,
        special: SpecialIds,
        slots: Slots,
        truncation: tuple[int, float, float],
        device: torch.device,
    ) -> None:
        self.denoiser, self.slots, self.truncation, self.device = denoiser, slots, truncation, device
        self.forbidden = id_tensor(special.forbidden_outputs, device)
        self.timer = ForwardTimer(device)
        self.overflow = torch.zeros((), dtype=torch.bool, device=device)
        self.left: list[Tensor] = []

    def predict(self, x: Tensor, attn: Tensor, s_value: float) -> tuple[Tensor, Tensor | None]:
        """Truncated p_theta(x0 | x_t) at every slot: (probs [M, K], ids [M, K] or None)."""
        s_frac = torch.full((x.shape[0],), s_value, dtype=torch.float32, device=self.device)
        logits = self.timer(self.denoiser, x, attn, s_frac, self.slots.flat)  # [M, V]
        probs, ids, overflow = truncate_fixed(logits, self.forbidden, *self.truncation)
        self.overflow |= overflow.any()
        return probs, ids

    def finish(self) -> tuple[bool, list[int]]:
        """After the chain (one wait): (whether a top-k tie overflowed the margin, the trace)."""
        left = torch.stack(self.left).tolist() if self.left else []
        return bool(self.overflow), [int(n) for n in left]


def ancestral_chain(
    denoiser: Denoiser,
    schedule: Schedule,
    x: Tensor,
    attn: Tensor,
    free_host: Tensor,
    special: SpecialIds,
    *,
    grid: Sequence[int],
    truncation: tuple[int, float, float],
    generator: torch.Generator,
    remask: float,
    progress: Callable[[int], None] | None,
) -> tuple[Tensor, int, float, bool, list[int]]:
    """The ancestral (or ReMDM) reverse process of `samplers.ancestral_sample` on x's device.
    Returns (tokens [B, L] on the host, model calls, model seconds, overflowed, trace)."""
    device = x.device
    T = schedule.num_timesteps
    batch, width = x.shape
    slots = Slots(free_host, device)
    chain = Chain(denoiser, special, slots, truncation, device)
    masked = x == special.mask  # [B, L]
    free = masked.clone()
    _tables_on(schedule, device)
    for step, (t_step, s_step) in enumerate(itertools.pairwise(grid)):
        u_reveal = torch.rand(batch, width, generator=generator, dtype=torch.float64, device=device)
        u_token = torch.rand(batch, width, generator=generator, dtype=torch.float64, device=device)
        u_remask = (
            torch.rand(batch, width, generator=generator, dtype=torch.float64, device=device) if remask > 0 else None
        )
        t = torch.full((1,), float(t_step), dtype=torch.float64, device=device)
        s = torch.full((1,), float(s_step), dtype=torch.float64, device=device)
        sent_back = None
        if u_remask is None:
            reveal = schedule.reveal_probability(t, s)[0]  # [V] or [1]
        else:
            reveal, sigma = remdm_probabilities(schedule, t, s, remask)
            decoded = free & ~masked
            sent_back = decoded & (u_remask < (sigma[x] if sigma.shape[0] > 1 else sigma))
        probs, ids = chain.predict(x, attn, t_step / T)  # [M, K]
        still = slots.read(masked)  # [M]
        if s_step == 0:  # alpha_0 = 1: every [MASK] is revealed now
            hit = still
        else:
            chance = reveal.expand(slots.count) if reveal.shape[-1] == 1 else reveal_chances(probs, ids, reveal)
            hit = still & (slots.read(u_reveal) < chance)
        per_id = reveal if reveal.shape[-1] != 1 else None
        token = draw_tokens(probs, ids, slots.read(u_token), per_id)  # [M]
        x = slots.write(x, torch.where(hit, token, slots.read(x)))
        masked = slots.write(masked, still & ~hit)
        if sent_back is not None:
            x = torch.where(sent_back, torch.full_like(x, special.mask), x)
            masked = masked | sent_back
        chain.left.append(masked.sum())
        if progress is not None:
            progress(step + 1)
    overflowed, trace = chain.finish()
    if not overflowed and trace and trace[-1] != 0:  # cannot happen on a grid that ends at 0
        raise RuntimeError("sampling ended with [MASK] tokens left")
    return x.cpu(), chain.timer.calls, chain.timer.seconds(), overflowed, trace


def confidence_chain(
    denoiser: Denoiser,
    schedule: Schedule,
    x: Tensor,
    attn: Tensor,
    free_host: Tensor,
    special: SpecialIds,
    *,
    grid: Sequence[int],
    score: str,
    truncation: tuple[int, float, float],
    generator: torch.Generator,
    progress: Callable[[int], None] | None,
) -> tuple[Tensor, int, float, bool, list[int]]:
    """`samplers.confidence_sample` on x's device; returns as `ancestral_chain`."""
    device = x.device
    T = schedule.num_timesteps
    batch, width = x.shape
    slots = Slots(free_host, device)
    chain = Chain(denoiser, special, slots, truncation, device)
    masked = x == special.mask
    owed = torch.zeros(batch, dtype=torch.float64, device=device)
    _tables_on(schedule, device)
    for step, (t_step, s_step) in enumerate(itertools.pairwise(grid)):
        u_token = torch.rand(batch, width, generator=generator, dtype=torch.float64, device=device)
        probs, ids = chain.predict(x, attn, t_step / T)  # [M, K]
        still = slots.read(masked)  # [M]
        t = torch.full((1,), float(t_step), dtype=torch.float64, device=device)
        s = torch.full((1,), float(s_step), dtype=torch.float64, device=device)
        reveal = schedule.reveal_probability(t, s)[0]
        chance = reveal.expand(slots.count) if reveal.shape[-1] == 1 else reveal_chances(probs, ids, reveal)
        chance = torch.where(still, chance, torch.zeros_like(chance))  # +0 where nothing is masked
        expected = torch.zeros(batch, dtype=torch.float64, device=device).index_add_(0, slots.rows, chance)
        counts = reveal_counts(masked.sum(1), expected, owed, last_step=s_step == 0)  # [B]
        column = torch.empty(slots.count, dtype=torch.long, device=device)
        uniforms = slots.read(u_token)
        for start in range(0, slots.count, DRAW_CHUNK):
            column[start : start + DRAW_CHUNK] = draw_categorical(
                probs[start : start + DRAW_CHUNK], uniforms[start : start + DRAW_CHUNK]
            )
        drawn = column if ids is None else ids.gather(-1, column[:, None]).squeeze(-1)
        sure = confidence(probs, column, score)  # [M]
        minus_inf = torch.full_like(sure, float("-inf"))
        scores = slots.write(
            torch.full((batch, width), float("-inf"), dtype=torch.float64, device=device),
            torch.where(still, sure, minus_inf),
        )
        rank = scores.argsort(dim=1, descending=True, stable=True).argsort(dim=1)  # [B, L]
        keep = masked & (rank < counts[:, None])
        proposal = slots.write(torch.zeros_like(x), drawn)
        x = torch.where(keep, proposal, x)
        masked = masked & ~keep
        chain.left.append(masked.sum())
        if progress is not None:
            progress(step + 1)
    overflowed, trace = chain.finish()
    if not overflowed and trace and trace[-1] != 0:
        raise RuntimeError("sampling ended with [MASK] tokens left")
    return x.cpu(), chain.timer.calls, chain.timer.seconds(), overflowed, trace
