"""What the evaluate stage makes of `evaluate_model`'s report: the flat metrics (metrics.json,
MLflow), the lines `dbert evaluate` prints, and the plots.

Pure functions of the JSON-able report, so a committed report.json can be re-plotted or
re-summarised without evaluating again.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import jsonable
from pipeline.eval.evaluate import summary_metrics
from pipeline.viz import bar_plot, line_plot, plot_spec, quality_diversity


def flat_metrics(report: dict) -> dict[str, Any]:
    """The small numbers for metrics.json and MLflow, with the leaky flag and the judge's name
    and status (so a gen-PPL is never read without knowing which model gave it)."""
    metrics = dict(summary_metrics(report))
    metrics["leaky"] = bool(report.get("leaky", False))
    judge = report.get("judge") or {}
    if judge:
        metrics["judge.name"] = judge.get("judge")
        metrics["judge.status"] = judge.get("status")
    return jsonable(metrics)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `dbert evaluate` prints: the bounds with their denominators, and BLEU / Self-BLEU with
    the sample counts and 4-gram precision they rest on (flagged when no sample shares a 4-gram)."""
    lines = [
        f"{key}: {summary[key]}" for key in sorted(summary) if key.startswith(("bound.ppl_token", "bound.ppl_word"))
    ]
    if "bound.num_tokens" in summary:
        lines.append(
            f"bound counted: {summary['bound.num_tokens']} content WordPieces, {summary['bound.num_words']} words "
            f"({summary.get('bound.num_truncated', 0)} test lines cut at data.max_seq_len)"
        )
    if summary.get("judge.gen_ppl") is not None:
        lines.append(
            f"judge.gen_ppl: {summary['judge.gen_ppl']:.2f} under {summary.get('judge.name')} "
            f"({int(summary['judge.num_tokens'])} judge tokens; sample entropy "
            f"{summary['judge.token_entropy_bits']:.2f} bits per sample)"
        )
    elif summary.get("judge.status"):
        lines.append(f"judge: {summary['judge.status']}")
    for task in ("prefix", "infill"):
        key = f"conditional.{task}"
        if f"{key}.ppl_token" in summary:
            lines.append(
                f"{key}: bound {summary[f'{key}.ppl_token']:.2f} per hidden WordPiece, "
                f"{summary[f'{key}.ppl_word']:.2f} per hidden word ({int(summary[f'{key}.num_hidden_tokens'])} hidden "
                f"WordPieces); fill accuracy {summary[f'{key}.token_accuracy']:.3f}, span BLEU-4 "
                f"{summary[f'{key}.span_bleu']:.4f}"
            )
    for metric in ("bleu", "self_bleu"):
        key = f"generation.{metric}"
        if key not in summary:
            continue
        if metric == "bleu":
            n = int(summary.get("generation.num_samples", 0))
            against = f"{int(summary.get('generation.num_references', 0))} test lines"
        else:
            n = int(summary.get("generation.num_self_bleu_samples", 0))
            against = f"the other {n - 1} samples"
        detail = (
            f"mean of {n} per-sample BLEU-4, each against {against}; pooled 4-gram precision "
            f"{summary.get(f'{key}_p4', float('nan')):.4f}"
        )
        if not summary.get(f"{key}_measured", 1.0):
            detail += "; NOT A MEASUREMENT: no sample shares a 4-gram with its references"
        lines.append(f"{key}: {summary[key]:.4f} ({detail})")
    return lines


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "plot"


def draw_plots(report: dict, directory: Path) -> list[str]:
    """PNGs for the report: the bound per seed (and of the untrained model), quality vs diversity
    over top-k, bound and BLEU against the number of reverse steps, and each entry of
    report["plots"] (a plot spec for `pipeline.viz.plot_spec`, or the path of a PNG). The names
    written, sorted."""
    directory.mkdir(parents=True, exist_ok=True)
    written = _bound_plot(report, directory) + quality_plot(report, directory) + steps_plots(report, directory)
    for name, spec in (report.get("plots") or {}).items():
        target = directory / f"{_safe_name(name)}.png"
        if isinstance(spec, dict):
            plot_spec(target, spec)
        elif isinstance(spec, (str, Path)) and Path(spec).is_file():
            shutil.copyfile(spec, target)
        else:
            continue
        written.append(target.name)
    return sorted(set(written))


def _bound_plot(report: dict, directory: Path) -> list[str]:
    bound = report.get("bound", {})
    runs = bound.get("runs") or []
    if not (runs and all("ppl_token" in r for r in runs)):
        return []
    labels = [f"seed {r.get('seed')}" for r in runs] + ["mean"]
    values = [r["ppl_token"] for r in runs] + [bound.get("ppl_token_mean", float("nan"))]
    errors = [0.0] * len(runs) + [bound.get("ppl_token_std", 0.0) or 0.0]
    initial = bound.get("initial_model") or {}
    if initial.get("ppl_token") is not None:
        labels.append("untrained")
        values.append(initial["ppl_token"])
        errors.append(0.0)
    bar_plot(
        directory / "bound.png",
        labels,
        values,
        errors=errors,
        ylabel="PPL bound per token",
        title=f"{report.get('label', '')} test bound, {bound.get('num_steps', '?')}-step chain"
        + (" (LEAKY)" if report.get("leaky") else "")
        + (" (packed rows: not comparable with padded)" if bound.get("format") == "packed" else ""),
    )
    return ["bound.png"]


def quality_plot(report: dict, directory: Path) -> list[str]:
    generation = report.get("generation", {})
    points = [
        {
            "bleu": p.get("bleu"),
            "self_bleu": p.get("self_bleu"),
            "label": f"top-k {p['top_k']}" if p.get("top_k") else "no top-k",
        }
        for p in report.get("quality_diversity") or []
    ]
    if not points and "bleu" in generation and "self_bleu" in generation:
        points = [
            {"bleu": generation["bleu"], "self_bleu": generation["self_bleu"], "label": report.get("time_design")}
        ]
    if not points:
        return []
    quality_diversity(
        directory / "quality_diversity.png",
        points,
        connect=len(points) > 1,
        title=f"{report.get('label', '')} samples: quality vs diversity",
    )
    return ["quality_diversity.png"]


def steps_plots(report: dict, directory: Path) -> list[str]:
    table = [row for row in report.get("steps_table") or [] if row.get("steps") is not None]
    if not table:
        return []
    steps = [row["steps"] for row in table]
    line_plot(
        directory / "steps_bound.png",
        steps,
        {"PPL bound per token": [r.get("ppl_token") for r in table]},
        xlabel="reverse steps",
        ylabel="PPL bound per token",
        logy=True,
        logx=True,
        title=f"{report.get('label', '')}: bound of the k-step chain",
    )
    line_plot(
        directory / "steps_quality.png",
        steps,
        {"BLEU": [r.get("bleu") for r in table], "Self-BLEU": [r.get("self_bleu") for r in table]},
        xlabel="reverse steps",
        ylabel="BLEU-4",
        logx=True,
        title=f"{report.get('label', '')}: sample quality vs steps",
    )
    return ["steps_bound.png", "steps_quality.png"]
