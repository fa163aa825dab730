"""How long should a gap be? The model's own bound chooses among candidate lengths.

For a template `left [MASK*?] right` and a candidate gap length n, the sentence has
L = |left| + n + |right| content WordPieces. Score(n) is a bound on -log p(shown words, L):

    -log p_len(L) + bound of the shown words' chain with the n gap positions held at [MASK]

(`sequence_bound` with `hidden` = the shown positions: the chain runs over the shown words only
and the gap stays [MASK] at every step, i.e. the gap is marginalised out, as absorbing diffusion
allows). The chosen length is the argmin; p_len is the training length histogram, so the score is
comparable across lengths. Costs one bound chain per candidate; averaged over `seeds`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.loss import sequence_bound
from pipeline.diffusion.schedules import Schedule, grid_for_steps


def gap_length_scores(
    denoiser: Denoiser,
    schedule: Schedule,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    left: Sequence[int],
    right: Sequence[int],
    candidates: Sequence[int],
    length_log_probs: np.ndarray,
    *,
    num_steps: int = 16,
    seeds: Sequence[int] = (0,),
    device: torch.device | str = "cpu",
) -> dict[int, float]:
    """Score (nats, lower = likelier) of each candidate gap length between `left` and `right`.
    `device`: where the denoiser is; the rows move there, the draws stay on the CPU."""
    if not candidates or min(candidates) < 1:
        raise ValueError(f"candidate gap lengths must be >= 1, got {list(candidates)}")
    if not left and not right:
        raise ValueError("a gap needs shown words around it to choose its length")
    grid = grid_for_steps(schedule.num_timesteps, num_steps)
    rows = [[cls_id, *left, *([special.mask] * n), *right, sep_id] for n in candidates]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), special.pad, dtype=torch.long)  # [C, W]
    hidden = torch.zeros_like(ids, dtype=torch.bool)  # the shown words: the chain runs over them
    for r, (row, n) in enumerate(zip(rows, candidates)):
        ids[r, : len(row)] = torch.tensor(row)
        hidden[r, 1 : 1 + len(left)] = True
        hidden[r, 1 + len(left) + n : 1 + len(left) + n + len(right)] = True
    attention = ids != special.pad
    total = torch.zeros(len(rows), dtype=torch.float64)
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            total += sequence_bound(
                denoiser, ids.to(device), attention.to(device), schedule, special, grid, generator, hidden=hidden
            )
    bound = total / len(seeds)
    scores = {}
    for r, n in enumerate(candidates):
        length = len(left) + n + len(right)
        prior = float(length_log_probs[min(length, len(length_log_probs) - 1)])
        scores[int(n)] = float(bound[r]) - prior
    return scores


def choose_gap_length(scores: dict[int, float]) -> int:
    """The candidate with the lowest score (the shortest among ties)."""
    return min(scores, key=lambda n: (scores[n], n))


def resolve_open_gap(
    request,
    model,
    tokenizer,
    schedule: Schedule,
    length_log_probs: np.ndarray,
    *,
    max_gap: int = 12,
    num_steps: int = 16,
    seeds: Sequence[int] = (0, 1),
):
    """`request` (a `pipeline.generation.templates.Request`) with its `[MASK*?]` gap set to the chosen
    length among 1..max_gap that still fits the model's window; unchanged without an open gap."""
    if request.auto_gap is None:
        return request
    left, right = list(request.template[: request.auto_gap]), list(request.template[request.auto_gap :])
    room = int(model.max_positions) - 2 - len(left) - len(right)
    candidates = list(range(1, min(max_gap, room) + 1))
    if not candidates:
        raise ValueError(f"no room for a gap in {request.text[:60]!r}: the shown words fill the model's window")
    scores = gap_length_scores(
        model.denoise,
        schedule,
        SpecialIds.from_tokenizer(tokenizer),
        tokenizer.cls_token_id,
        tokenizer.sep_token_id,
        left,
        right,
        candidates,
        length_log_probs,
        num_steps=num_steps,
        seeds=seeds,
        device=model.device,
    )
    return request.with_gap(choose_gap_length(scores))


def length_prior(histogram_path: str | None, max_length: int) -> np.ndarray:
    """log p_len over 0..max_length: from the training length histogram (`lengths.npy`) when
    given, else flat (then the bound alone decides)."""
    from pipeline.data.stats import length_log_probs

    if histogram_path is not None:
        return length_log_probs(np.load(histogram_path), max_length=max_length)
    return np.full(max_length + 1, -np.log(max_length + 1))
