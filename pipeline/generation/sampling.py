"""Generation as text: unconditional (lengths) or conditional (templates), sampler choice, decoding."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.data.batching import sorted_batches
from pipeline.diffusion.block_sampler import blocks
from pipeline.diffusion.canvas import template_canvas
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.sampler import sampler as make_sampler
from pipeline.diffusion.samplers import decode
from pipeline.diffusion.schedules import Schedule
from pipeline.vocab import SAMPLERS as SAMPLERS  # one definition, named here for the generation front

CHAIN_SAMPLERS = ("ancestral",)  # the model's own reverse chain: the only ones a bound speaks for


@dataclass
class Generation:
    texts: list[str]
    lengths: list[int]
    model_calls: int  # forward invocations (a call may cover several rows)
    row_calls: int  # sum over samples of the forwards each took part in
    seconds: float
    model_seconds: float
    # Per request, the text of each generated span (maximal run of [MASK] in its template), in
    # order; unconditional samples have one span, the whole text.
    spans: list[list[str]] = field(default_factory=list)
    content_ids: list[list[int]] = field(default_factory=list)  # per request, its content WordPieces


def generated_spans(template: Sequence[int | None]) -> list[tuple[int, int]]:
    """[start, end) content indices of each maximal run of None (generated positions)."""
    spans, start = [], None
    for i, tok in enumerate([*template, 0]):
        if tok is None and start is None:
            start = i
        elif tok is not None and start is not None:
            spans.append((start, i))
            start = None
    return spans


def generate(
    model,
    tokenizer,
    schedule: Schedule,
    *,
    lengths: Sequence[int] | None = None,
    templates: Sequence[Sequence[int | None]] | None = None,
    steps: int = 128,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    sampler: str = "ancestral",
    cache: bool | None = None,
    gibbs_sweeps: int = 2,
    confidence_score: str = "prob",
    remdm_eta: float = 0.04,
    device: torch.device | str = "cpu",
    denoiser: Callable | None = None,
    progress: Callable[[int], None] | None = None,
    block: int | None = None,
) -> Generation:
    """Sample one sentence per entry of `lengths` (unconditional), or complete each of `templates`
    (content token ids, None where generated: prompts, suffixes, infilling; see
    `pipeline.generation.templates`). Fixed tokens are never changed, by every sampler.
    `cache=None` caches exactly when the model is time-agnostic. `block`: write `block` positions
    at a time, each block seeing at most the model's window (`pipeline.diffusion.block_sampler`),
    so requests may be longer than the window."""
    if (lengths is None) == (templates is None):
        raise ValueError("give either lengths (unconditional) or templates (conditional), not both")
    special = SpecialIds.from_tokenizer(tokenizer)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    denoise = denoiser or model.denoise
    use_cache = bool(getattr(model, "time_agnostic", False)) if cache is None else cache
    # every option checked before any model call; one sampler for every batch
    draw = make_sampler(
        sampler, schedule, steps=steps, cache=use_cache, top_k=top_k, top_p=top_p, temperature=temperature,
        remdm_eta=remdm_eta, confidence_score=confidence_score, gibbs_sweeps=gibbs_sweeps,
    )  # fmt: skip
    if block is not None:
        draw = blocks(draw, block=block, window=int(model.max_positions) - 2)
    requests: list[Sequence[int | None]] = (
        list(templates) if templates is not None else [[None] * int(n) for n in lengths or []]
    )
    texts: list[str] = [""] * len(requests)
    spans: list[list[str]] = [[] for _ in requests]
    content_ids: list[list[int]] = [[] for _ in requests]
    calls, row_calls, seconds, model_seconds = 0, 0, 0.0, 0.0
    # Batches of near-equal length (half the padded positions); results go back in request order.
    for number, order in enumerate(sorted_batches([len(r) for r in requests], batch_size)):
        chunk = [requests[i] for i in order]
        chunk_seed = seed * 1_000_003 + number * batch_size
        chunk_lengths = [len(t) for t in chunk] if templates is None else None
        canvas = None if templates is None else template_canvas(chunk, special, cls_id, sep_id)
        out = draw(
            denoise, special, cls_id, sep_id, lengths=chunk_lengths, canvas=canvas, seed=chunk_seed, device=device
        )
        for row, (index, text, template) in enumerate(zip(order, decode(out.tokens, tokenizer), chunk)):
            content = out.tokens[row, 1 : len(template) + 1]
            texts[index], content_ids[index] = text, content.tolist()
            spans[index] = [decode(content[None, a:b], tokenizer)[0] for a, b in generated_spans(template)]
        calls += out.model_calls
        row_calls += int(out.row_calls.sum())
        seconds += out.seconds
        model_seconds += out.model_seconds
        if progress is not None:
            progress(len(chunk))
    return Generation(texts, [len(t) for t in requests], calls, row_calls, seconds, model_seconds, spans, content_ids)


def sampler_settings(ev) -> dict:
    """The `evaluate.*` sampler settings every evaluation draw shares (steps, top-k, seed and
    sampler vary by caller): keyword arguments of `generate`."""
    return {
        "top_p": ev.top_p,
        "temperature": ev.temperature,
        "batch_size": ev.batch_size,
        "gibbs_sweeps": ev.gibbs_sweeps,
        "confidence_score": ev.confidence_score,
        "remdm_eta": ev.remdm_eta,
    }


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
