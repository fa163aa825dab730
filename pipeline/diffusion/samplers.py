"""Generation: the ancestral reverse process (PAPER §6), confidence-ordered unmasking and
BERT-Mouth Gibbs sampling, each unconditional or from a canvas of fixed tokens.

The reverse step t -> s reveals each masked position with probability sum_v p(v) a(v) and
draws its token proportionally to p(v) a(v), a(v) = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v));
for a token-independent schedule the reveal chance is just a. Truncation (top-k, top-p,
temperature) acts on p_theta(x0 | x_t) only, never on the reveal chance. Draws are float64
inverse-CDF draws from a seeded generator, one uniform per position per step whether or not the
model was called, so the cached sampler returns exactly the tokens of the uncached one.

Truncation and the draws on what it keeps (sparse under top-k): `pipeline.diffusion.truncation`;
the step maths the device samplers share: `pipeline.diffusion.reverse`; one interface over all of
them: `pipeline.diffusion.sampler`.

Devices: on the CPU these host samplers run the MLM head only at the [MASK] positions left
(finding them is free there). On an accelerator every sampler runs device-resident instead
(`pipeline.diffusion.resident`): canvas, truncation, reveal chances and the float64 draws on the
model's device with fixed shapes, so no step waits for the device; `resident=` forces either.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pipeline.diffusion.canvas import starting_canvas
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.reverse import (
    CONFIDENCE_SCORES,
    confidence,
    draw_categorical,
    remdm_probabilities,
    reveal_counts,
)
from pipeline.diffusion.reverse import (
    top_p_mask as top_p_mask,  # named here too: the samplers' truncation
)
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.truncation import (
    Kept,
    draw_token,
    pad_kept,
    reveal_chance,
    truncate,
)
from pipeline.diffusion.truncation import (
    truncated_probs as truncated_probs,  # named here too: the dense reference the tests compare with
)
from pipeline.tensors import id_tensor, upload

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

# False: keep dense [.., V] rows even under top-k (the reference the exactness tests and
# benchmarks/bench_sampler.py compare the sparse path with). Same tokens either way.
_SPARSE_TOP_K = True


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] including [CLS] / [SEP] / [PAD]
    attention_mask: Tensor  # [B, L]
    model_calls: int  # forward invocations
    row_calls: Tensor  # [B] forwards each sequence took part in
    seconds: float
    model_seconds: float = 0.0
    trace: list[int] = field(default_factory=list)  # masked positions left after each step


def _timed_forward(denoiser: Denoiser, x: Tensor, attn: Tensor, s_frac: Tensor, sel: Tensor) -> tuple[Tensor, float]:
    """The denoiser's logits [N, V] and its wall seconds. On an accelerator it waits for the
    result: otherwise the seconds count the launch only, and the copy down after truncation
    absorbs the forward (a sampler would look like all overhead)."""
    tick = time.perf_counter()
    logits = denoiser(x, attn, s_frac, sel)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits, time.perf_counter() - tick


class _Predictions:
    """Truncated p_theta(x0 | x_t) at every masked position: a [B, L, K] `Kept` table on the host.

    `refresh` calls the denoiser on the rows that need it: every row with a [MASK] left, or, with
    `cache` (exact only for a time-agnostic denoiser), only the rows changed since their last call.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        special: SpecialIds,
        *,
        top_k: int,
        top_p: float,
        temperature: float,
        cache: bool,
        device: torch.device | str,
    ) -> None:
        self.denoiser, self.cache, self.device = denoiser, cache, device
        self.forbidden = special.forbidden_outputs
        self.truncation = (top_k, top_p, temperature)
        self.table: Kept | None = None  # [B, L, K]; valid where masked
        self.stale: Tensor | None = None  # [B] rows whose cached output is out of date
        self.row_calls: Tensor | None = None  # [B]
        self.calls, self.model_seconds = 0, 0.0

    def refresh(self, x: Tensor, attn: Tensor, masked: Tensor, s_value: float) -> Kept:
        batch, width = x.shape
        if self.stale is None:
            self.stale = torch.ones(batch, dtype=torch.bool)
            self.row_calls = torch.zeros(batch, dtype=torch.long)
        assert self.row_calls is not None
        need = masked.any(1) & (self.stale if self.cache else torch.ones_like(self.stale))
        if need.any():
            rows = need.nonzero(as_tuple=True)[0]
            s_frac = torch.full((len(rows),), s_value, dtype=torch.float32, device=self.device)
            sel = masked[rows].to(self.device)
            logits, seconds = _timed_forward(
                self.denoiser, x[rows].to(self.device), attn[rows].to(self.device), s_frac, sel
            )  # [N, V]
            self.model_seconds += seconds
            self.calls += 1
            self.row_calls[rows] += 1
            # Truncation runs where the logits are; one [N, K] copy to the CPU bookkeeping per call.
            kept = truncate(logits, self.forbidden, *self.truncation, sparse=_SPARSE_TOP_K)  # [N, K]
            sel_b, sel_l = masked[rows].nonzero(as_tuple=True)  # = sel, without a device -> host copy
            self._store(rows[sel_b], sel_l, kept, batch, width)
            self.stale[rows] = False
        assert self.table is not None  # every row is stale at the first step
        return self.table

    def _store(self, b_idx: Tensor, l_idx: Tensor, kept: Kept, batch: int, width: int) -> None:
        """Write kept [N, K] at positions (b_idx, l_idx) [N] of the [B, L, K'] table, padding the
        narrower of the two with zero-probability entries (K differs only after a top-k tie)."""
        k = kept.probs.shape[-1]
        if self.table is None:
            ids = None if kept.ids is None else torch.zeros(batch, width, k, dtype=torch.long)
            self.table = Kept(torch.zeros(batch, width, k, dtype=torch.float32), ids)
        if self.table.probs.shape[-1] < k:
            self.table = pad_kept(self.table, k)
        self.table.put(b_idx, l_idx, pad_kept(kept, self.table.probs.shape[-1]))

    def changed(self, rows: Tensor) -> None:
        """Rows that had a position revealed: their cached output is out of date."""
        assert self.stale is not None
        self.stale[rows] = True

    def counts(self, batch: int) -> Tensor:
        return self.row_calls if self.row_calls is not None else torch.zeros(batch, dtype=torch.long)


def runs_resident(device: torch.device | str, resident: bool | None) -> bool:
    """Whether a sampler runs device-resident: by default exactly on accelerators."""
    return torch.device(device).type != "cpu" if resident is None else resident


def _resident(
    chain: Callable[..., tuple[Tensor, int, float, bool, list[int]]],
    denoiser: Denoiser,
    schedule: Schedule,
    lengths: Sequence[int] | Tensor | None,
    canvas: tuple[Tensor, Tensor] | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    device: torch.device | str,
    seed: int,
    start: float,
    truncation: tuple[int, float, float],
) -> SampleOutput | None:
    """A chain of `pipeline.diffusion.resident` on the model's device, from the host canvas; None
    when more top-k ties occurred than it keeps (the caller then runs the exact host path)."""
    from pipeline.diffusion import resident as on_device

    device = torch.device(device)
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    generator = on_device.device_generator(device, seed)
    tokens, calls, model_seconds, overflowed, left = chain(
        denoiser, schedule, upload(x, device), upload(attn, device), x == special.mask, special,
        truncation=truncation, generator=generator,
    )  # fmt: skip
    if overflowed:
        return None
    seconds = time.perf_counter() - start
    return SampleOutput(tokens, attn, calls, torch.full((x.shape[0],), calls), seconds, model_seconds, left)


def _check_grid(schedule: Schedule, grid: Sequence[int]) -> None:
    T = schedule.num_timesteps
    if grid[0] != T or grid[-1] != 0:
        raise ValueError(f"time grid must run from T={T} down to 0, got {grid[0]}..{grid[-1]}")


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
    _check_grid(schedule, grid)
    if not 0.0 <= remask <= 1.0:
        raise ValueError(f"the remasking budget eta must lie in [0, 1], got {remask}")
    T = schedule.num_timesteps
    start = time.perf_counter()
    if runs_resident(device, resident):
        from pipeline.diffusion import resident as on_device

        chain = partial(on_device.ancestral_chain, grid=grid, remask=remask, progress=progress)
        done = _resident(chain, denoiser, schedule, lengths, canvas, special, cls_id, sep_id, device, seed, start,
                         truncation=(top_k, top_p, temperature))  # fmt: skip
        if done is not None:
            return done
        # more top-k ties than the device path keeps: the host path below is exact for any ties
    gen = torch.Generator().manual_seed(seed)
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    batch, width = x.shape
    masked = x == special.mask  # [B, L]
    free = masked.clone()  # the positions this sampler generates (and may remask)
    predictions = _Predictions(
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
    if masked.any():  # cannot happen on a grid that ends at 0 (a = 1 there); guard anyway
        raise RuntimeError("sampling ended with [MASK] tokens left")
    return SampleOutput(
        x,
        attn,
        predictions.calls,
        predictions.counts(batch),
        time.perf_counter() - start,
        predictions.model_seconds,
        trace,
    )


@torch.no_grad()
def gibbs_sample(
    denoiser: Denoiser,
    lengths: Sequence[int] | Tensor | None,
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
    canvas: tuple[Tensor, Tensor] | None = None,
    resident: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> SampleOutput:
    """BERT-Mouth (Wang & Cho 2019): from all [MASK], repeatedly mask one position per row and
    resample it from the MLM. The first sweep visits positions in a random order, so every
    [MASK] is filled; later sweeps revisit every position in a fresh random order.

    With a `canvas`, only its [MASK] positions are free: fixed tokens are never masked again.
    Not the model's chain: no bound applies to its samples. The positions it visits are fixed
    in advance, so it runs the same code on every device (device-resident on accelerators)."""
    from pipeline.diffusion import resident as on_device

    start = time.perf_counter()
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    free = x == special.mask  # [B, L] the positions this sampler may write
    batch, width = x.shape
    n_free = free.sum(1)  # [B]
    if (n_free == 0).any():
        raise ValueError("every canvas row needs at least one [MASK] position to sample")
    visits = int(n_free.max())
    last_free = torch.where(free, torch.arange(width)[None, :], 0).amax(1)  # [B]
    model_device = torch.device(device)
    keep_on_device = runs_resident(model_device, resident)
    here = model_device if keep_on_device else torch.device("cpu")  # where canvas and draws live
    gen = on_device.device_generator(here, seed)
    x, attn, free, n_free, last_free = (upload(t, here) for t in (x, attn, free, n_free, last_free))
    forbidden = id_tensor(special.forbidden_outputs, model_device)
    timer = on_device.ForwardTimer(model_device)
    rows = torch.arange(batch, device=here)
    ones = torch.ones(batch, dtype=torch.float32, device=model_device)
    visited = 0
    for _ in range(max(1, sweeps)):
        # [B, L-2] random order of each row's free positions (content lies in 1..L-2); a row with
        # fewer free positions than the longest keeps revisiting its last one, which is harmless.
        keys = torch.rand(batch, width - 2, generator=gen, dtype=torch.float64, device=here)
        keys = torch.where(free[:, 1 : width - 1], keys, 2.0)
        order = keys.argsort(1) + 1
        for j in range(visits):
            pos = torch.where(j < n_free, order[:, j], last_free)  # [B]
            flat = rows * width + pos  # [B] the visited position of each row, in B * L
            x.view(-1).index_fill_(0, flat, special.mask)
            if keep_on_device:
                logits = timer(denoiser, x, attn, ones, flat)  # [B, V]
                probs, ids, _ = on_device.truncate_fixed(logits, forbidden, top_k, top_p, temperature)
                u = torch.rand(batch, generator=gen, dtype=torch.float64, device=here)
                x[rows, pos] = on_device.draw_tokens(probs, ids, u)
            else:
                logits = timer(denoiser, x.to(model_device), attn.to(model_device), ones, flat.to(model_device))
                kept = truncate(logits, special.forbidden_outputs, top_k, top_p, temperature, sparse=_SPARSE_TOP_K)
                u = torch.rand(batch, generator=gen, dtype=torch.float64)
                x[rows, pos] = draw_token(kept, u)
            visited += 1
            if progress is not None:
                progress(visited)
    calls = timer.calls
    tokens, attn = x.cpu(), attn.cpu()
    return SampleOutput(tokens, attn, calls, torch.full((batch,), calls), time.perf_counter() - start, timer.seconds())


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
    _check_grid(schedule, grid)
    T = schedule.num_timesteps
    start = time.perf_counter()
    if runs_resident(device, resident):
        from pipeline.diffusion import resident as on_device

        chain = partial(on_device.confidence_chain, grid=grid, score=score, progress=progress)
        done = _resident(chain, denoiser, schedule, lengths, canvas, special, cls_id, sep_id, device, seed, start,
                         truncation=(top_k, top_p, temperature))  # fmt: skip
        if done is not None:
            return done
    gen = torch.Generator().manual_seed(seed)
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)
    batch, width = x.shape
    masked = x == special.mask  # [B, L]
    predictions = _Predictions(
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
    if masked.any():
        raise RuntimeError("sampling ended with [MASK] tokens left")
    return SampleOutput(
        x,
        attn,
        predictions.calls,
        predictions.counts(batch),
        time.perf_counter() - start,
        predictions.model_seconds,
        trace,
    )


def decode(tokens: Tensor, tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Sample ids -> text without special tokens."""
    texts: list[str] = tokenizer.batch_decode(
        tokens.tolist(), skip_special_tokens=True, clean_up_tokenization_spaces=True
    )
    return texts
