"""Semi-autoregressive (block) decoding as a `Sampler`: canvases longer than the model's window.

Each row's content is written `block` positions at a time, left to right, starting at its first
[MASK]: a block is sampled by the inner sampler from a canvas of the last `window - new` content
positions already written (fixed or generated) followed by the block's slice of the row (its fixed
tokens kept, its [MASK] positions free), so the model never sees more than `window` content
positions. Each block is the inner sampler's draw given its context (the model's chain, for the
ancestral sampler), but the whole row is not a sample of any one chain: `exact` is False and no
bound applies to it (SSD-LM / BD3-LM style; the original DiffusionBERT cannot write past its
64-WordPiece training window at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import Tensor

from pipeline.diffusion.canvas import starting_canvas, template_canvas
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.host_chain import SampleOutput
from pipeline.diffusion.sampler import Sampler

# Block k of a call with seed s draws with seed s * BLOCK_SEED_STRIDE + k.
BLOCK_SEED_STRIDE = 7919


def blocks(inner: Sampler, *, block: int, window: int) -> Sampler:
    """`inner` run block by block: `block` new positions per block, in a model window of `window`
    content positions. Both are checked now, before any model call."""
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an integer >= 1 (the model's content positions), got {window!r}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= window:
        raise ValueError(f"block must lie in 1..{window} (the model's content window), got {block!r}")
    options = {**inner.options, "block": block, "window": window}
    return Sampler(f"{inner.name}+blocks", False, options, partial(_draw_blocks, inner, block, window))


def _draw_blocks(
    inner: Sampler,
    block: int,
    window: int,
    denoiser: Denoiser,
    lengths: Sequence[int] | Tensor | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    *,
    canvas: tuple[Tensor, Tensor] | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> SampleOutput:
    start = time.perf_counter()
    x, attn = starting_canvas(lengths, canvas, special, cls_id, sep_id)  # [B, L]
    content = [row[1 : int(n) - 1] for row, n in zip(x.tolist(), attn.sum(1).tolist())]  # ids, [MASK] = free
    cursor = [_next_free(row, 0, special.mask) for row in content]
    calls, model_seconds = 0, 0.0
    row_calls = torch.zeros(x.shape[0], dtype=torch.long)
    number = 0
    while any(c is not None for c in cursor):
        rows = [b for b, c in enumerate(cursor) if c is not None]
        templates, spans = [], []
        for b in rows:
            at = cursor[b]
            assert at is not None
            new = min(block, len(content[b]) - at)
            shown = min(at, window - new)
            piece = content[b][at - shown : at + new]
            templates.append([None if tok == special.mask else tok for tok in piece])
            spans.append((at - shown, shown, new))
        out = inner(
            denoiser, special, cls_id, sep_id, canvas=template_canvas(templates, special, cls_id, sep_id),
            seed=seed * BLOCK_SEED_STRIDE + number, device=device,
        )  # fmt: skip
        for i, (b, (first, shown, new)) in enumerate(zip(rows, spans)):
            written = out.tokens[i, 1 + shown : 1 + shown + new].tolist()
            content[b][first + shown : first + shown + new] = written
            cursor[b] = _next_free(content[b], first + shown + new, special.mask)
        calls += out.model_calls
        model_seconds += out.model_seconds
        row_calls[rows] += out.row_calls
        number += 1
        if progress is not None:
            progress(number)
    for b, row in enumerate(content):
        x[b, 1 : 1 + len(row)] = torch.tensor(row, dtype=torch.long)
    return SampleOutput(x, attn, calls, row_calls, time.perf_counter() - start, model_seconds)


def _next_free(row: list[int], start: int, mask_id: int) -> int | None:
    """The first [MASK] position of `row` at or after `start`, or None when none is left."""
    return next((i for i in range(start, len(row)) if row[i] == mask_id), None)
