"""How long should a gap be? Three ways to choose the length of a `[MASK*?]` gap (`GAP_LENGTH_METHODS`).

- `context` (the default): the most likely gap length given how many WordPieces are shown and
  where the gap sits, under the training length histogram p_len(L) and the evaluation's way of
  hiding a span: a gap inside the text is taken to be its middle third (the infill task), a gap at
  either end the missing half (the prefix task). p(n | s shown) sums p_len(L) over the lengths L
  whose hidden span has n WordPieces and leaves s +- 1 shown. No model call. It knows nothing of
  the words, only of the counts: a gap of another shape (one missing word in a long sentence) is
  better given as `[MASK*n]`.
- `bound`: the model's own bound. For a candidate n, L = |left| + n + |right| and
  score(n) = -log p_len(L) + the bound of the shown words' chain with the n gap positions held at
  [MASK] at every step (`sequence_bound` with `hidden` = the shown positions: the gap is
  marginalised out, as absorbing diffusion allows). One bound chain per candidate, averaged over
  `seeds`; a weak model prefers short gaps here.
- `prior`: the length that makes L likeliest under p_len alone.

Which one hits the true length most often is measured by `benchmarks/gap_length.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.loss import sequence_bound
from pipeline.diffusion.schedules import Schedule, grid_for_steps
from pipeline.vocab import GAP_LENGTH_METHODS


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
    prior = prior_gap_scores(len(left), len(right), candidates, length_log_probs)
    return {int(n): float(bound[r]) + prior[int(n)] for r, n in enumerate(candidates)}


def shown_and_hidden(length: int, at_end: bool) -> tuple[int, int]:
    """(WordPieces shown, WordPieces hidden) when the evaluation hides a span of a `length`-WordPiece
    text: its second half (`at_end`, the prefix task) or its middle third (the infill task),
    counted in WordPieces (the evaluation moves the span's ends to word starts)."""
    if at_end:
        shown = (length + 1) // 2
        return shown, length - shown
    third = length // 3
    return 2 * third, length - 2 * third


def context_gap_scores(
    left: int, right: int, candidates: Sequence[int], length_log_probs: np.ndarray, *, width: int = 1
) -> dict[int, float]:
    """-log p(n | shown WordPieces, where the gap sits) of each candidate n (inf where p is 0):
    p_len(L) summed over every L whose hidden span has n WordPieces and leaves `left + right`
    +- `width` shown. No model call."""
    if not candidates or min(candidates) < 1:
        raise ValueError(f"candidate gap lengths must be >= 1, got {list(candidates)}")
    shown, at_end = left + right, left == 0 or right == 0
    weight = np.zeros(max(candidates) + 1, dtype=np.float64)
    for length, log_p in enumerate(length_log_probs):
        seen, hidden = shown_and_hidden(length, at_end)
        if abs(seen - shown) <= width and 1 <= hidden < len(weight):
            weight[hidden] += math.exp(float(log_p))
    total = weight[list(candidates)].sum()
    if total <= 0:  # no length of the histogram matches: the prior alone decides
        return prior_gap_scores(left, right, candidates, length_log_probs)
    return {int(n): -math.log(weight[n] / total) if weight[n] > 0 else math.inf for n in candidates}


def prior_gap_scores(
    left: int, right: int, candidates: Sequence[int], length_log_probs: np.ndarray
) -> dict[int, float]:
    """-log p_len(left + n + right) of each candidate n."""
    last = len(length_log_probs) - 1
    return {int(n): -float(length_log_probs[min(left + n + right, last)]) for n in candidates}


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
    method: str = "context",
    max_gap: int = 12,
    num_steps: int = 16,
    seeds: Sequence[int] = (0, 1),
):
    """`request` (a `pipeline.generation.templates.Request`) with its `[MASK*?]` gap set to the length
    `method` chooses among 1..max_gap that still fits the model's window; unchanged without an
    open gap. `num_steps` and `seeds` are the `bound` method's."""
    if method not in GAP_LENGTH_METHODS:
        raise ValueError(f"unknown gap-length method {method!r}; choose one of {', '.join(GAP_LENGTH_METHODS)}")
    if request.auto_gap is None:
        return request
    left, right = list(request.template[: request.auto_gap]), list(request.template[request.auto_gap :])
    room = int(model.max_positions) - 2 - len(left) - len(right)
    candidates = list(range(1, min(max_gap, room) + 1))
    if not candidates:
        raise ValueError(f"no room for a gap in {request.text[:60]!r}: the shown words fill the model's window")
    if method == "context":
        scores = context_gap_scores(len(left), len(right), candidates, length_log_probs)
    elif method == "prior":
        scores = prior_gap_scores(len(left), len(right), candidates, length_log_probs)
    else:
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
