"""The sampler comparison (its own DVC stage, after evaluate): the steps table (PAPER Table 3 at
this scale: the bound of each k-step chain, and samples drawn with k steps), the
quality-diversity curve over top-k, and every sampler at every number of steps.

Only the ancestral sampler is the model's chain: the bound column speaks for it alone; the other
samplers' rows (ReMDM, confidence-ordered, Gibbs) report quality, diversity and cost only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import Layout
from pipeline.config import Params
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.eval.bound import perplexity_bound
from pipeline.eval.evaluate import corpus_label, load_for_evaluation, scored_text, test_lines_of
from pipeline.eval.metrics import generation_metrics
from pipeline.generation.sampling import CHAIN_SAMPLERS, fixed_or_sampled_lengths, generate, sampler_settings
from pipeline.vocab import ProgressCallback


@dataclass
class Comparison:
    """What every part of the comparison reads: the model, the test data and params, and the
    sample sets drawn so far (`memo`): rows that ask for the same samples (sampler, steps,
    top-k, n) share one draw, so the steps table's rows are the ancestral sampler's rows and its
    `sample_steps` row is the curve's point at `evaluate.top_k`."""

    model: Any
    tokenizer: Any
    schedule: Any
    special: SpecialIds
    denoise: Any
    test: TokenizedSplit
    histogram: np.ndarray
    references: list[str]
    params: Params
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where the model is
    memo: dict = field(default_factory=dict)

    def samples_quality(self, *, n: int, steps: int, top_k: int, sampler: str | None = None) -> dict:
        """BLEU / Self-BLEU of two disjoint sets of n samples from `sampler` (default: the
        evaluate stage's), and their cost. One sample seed for every row (`sample_seed + 1`)."""
        ev = self.params.evaluate
        sampler = sampler or ev.sampler
        key = (sampler, steps, top_k, n)
        if key not in self.memo:
            self.memo[key] = self._draw(n=n, steps=steps, top_k=top_k, sampler=sampler)
        return dict(self.memo[key])

    def _draw(self, *, n: int, steps: int, top_k: int, sampler: str) -> dict:
        ev = self.params.evaluate
        seed = ev.sample_seed + 1
        lengths = fixed_or_sampled_lengths(2 * n, ev.sample_length, self.histogram, seed)
        gen = generate(
            self.model,
            self.tokenizer,
            self.schedule,
            lengths=lengths,
            steps=steps,
            top_k=top_k,
            seed=seed,
            denoiser=self.denoise,
            sampler=sampler,
            **sampler_settings(ev),
            device=self.device,
        )
        quality = generation_metrics(gen.texts[:n], self.references, self_bleu_samples=gen.texts[n:])
        return {
            **{k: quality[k] for k in _KEPT},
            "model_calls_per_sample": gen.row_calls / len(lengths),
            "seconds_per_sample": gen.seconds / len(lengths),
            "num_samples": n,
        }


_KEPT = (
    "bleu",
    "bleu_measured",
    "bleu_p4",
    "self_bleu",
    "self_bleu_measured",
    "self_bleu_p4",
    "unigram_entropy_bits",
    "num_references",
)


def steps_quality_table(ctx: Comparison, progress=None) -> list[dict]:
    """PAPER Table 3 at this scale: for each number of reverse steps, the bound of that step
    chain (first `table_sequences` test sentences, the first of `evaluate.seeds`: the 128-step
    chain is most of this stage's cost, and its spread over seeds is the evaluate stage's to
    report) and the quality, calls and time of samples drawn with the same steps."""
    ev = ctx.params.evaluate
    subset, _ = scored_text(ctx.params, ctx.test.head(ev.table_sequences))
    rows = []
    for steps in ev.table_steps:
        with torch.no_grad():
            bound = perplexity_bound(
                ctx.denoise,
                subset,
                ctx.schedule,
                ctx.special,
                num_steps=steps,
                seeds=tuple(ev.seeds[:1]),
                batch_size=ev.batch_size,
                device=ctx.device,
            )
        row = {
            "steps": min(steps, ctx.schedule.num_timesteps),
            "ppl_token": bound["ppl_token_mean"],
            "ppl_token_std": bound["ppl_token_std"],
            "ppl_word": bound["ppl_word_mean"],
            "ppl_word_std": bound["ppl_word_std"],
            "seeds": list(ev.seeds[:1]),
            "bound_sequences": len(subset),
        }
        row.update(ctx.samples_quality(n=ev.table_samples, steps=steps, top_k=ev.top_k))
        rows.append(row)
        if progress is not None:
            progress(1)
    return rows


def quality_diversity_curve(ctx: Comparison, progress=None) -> list[dict]:
    """BLEU (quality) against Self-BLEU (diversity) as top-k varies, at `sample_steps` steps."""
    ev = ctx.params.evaluate
    points = []
    for top_k in ev.qd_top_k:
        points.append({"top_k": top_k, **ctx.samples_quality(n=ev.qd_samples, steps=ev.sample_steps, top_k=top_k)})
        if progress is not None:
            progress(1)
    return points


def sampler_rows(ctx: Comparison, progress=None) -> list[dict]:
    """Every sampler of `evaluate.compare_samplers`: the ancestral sampler at every
    `evaluate.table_steps` (the steps table's samples, shared through the memo), the others at
    every `evaluate.compare_steps` (Gibbs, whose cost is sweeps not steps, once): quality,
    diversity, model calls and seconds per sample."""
    ev = ctx.params.evaluate
    rows = []
    for sampler in ev.compare_samplers:
        for steps in _steps_of(sampler, ev):
            row: dict[str, Any] = {
                "sampler": sampler,
                "steps": None if sampler == "gibbs" else min(steps, ctx.schedule.num_timesteps),
                "model_chain": sampler in CHAIN_SAMPLERS,
                **ctx.samples_quality(n=ev.table_samples, steps=steps, top_k=ev.top_k, sampler=sampler),
            }
            rows.append(row)
            if progress is not None:
                progress(1)
    return rows


def _steps_of(sampler: str, ev) -> list[int]:
    """The steps a sampler's rows use: Gibbs once (sweeps), the model's chain at every
    `table_steps` (free: the steps table drew them), the others at every `compare_steps`."""
    if sampler == "gibbs":
        return [ev.sample_steps]
    return list(ev.table_steps) if sampler in CHAIN_SAMPLERS else list(ev.compare_steps)


def comparison_size(params: Params) -> int:
    """Units of work for the progress bar: table rows, curve points and sampler rows."""
    ev = params.evaluate
    per_sampler = [len(_steps_of(name, ev)) for name in ev.compare_samplers]
    return len(ev.table_steps) + len(ev.qd_top_k) + sum(per_sampler)


def compare_samplers(
    params: Params,
    layout: Layout,
    model_dir: str | Path,
    progress: ProgressCallback | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """The steps table, the quality-diversity curve and the sampler rows of the model in `model_dir`,
    run on `device` (default: `evaluate.device`)."""
    ev = params.evaluate
    loaded = load_for_evaluation(model_dir, ev, device)
    test = TokenizedSplit.load(layout.prepared / "test")
    test_lines = test_lines_of(layout)
    ctx = Comparison(
        model=loaded.model,
        tokenizer=loaded.tokenizer,
        schedule=loaded.schedule,
        special=loaded.special,
        denoise=loaded.denoise,
        test=test,
        histogram=np.load(layout.token_stats / "lengths.npy"),
        references=test_lines[: ev.num_references] if ev.num_references > 0 else test_lines,
        params=params,
        device=loaded.device,
    )
    total = comparison_size(params)
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress("sampler comparison", n, total)

    start = time.perf_counter()
    steps_table = steps_quality_table(ctx, progress=tick)
    qd_curve = quality_diversity_curve(ctx, progress=tick)
    samplers = sampler_rows(ctx, progress=tick)
    return {
        "label": corpus_label(params),
        "leaky": loaded.schedule.leaky,
        "time_design": loaded.model.config.time_design,
        "model_dir": str(model_dir),
        "settings": {
            "precision": loaded.precision,
            "device": str(loaded.device),
            "table_steps": list(ev.table_steps),
            "table_samples": ev.table_samples,
            "table_sequences": ev.table_sequences,
            "qd_top_k": list(ev.qd_top_k),
            "qd_samples": ev.qd_samples,
            "samplers": list(ev.compare_samplers),
            "compare_steps": list(ev.compare_steps),
            "top_k": ev.top_k,
            "remdm_eta": ev.remdm_eta,
            "confidence_score": ev.confidence_score,
            "gibbs_sweeps": ev.gibbs_sweeps,
        },
        "steps_table": steps_table,
        "quality_diversity": qd_curve,
        "samplers": samplers,
        "seconds": time.perf_counter() - start,
    }


def comparison_metrics(report: dict) -> dict[str, float]:
    """Flat numbers for metrics.json / MLflow: `samplers.<name>.<steps>.<metric>`."""
    out: dict[str, float] = {}
    for row in report.get("samplers") or []:
        key = f"samplers.{row['sampler']}.{row['steps'] if row['steps'] is not None else 'sweeps'}"
        for metric in ("bleu", "self_bleu", "unigram_entropy_bits", "model_calls_per_sample", "seconds_per_sample"):
            if isinstance(row.get(metric), (int, float)):
                out[f"{key}.{metric}"] = float(row[metric])
    for row in report.get("steps_table") or []:
        out[f"steps.{row['steps']}.ppl_token"] = float(row["ppl_token"])
    return out
