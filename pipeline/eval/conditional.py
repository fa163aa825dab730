"""Conditional evaluation on test sentences: prefix completion and infilling.

For each sentence of n content WordPieces, a task hides some of them and shows the rest:
- `prefix`: the first half is shown, the rest hidden (n >= 2);
- `infill`: the middle third is hidden, both ends shown (n >= 3).
Span edges move right past WordPiece continuations (`##xx`), so no word is cut in two.

Two numbers per task:
- the conditional bound on -log p(hidden | shown) (the chain runs over the hidden positions
  only; `sequence_bound(hidden=...)`), per hidden WordPiece and per hidden word. Words are
  fractional: each hidden WordPiece carries its sentence's words / WordPieces (the packed bound's
  convention), since the prepared split keeps word counts, not word boundaries;
- the filled span against the truth: WordPiece accuracy, and corpus BLEU-4 of the filled spans
  each against its own true span (pooled counts), from the evaluate stage's sampler settings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.batching import pad_batch, sorted_batches
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.loss import sequence_bound
from pipeline.diffusion.schedules import Schedule, grid_for_steps
from pipeline.eval.metrics import normalize_words, paired_corpus_bleu

TASKS = ("prefix", "infill")


@dataclass(frozen=True)
class HiddenSpan:
    """Content indices [start, end) (0 = the first WordPiece after [CLS]) hidden by a task."""

    start: int
    end: int


def hidden_span(content: Sequence[int], task: str, continuation: np.ndarray) -> HiddenSpan | None:
    """The span `task` hides in a sentence's content ids, or None when the sentence is too short
    to show and hide something. `continuation[id]` is True for `##` WordPieces."""
    n = len(content)
    if task == "prefix":
        start, end = (n + 1) // 2, n
    elif task == "infill":
        start, end = n // 3, n - n // 3
    else:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")

    def word_start(i: int) -> int:  # the first index >= i that begins a word
        while i < n and continuation[content[i]]:
            i += 1
        return i

    start, end = word_start(start), word_start(end)
    if start <= 0 or start >= end or (task == "infill" and end >= n):
        return None
    return HiddenSpan(start, end)


@dataclass
class TaskSet:
    """The sentences a task applies to, with their hidden spans."""

    task: str
    index: list[int]  # rows of the test split
    spans: list[HiddenSpan]


def task_set(split: TokenizedSplit, task: str, continuation: np.ndarray) -> TaskSet:
    index, spans = [], []
    for i in range(len(split)):
        span = hidden_span(split[i][1:-1].tolist(), task, continuation)
        if span is not None:
            index.append(i)
            spans.append(span)
    return TaskSet(task, index, spans)


def conditional_bound(
    denoiser: Denoiser,
    split: TokenizedSplit,
    tasks: TaskSet,
    schedule: Schedule,
    special: SpecialIds,
    *,
    num_steps: int,
    seeds: Sequence[int] = (0,),
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Conditional bound per hidden WordPiece and per hidden word, mean and std over seeds.
    `device`: where the denoiser is; each batch moves there, the draws stay on the CPU."""
    if not tasks.index:
        raise ValueError(f"no test sentence is long enough for the {tasks.task} task")
    grid = grid_for_steps(schedule.num_timesteps, num_steps)
    hidden_tokens = sum(s.end - s.start for s in tasks.spans)
    words = np.asarray(split.word_counts, dtype=np.float64)[tasks.index]
    content = np.array([len(split[i]) - 2 for i in tasks.index], dtype=np.float64)
    hidden_words = float((words / content * [s.end - s.start for s in tasks.spans]).sum())
    runs = []
    for seed in seeds:
        generator = torch.Generator().manual_seed(seed)
        total = 0.0
        for rows in sorted_batches(content, batch_size):  # near-equal lengths: half the padding
            ids, attn = pad_batch([split[tasks.index[r]] for r in rows], special.pad)
            hidden = torch.zeros_like(ids, dtype=torch.bool)
            for b, r in enumerate(rows):
                hidden[b, 1 + tasks.spans[r].start : 1 + tasks.spans[r].end] = True
            nll = sequence_bound(
                denoiser, ids.to(device), attn.to(device), schedule, special, grid, generator, hidden=hidden
            )
            total += float(nll.sum())
            if progress is not None:
                progress(len(rows))
        runs.append(
            {
                "seed": seed,
                "nll_bound_nats": total,
                "ppl_token": math.exp(total / hidden_tokens),
                "ppl_word": math.exp(total / hidden_words),
            }
        )
    summary: dict[str, Any] = {
        "task": tasks.task,
        "num_sequences": len(tasks.index),
        "num_hidden_tokens": hidden_tokens,
        "num_hidden_words": round(hidden_words, 1),
        "num_steps": num_steps,
        "runs": runs,
    }
    for key in ("ppl_token", "ppl_word"):
        values = np.array([r[key] for r in runs])
        summary[f"{key}_mean"] = float(values.mean())
        summary[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return summary


def span_fill_quality(
    truth: Sequence[Sequence[int]], filled: Sequence[Sequence[int]], decode: Callable[[list[int]], str]
) -> dict[str, float]:
    """WordPiece accuracy, and corpus BLEU-4 of the filled spans each against its own true span."""
    if len(truth) != len(filled) or not truth:
        raise ValueError("need one filled span per true span, and at least one")
    right = sum(int(a == b) for t, f in zip(truth, filled) for a, b in zip(t, f))
    total = sum(len(t) for t in truth)
    hyps = [normalize_words(decode(list(f))) for f in filled]
    refs = [normalize_words(decode(list(t))) for t in truth]
    return {"token_accuracy": right / total, "span_bleu": paired_corpus_bleu(hyps, refs), "num_spans": len(truth)}


def fill_spans(
    model,
    tokenizer,
    schedule: Schedule,
    split: TokenizedSplit,
    tasks: TaskSet,
    **sampling: Any,
) -> dict[str, Any]:
    """Hide each task's span, let the sampler fill it, and score the fills against the truth.
    `sampling` goes to `pipeline.generation.sampling.generate` (steps, top_k, seed, sampler, ...)."""
    from pipeline.generation.sampling import generate

    truth, templates = [], []
    for i, span in zip(tasks.index, tasks.spans):
        content = split[i][1:-1].tolist()
        truth.append(content[span.start : span.end])
        templates.append([*content[: span.start], *([None] * (span.end - span.start)), *content[span.end :]])
    out = generate(model, tokenizer, schedule, templates=templates, **sampling)
    filled = [ids[span.start : span.end] for ids, span in zip(out.content_ids, tasks.spans)]
    quality = span_fill_quality(truth, filled, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    examples = [
        {"shown": tokenizer.decode([t for t in tpl if t is not None]), "truth": tokenizer.decode(tr), "filled": f}
        for tpl, tr, f in zip(templates[:5], truth[:5], [s[0] for s in out.spans[:5]])
    ]
    return {**quality, "seconds_per_sentence": out.seconds / len(templates), "examples": examples}
