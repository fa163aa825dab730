"""Perplexity bound on held-out text (PAPER §7): per WordPiece token and per word, with seeds.

The bound is exp(total NLL bound / count). Denominators: content WordPieces (no [CLS], [SEP],
[PAD]) for the per-token number, whitespace words of the scored text for the per-word number (a
line over max_seq_len is cut at a word boundary and counts only the words it keeps, so no word is
counted whose WordPieces were not scored; `num_truncated` says how many lines were cut).
Adding -log p(length) from the training length histogram makes it a full (unconditional) bound.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import write_file_atomic
from pipeline.data.batching import pack_sequences, pad_batch, sorted_batches
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.loss import sequence_bound
from pipeline.diffusion.schedules import Schedule, grid_for_steps


class PackedRows:
    """The test split packed like packed training: every [CLS] ... [SEP] sentence concatenated and
    cut into rows of `seq_len` (the tail that fills no row is dropped). Rows start and end
    mid-sentence, so a packed bound is not comparable with a padded one (it conditions across
    sentence boundaries). Quacks like `TokenizedSplit` for `bound_per_sequence` and
    `perplexity_report`: per-word denominators share each sentence's words among its WordPieces."""

    def __init__(self, split: TokenizedSplit, seq_len: int) -> None:
        self.rows = pack_sequences(split, seq_len)  # int64 [N, seq_len]
        lengths = np.diff(split.offsets)  # [S] WordPieces per sentence incl. [CLS]/[SEP]
        content = np.maximum(lengths - 2, 1)
        per_token = np.repeat(np.asarray(split.word_counts, dtype=np.float64) / content, lengths)  # [total]
        starts, ends = split.offsets[:-1], split.offsets[1:] - 1
        per_token[starts] = 0.0  # [CLS] and [SEP] are never masked: no words, no tokens
        per_token[ends[ends >= starts]] = 0.0
        is_content = np.ones(len(split.ids), dtype=bool)
        is_content[starts] = False
        is_content[ends] = False
        kept = self.rows.size
        self.num_truncated = split.num_truncated
        self.num_content_tokens = int(is_content[:kept].sum())
        self.word_counts = per_token[:kept].reshape(self.rows.shape).sum(axis=1)  # [N] fractional words

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> np.ndarray:
        row: np.ndarray = self.rows[index]
        return row


# What the bound scores: sentences (padded), or the packed rows of a model trained packed.
ScoredText = TokenizedSplit | PackedRows


def bound_per_sequence(
    denoiser: Denoiser,
    split: ScoredText,
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
    lengths = [len(split[i]) for i in range(len(split))]
    for index in sorted_batches(lengths, batch_size):  # near-equal lengths: half the padding
        ids, attn = pad_batch([split[i] for i in index], special.pad)
        nll = sequence_bound(denoiser, ids.to(device), attn.to(device), schedule, special, grid, generator)
        out[index] = nll.numpy()
        if progress is not None:
            progress(len(index))
    return out


def perplexity_report(
    nll: np.ndarray,
    split: ScoredText,
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
        "num_truncated": int(split.num_truncated),
        "ppl_token": math.exp(total / tokens),
        "ppl_word": math.exp(total / words),
    }
    if length_log_probs is not None:
        if not isinstance(split, TokenizedSplit):
            raise ValueError("a length term needs sentences: packed rows have no sentence lengths")
        lengths = np.minimum(split.lengths - 2, len(length_log_probs) - 1)
        length_nats = float(-length_log_probs[lengths].sum())
        report["length_nats"] = length_nats
        report["ppl_token_with_length"] = math.exp((total + length_nats) / tokens)
        report["ppl_word_with_length"] = math.exp((total + length_nats) / words)
    return report


def perplexity_bound(
    denoiser: Denoiser,
    split: ScoredText,
    schedule: Schedule,
    special: SpecialIds,
    *,
    num_steps: int,
    seeds: tuple[int, ...] = (0,),
    batch_size: int = 32,
    length_log_probs: np.ndarray | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """The bound for each seed, plus mean and std over seeds of each perplexity.

    `cache_dir`: each seed's per-sequence NLLs are saved there as they finish and read back
    instead of recomputed, so an evaluation cut off after some seeds (a long ablation row) goes on
    from the next one. The caller names a folder per (model, data, settings): nothing here checks
    what the saved numbers were computed from, beyond their count."""
    runs = []
    for seed in seeds:
        saved = cache_dir / f"nll_seed{seed}.npy" if cache_dir is not None else None
        nll = np.load(saved) if saved is not None and saved.is_file() else None
        if nll is not None and nll.shape == (len(split),):
            if progress is not None:
                progress(len(split))
        else:
            nll = bound_per_sequence(
                denoiser,
                split,
                schedule,
                special,
                num_steps=num_steps,
                seed=seed,
                batch_size=batch_size,
                device=device,
                progress=progress,
            )
            if saved is not None:
                buffer = io.BytesIO()
                np.save(buffer, nll)
                write_file_atomic(saved, buffer.getvalue())  # the whole array or no file
        runs.append({"seed": seed, **perplexity_report(nll, split, length_log_probs)})
    summary: dict[str, Any] = {
        "schedule": schedule.describe(),
        "num_steps": num_steps,
        "time_grid": f"{num_steps} equal steps from T={schedule.num_timesteps} to 0",
        "seeds": list(seeds),
        "leaky": schedule.leaky,
        "runs": runs,
    }
    for key in [k for k in runs[0] if k.startswith("ppl_")]:
        values = np.array([r[key] for r in runs])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary
