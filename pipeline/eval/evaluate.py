"""The evaluate stage's work: the bound on the test split and the quality of generated text.

Everything here is a function of (params, prepared data, exported model); the stage only writes
what this returns. Numbers on the bundled shards are labelled "LM1B-sample".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import Layout
from pipeline.config import EvalParams, Params
from pipeline.data.stats import length_log_probs
from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.forward import SpecialIds
from pipeline.eval.bound import PackedRows, perplexity_bound
from pipeline.eval.judge import judge_metrics
from pipeline.eval.metrics import TOKENIZATION, generation_metrics
from pipeline.generation.sampling import fixed_or_sampled_lengths, generate, sampler_settings
from pipeline.model.export import load_exported
from pipeline.model.precision import autocast, resolve_device, resolve_precision
from pipeline.vocab import ProgressCallback

# progress(task, advance, total): the stage turns this into a progress bar.

FULL_EVALUATION = {"num_sequences": None, "bound_steps": 128, "num_samples": 1000}


def evaluation_settings(params: Params) -> dict:
    """The effective sizes: the params, or the paper-sized ones when `evaluate.full` is set."""
    ev = params.evaluate
    settings: dict[str, Any] = {
        "num_sequences": ev.num_sequences,
        "bound_steps": ev.bound_steps,
        "num_samples": ev.num_samples,
    }
    if ev.full:
        settings.update(FULL_EVALUATION)
    return settings


def corpus_label(params: Params) -> str:
    return "LM1B-sample" if params.data.source == "lm1b_mirror" else params.data.source


def evaluate_model(
    params: Params,
    layout: Layout,
    model_dir: str | Path,
    progress: ProgressCallback | None = None,
    bound_cache: Path | None = None,
    device: torch.device | str | None = None,
) -> dict:
    """Bound (per token and per word, over `evaluate.seeds`) and generation metrics.
    `bound_cache`: a folder for this very model, data and settings where the bound's finished seeds
    are kept (`perplexity_bound`'s `cache_dir`). `device`: where the model runs (default:
    `evaluate.device`); data and draws stay on the CPU and move per batch."""
    ev = params.evaluate
    settings = evaluation_settings(params)
    loaded = load_for_evaluation(model_dir, ev, device)
    model, tokenizer, schedule, special = loaded.model, loaded.tokenizer, loaded.schedule, loaded.special
    denoise, precision, device = loaded.denoise, loaded.precision, loaded.device
    test = TokenizedSplit.load(layout.prepared / "test")
    if settings["num_sequences"] is not None:
        test = test.head(settings["num_sequences"])
    histogram = np.load(layout.token_stats / "lengths.npy")
    length_lp: np.ndarray | None = length_log_probs(histogram, max_length=params.data.max_seq_len - 2)
    scored, bound_format = scored_text(params, test)
    if bound_format == "packed":
        length_lp = None  # rows are not sentences: no length term

    def tick(task: str, total: int):
        return (lambda n: progress(task, n, total)) if progress is not None else None

    start = time.perf_counter()
    with torch.no_grad():
        bound = perplexity_bound(
            denoise,
            scored,
            schedule,
            special,
            num_steps=settings["bound_steps"],
            seeds=tuple(ev.seeds),
            batch_size=ev.batch_size,
            length_log_probs=length_lp,
            device=device,
            progress=tick("bound", len(scored) * len(ev.seeds)),
            cache_dir=bound_cache,
        )
    bound["seconds"] = time.perf_counter() - start
    bound["format"] = bound_format
    if ev.compare_init:
        bound["initial_model"] = _initial_model_bound(
            params, schedule, scored, special, settings, length_lp, precision, device
        )
        bound["reduction_vs_initial"] = 1.0 - bound["ppl_token_mean"] / bound["initial_model"]["ppl_token"]

    test_lines = test_lines_of(layout)
    references = test_lines[: ev.num_references] if ev.num_references > 0 else test_lines
    n = settings["num_samples"]
    lengths = fixed_or_sampled_lengths(2 * n, ev.sample_length, histogram, ev.sample_seed)
    start = time.perf_counter()
    gen = generate(
        model,
        tokenizer,
        schedule,
        lengths=lengths,
        steps=ev.sample_steps,
        top_k=ev.top_k,
        seed=ev.sample_seed,
        denoiser=denoise,
        sampler=ev.sampler,
        **sampler_settings(ev),
        device=device,
        progress=tick("generate", 2 * n),
    )
    samples, self_bleu_set = gen.texts[:n], gen.texts[n:]
    quality = generation_metrics(samples, references, self_bleu_samples=self_bleu_set)
    quality.update(
        {
            "references": "the whole test split"
            if len(references) == len(test_lines)
            else f"the first {len(references)} test lines",
            "model_calls_per_sample": gen.row_calls / max(len(lengths), 1),
            "seconds_per_sample": gen.seconds / max(len(lengths), 1),
            "sample_steps": ev.sample_steps,
            "lengths": "fixed" if ev.sample_length > 0 else "sampled from the training length histogram",
            "bleu_tokenization": TOKENIZATION,
        }
    )
    extra = dict(
        model=model,
        tokenizer=tokenizer,
        schedule=schedule,
        special=special,
        denoise=denoise,
        test=test,
        histogram=histogram,
        references=references,
        params=params,
        device=device,
    )
    conditional = _conditional(params, extra, scored, bound_format, tick)
    # Generative perplexity under a causal LM, always beside the samples' entropy (gen-PPL alone
    # rewards low diversity); off when evaluate.judge is empty, "unavailable" when it cannot load.
    judge = judge_metrics(samples, ev.judge, device=device, batch_size=ev.batch_size)
    return {
        "label": corpus_label(params),
        "packed": params.train.packed,
        "leaky": schedule.leaky,
        "model_dir": str(model_dir),
        "time_design": model.config.time_design,
        "settings": {
            **settings,
            "seeds": list(ev.seeds),
            "num_timesteps": schedule.num_timesteps,
            "precision": precision,
            "device": str(device),
            "full": ev.full,
            "split": "test",
        },
        "bound": bound,
        "conditional": conditional,
        "judge": judge,
        "generation": quality,
        "samples": samples,
    }


def _conditional(params: Params, extra: dict, scored, bound_format: str, tick) -> dict:
    """Prefix completion and infilling (`pipeline.eval.conditional`) on the first
    `evaluate.conditional_sequences` test sentences; {} when off or when the model scores
    packed rows (no sentences to condition on)."""
    from pipeline.eval.conditional import TASKS, conditional_bound, fill_spans, task_set

    ev = params.evaluate
    if ev.conditional_sequences == 0 or bound_format != "padded":
        return {}
    tokenizer = extra["tokenizer"]
    test = extra["test"].head(min(ev.conditional_sequences, len(extra["test"])))
    vocab = tokenizer.get_vocab()
    continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
    continuation[[i for token, i in vocab.items() if token.startswith("##")]] = True
    out: dict[str, Any] = {}
    for task in TASKS:
        tasks = task_set(test, task, continuation)
        if not tasks.index:
            out[task] = {"skipped": f"no test sentence is long enough for {task}"}
            continue
        start = time.perf_counter()
        with torch.no_grad():
            report = conditional_bound(
                extra["denoise"],
                test,
                tasks,
                extra["schedule"],
                extra["special"],
                num_steps=ev.bound_steps,
                seeds=tuple(ev.seeds[:1]),
                batch_size=ev.batch_size,
                device=extra["device"],
                progress=tick(f"{task} bound", len(tasks.index)),
            )
        report["fill"] = fill_spans(
            extra["model"],
            tokenizer,
            extra["schedule"],
            test,
            tasks,
            steps=ev.sample_steps,
            top_k=ev.top_k,
            top_p=ev.top_p,
            temperature=ev.temperature,
            seed=ev.sample_seed,
            batch_size=ev.batch_size,
            denoiser=extra["denoise"],
            sampler=ev.sampler,
            gibbs_sweeps=ev.gibbs_sweeps,
            confidence_score=ev.confidence_score,
            remdm_eta=ev.remdm_eta,
            device=extra["device"],
            progress=tick(f"{task} fill", len(tasks.index)),
        )
        report["seconds"] = time.perf_counter() - start
        out[task] = report
    return out


def scored_text(params: Params, test: TokenizedSplit) -> tuple[TokenizedSplit | PackedRows, str]:
    """What the bound scores: padded sentences, or - for a model trained packed - the same text
    packed into `data.max_seq_len` rows the way it was trained. The two are not comparable."""
    if params.train.packed:
        return PackedRows(test, params.data.max_seq_len), "packed"
    return test, "padded"


@dataclass(frozen=True)
class LoadedForEvaluation:
    """An exported model made ready to be scored: on its device, under its precision."""

    model: Any
    tokenizer: Any
    schedule: Any
    special: SpecialIds
    denoise: Any  # model.denoise under the autocast of `precision`
    device: torch.device
    precision: str  # resolved: fp32 or bf16


def load_for_evaluation(
    model_dir: str | Path, ev: EvalParams, device: torch.device | str | None = None
) -> LoadedForEvaluation:
    """Load `model_dir` onto `device` (default: `evaluate.device`) under `evaluate.precision`
    resolved for that device: the one prologue of the evaluate and samplers stages, so the two
    always score a model the same way."""
    where = resolve_device(ev.device) if device is None else torch.device(device)
    model, tokenizer, schedule = load_exported(model_dir, device=where)
    precision = resolve_precision(ev.precision, where)
    return LoadedForEvaluation(
        model=model,
        tokenizer=tokenizer,
        schedule=schedule,
        special=SpecialIds.from_tokenizer(tokenizer),
        denoise=with_precision(model.denoise, precision, where),
        device=where,
        precision=precision,
    )


def with_precision(denoise, precision: str, device: torch.device | str = "cpu"):
    """`denoise` under the autocast of a resolved precision on `device`."""

    def run(*args):
        with autocast(device, precision):
            return denoise(*args)

    return run


def _initial_model_bound(
    params: Params, schedule, test, special, settings: dict, length_lp, precision: str, device: torch.device
) -> dict:
    """The same bound for the model as it was before training (first seed only)."""
    from pipeline.assembly.model import model_from_params

    initial = model_from_params(params, schedule).to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped .to
    with torch.no_grad():
        report = perplexity_bound(
            with_precision(initial.denoise, precision, device),
            test,
            schedule,
            special,
            num_steps=settings["bound_steps"],
            seeds=(params.evaluate.seeds[0],),
            batch_size=params.evaluate.batch_size,
            length_log_probs=length_lp,
            device=device,
        )
    return report["runs"][0]


def summary_metrics(report: dict) -> dict:
    """The flat numbers for metrics.json / MLflow."""
    b, g = report["bound"], report["generation"]
    out = {f"bound.{k}": v for k, v in b.items() if k.startswith("ppl_")}
    if "initial_model" in b:
        out["bound.initial_ppl_token"] = b["initial_model"]["ppl_token"]
        out["bound.reduction_vs_initial"] = b["reduction_vs_initial"]
    out["bound.num_truncated"] = b["runs"][0].get("num_truncated", 0)
    out["bound.num_words"] = b["runs"][0]["num_words"]
    out["bound.num_tokens"] = b["runs"][0]["num_tokens"]
    judge = report.get("judge") or {}
    if judge.get("gen_ppl") is not None:
        out["judge.gen_ppl"] = judge["gen_ppl"]
        out["judge.token_entropy_bits"] = judge["token_entropy_bits"]
        out["judge.num_tokens"] = judge["num_tokens"]
    for task, c in (report.get("conditional") or {}).items():
        if "ppl_token_mean" not in c:
            continue
        out[f"conditional.{task}.ppl_token"] = c["ppl_token_mean"]
        out[f"conditional.{task}.ppl_word"] = c["ppl_word_mean"]
        out[f"conditional.{task}.num_hidden_tokens"] = c["num_hidden_tokens"]
        out[f"conditional.{task}.token_accuracy"] = c["fill"]["token_accuracy"]
        out[f"conditional.{task}.span_bleu"] = c["fill"]["span_bleu"]
    # flags as 0/1 so MLflow can chart them; a BLEU with no shared 4-gram is no measurement
    out.update(
        {
            f"generation.{k}": float(v) if isinstance(v, bool) else v
            for k, v in g.items()
            if isinstance(v, (int, float)) and (not isinstance(v, bool) or k.endswith("_measured"))
        }
    )
    return out


def test_lines_of(layout: Layout) -> list[str]:
    path = layout.prepared / "test.txt"
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
