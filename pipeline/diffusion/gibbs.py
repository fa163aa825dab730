"""BERT-Mouth Gibbs sampling (Wang & Cho 2019), unconditional or from a canvas of fixed tokens."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from pipeline.diffusion import host_chain
from pipeline.diffusion.canvas import starting_canvas
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.host_chain import SampleOutput, runs_resident
from pipeline.diffusion.truncation import draw_token, truncate
from pipeline.tensors import id_tensor, upload


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
                kept = truncate(
                    logits, special.forbidden_outputs, top_k, top_p, temperature, sparse=host_chain.SPARSE_TOP_K
                )
                u = torch.rand(batch, generator=gen, dtype=torch.float64)
                x[rows, pos] = draw_token(kept, u)
            visited += 1
            if progress is not None:
                progress(visited)
    calls = timer.calls
    tokens, attn = x.cpu(), attn.cpu()
    return SampleOutput(tokens, attn, calls, torch.full((batch,), calls), time.perf_counter() - start, timer.seconds())
