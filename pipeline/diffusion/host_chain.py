"""What the host samplers share: their output, the table of truncated predictions they refresh
between model calls, the check of a time grid, and the hand-off to the device-resident chains
(`pipeline.diffusion.resident`) on accelerators."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pipeline.diffusion.canvas import starting_canvas
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.schedules import Schedule
from pipeline.diffusion.truncation import Kept, pad_kept, truncate
from pipeline.tensors import upload

# False: keep dense [.., V] rows even under top-k (the reference the exactness tests and
# benchmarks/bench_sampler.py compare the sparse path with). Same tokens either way.
SPARSE_TOP_K = True


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] including [CLS] / [SEP] / [PAD]
    attention_mask: Tensor  # [B, L]
    model_calls: int  # forward invocations
    row_calls: Tensor  # [B] forwards each sequence took part in
    seconds: float
    model_seconds: float = 0.0
    trace: list[int] = field(default_factory=list)  # masked positions left after each step


def timed_forward(denoiser: Denoiser, x: Tensor, attn: Tensor, s_frac: Tensor, sel: Tensor) -> tuple[Tensor, float]:
    """The denoiser's logits [N, V] and its wall seconds. On an accelerator it waits for the
    result: otherwise the seconds count the launch only, and the copy down after truncation
    absorbs the forward (a sampler would look like all overhead)."""
    tick = time.perf_counter()
    logits = denoiser(x, attn, s_frac, sel)
    if logits.is_cuda:
        torch.cuda.synchronize(logits.device)
    return logits, time.perf_counter() - tick


class Predictions:
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
            logits, seconds = timed_forward(
                self.denoiser, x[rows].to(self.device), attn[rows].to(self.device), s_frac, sel
            )  # [N, V]
            self.model_seconds += seconds
            self.calls += 1
            self.row_calls[rows] += 1
            # Truncation runs where the logits are; one [N, K] copy to the CPU bookkeeping per call.
            kept = truncate(logits, self.forbidden, *self.truncation, sparse=SPARSE_TOP_K)  # [N, K]
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

    def output(self, x: Tensor, attn: Tensor, masked: Tensor, start: float, trace: list[int]) -> SampleOutput:
        """The chain's result, with these predictions' call counts and model time; a [MASK] left
        cannot happen on a grid that ends at 0 (every [MASK] is revealed there), guarded anyway."""
        if masked.any():
            raise RuntimeError("sampling ended with [MASK] tokens left")
        seconds = time.perf_counter() - start
        return SampleOutput(x, attn, self.calls, self.counts(x.shape[0]), seconds, self.model_seconds, trace)


def runs_resident(device: torch.device | str, resident: bool | None) -> bool:
    """Whether a sampler runs device-resident: by default exactly on accelerators."""
    return torch.device(device).type != "cpu" if resident is None else resident


def run_resident(
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


def check_grid(schedule: Schedule, grid: Sequence[int]) -> None:
    T = schedule.num_timesteps
    if grid[0] != T or grid[-1] != 0:
        raise ValueError(f"time grid must run from T={T} down to 0, got {grid[0]}..{grid[-1]}")
