"""Unconditional generation as text: lengths, sampler choice, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.samplers import (
    SampleOutput,
    ancestral_sample,
    decode,
    gibbs_sample,
)
from pipeline.diffusion.schedules import Schedule, grid_for_steps


@dataclass
class Generation:
    texts: list[str]
    lengths: list[int]
    model_calls: int  # forward invocations (a call may cover several rows)
    row_calls: int  # sum over samples of the forwards each took part in
    seconds: float
    model_seconds: float


def generate(
    model,
    tokenizer,
    schedule: Schedule,
    *,
    lengths: Sequence[int],
    steps: int = 128,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    sampler: str = "ancestral",
    cache: bool | None = None,
    gibbs_sweeps: int = 2,
    device: torch.device | str = "cpu",
    denoiser: Callable | None = None,
    progress: Callable[[int], None] | None = None,
) -> Generation:
    """Sample len(lengths) sentences. `cache=None` caches exactly when the model is time-agnostic."""
    special = SpecialIds.from_tokenizer(tokenizer)
    denoise = denoiser or model.denoise
    use_cache = bool(getattr(model, "time_agnostic", False)) if cache is None else cache
    grid = grid_for_steps(schedule.num_timesteps, steps)
    texts: list[str] = []
    calls, row_calls, seconds, model_seconds = 0, 0, 0.0, 0.0
    for start in range(0, len(lengths), batch_size):
        chunk = list(lengths[start : start + batch_size])
        chunk_seed = seed * 1_000_003 + start
        if sampler == "ancestral":
            out: SampleOutput = ancestral_sample(
                denoise,
                schedule,
                chunk,
                special,
                tokenizer.cls_token_id,
                tokenizer.sep_token_id,
                grid=grid,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                seed=chunk_seed,
                cache=use_cache,
                device=device,
            )
        elif sampler == "gibbs":
            out = gibbs_sample(
                denoise,
                chunk,
                special,
                tokenizer.cls_token_id,
                tokenizer.sep_token_id,
                sweeps=gibbs_sweeps,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                seed=chunk_seed,
                device=device,
            )
        else:
            raise ValueError(f"unknown sampler {sampler!r}; choose ancestral or gibbs")
        texts.extend(decode(out.tokens, tokenizer))
        calls += out.model_calls
        row_calls += int(out.row_calls.sum())
        seconds += out.seconds
        model_seconds += out.model_seconds
        if progress is not None:
            progress(len(chunk))
    return Generation(texts, [int(n) for n in lengths], calls, row_calls, seconds, model_seconds)


def fixed_or_sampled_lengths(n: int, length: int, histogram: np.ndarray | None, seed: int) -> list[int]:
    """`length` > 0: every sample that long; else draw from the training length histogram."""
    if length > 0:
        return [length] * n
    if histogram is None:
        raise ValueError("sampling lengths needs the training length histogram")
    from pipeline.data.stats import sample_lengths

    hist = np.asarray(histogram, dtype=np.float64).copy()
    hist[0] = 0  # an empty sentence is not a sample
    return [int(v) for v in sample_lengths(hist, n, seed)]
