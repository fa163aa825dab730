"""Perplexity bound on held-out text (PAPER §7): per WordPiece token and per word, with seeds.

The bound is exp(total NLL bound / count). Denominators: content WordPieces (no [CLS], [SEP],
[PAD]) for the per-token number, whitespace words of the raw line for the per-word number.
Adding -log p(length) from the training length histogram makes it a full (unconditional) bound.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from pipeline.data.batching import pad_batch
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import Denoiser, sequence_bound
from pipeline.diffusion.schedules import Schedule, grid_for_steps


def bound_per_sequence(
    denoiser: Denoiser,
    split: TokenizedSplit,
    schedule: Schedule,
    special: SpecialIds,
    *,
    num_steps: int,
    seed: int = 0,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """NLL bound (nats) of every sequence of `split`, in order, on a `num_steps` chain. [N]"""
    grid = grid_for_steps(schedule.num_timesteps, num_steps)
    generator = torch.Generator().manual_seed(seed)
    out = np.zeros(len(split), dtype=np.float64)
    for start in range(0, len(split), batch_size):
        index = range(start, min(start + batch_size, len(split)))
        ids, attn = pad_batch([split[i] for i in index], special.pad)
        nll = sequence_bound(denoiser, ids.to(device), attn.to(device), schedule, special, grid, generator)
        out[start : start + len(index)] = nll.numpy()
        if progress is not None:
            progress(len(index))
    return out


def perplexity_report(
    nll: np.ndarray,
    split: TokenizedSplit,
    length_log_probs: np.ndarray | None = None,
) -> dict[str, float]:
    """Per-token and per-word perplexities from per-sequence NLL bounds (with and without the
    length term when a length distribution is given)."""
    tokens = int(split.num_content_tokens)
    words = int(np.asarray(split.word_counts).sum())
    total = float(nll.sum())
    report = {
        "nll_bound_nats": total,
        "num_sequences": len(split),
        "num_tokens": tokens,
        "num_words": words,
        "ppl_token": math.exp(total / tokens),
        "ppl_word": math.exp(total / words),
    }
    if length_log_probs is not None:
        lengths = np.minimum(split.lengths - 2, len(length_log_probs) - 1)
        length_nats = float(-length_log_probs[lengths].sum())
        report["length_nats"] = length_nats
        report["ppl_token_with_length"] = math.exp((total + length_nats) / tokens)
        report["ppl_word_with_length"] = math.exp((total + length_nats) / words)
    return report


def perplexity_bound(
    denoiser: Denoiser,
    split: TokenizedSplit,
    schedule: Schedule,
    special: SpecialIds,
    *,
    num_steps: int,
    seeds: tuple[int, ...] = (0,),
    batch_size: int = 32,
    length_log_probs: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """The bound for each seed, plus mean and std over seeds of each perplexity."""
    runs = []
    for seed in seeds:
        nll = bound_per_sequence(denoiser, split, schedule, special, num_steps=num_steps, seed=seed,
                                 batch_size=batch_size, device=device, progress=progress)
        runs.append({"seed": seed, **perplexity_report(nll, split, length_log_probs)})
    summary: dict = {
        "schedule": schedule.describe(),
        "num_steps": num_steps,
        "time_grid": f"{num_steps} equal steps from T={schedule.num_timesteps} to 0",
        "seeds": list(seeds),
        "leaky": bool(getattr(schedule, "leaky", False)),
        "runs": runs,
    }
    for key in [k for k in runs[0] if k.startswith("ppl_")]:
        values = np.array([r[key] for r in runs])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary
