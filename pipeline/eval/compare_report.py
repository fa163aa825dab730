"""What the samplers stage makes of `compare_samplers`' report: the markdown steps table with
every sampler, and the plots. Pure functions of the JSON-able report."""

from __future__ import annotations

from pathlib import Path

from pipeline.eval.report import quality_plot, steps_plots
from pipeline.viz import line_plot


def _fmt(value, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def markdown_table(report: dict) -> str:
    """The steps table (bound of each k-step chain) and one row per sampler and steps."""
    s = report.get("settings", {})
    lines = [
        f"# Sampler comparison: {report.get('label', '')} ({report.get('time_design', '')}, "
        f"precision {s.get('precision', '?')})",
        "",
        f"Each sampler row: {s.get('table_samples', '?')} samples for BLEU-4 (against the test references) and "
        f"{s.get('table_samples', '?')} more for Self-BLEU, top-k {s.get('top_k', '?')} (the ancestral rows are "
        "the steps table's samples); seconds and model calls per sample. Only samplers marked *chain* draw from the model's own reverse chain, so only they are "
        "described by the bound; ReMDM (eta "
        f"{s.get('remdm_eta', '?')}), confidence-ordered ({s.get('confidence_score', '?')}) and Gibbs "
        "(BERT-Mouth) are not.",
        "",
        "| sampler | chain | steps | BLEU | Self-BLEU | entropy (bits) | calls / sample | s / sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in report.get("samplers") or []:
        steps = row["steps"] if row["steps"] is not None else f"{s.get('gibbs_sweeps', '?')} sweeps"
        lines.append(
            f"| {row['sampler']} | {'chain' if row['model_chain'] else 'no'} | {steps} | {_fmt(row.get('bleu'))} | "
            f"{_fmt(row.get('self_bleu'))} | {_fmt(row.get('unigram_entropy_bits'), 2)} | "
            f"{_fmt(row.get('model_calls_per_sample'), 1)} | {_fmt(row.get('seconds_per_sample'), 3)} |"
        )
    table = report.get("steps_table") or []
    if table:
        lines += [
            "",
            f"Bound of the k-step chain (first {s.get('table_sequences', '?')} test sentences; "
            f"chain seed {', '.join(map(str, table[0].get('seeds', ['?'])))}):",
            "",
            "| steps | PPL bound / WordPiece | PPL bound / word |",
            "|---|---|---|",
        ]
        for row in table:
            lines.append(f"| {row['steps']} | {_fmt(row.get('ppl_token'), 2)} | {_fmt(row.get('ppl_word'), 2)} |")
    return "\n".join(lines) + "\n"


def draw_comparison_plots(report: dict, directory: Path) -> list[str]:
    """Bound and quality against steps, quality vs diversity over top-k, and each sampler's BLEU
    and model calls against steps. The names written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = steps_plots(report, directory) + quality_plot(report, directory)
    rows = [r for r in report.get("samplers") or [] if r.get("steps") is not None]
    steps = sorted({r["steps"] for r in rows})
    names = list(dict.fromkeys(r["sampler"] for r in rows))
    if len(steps) > 1 and names:

        def series(metric: str) -> dict[str, list]:
            by = {(r["sampler"], r["steps"]): r.get(metric) for r in rows}
            return {name: [by.get((name, k)) for k in steps] for name in names}

        label = report.get("label", "")
        line_plot(directory / "samplers_bleu.png", steps, series("bleu"), xlabel="reverse steps", ylabel="BLEU-4",
                  logx=True, title=f"{label}: BLEU of each sampler")  # fmt: skip
        line_plot(directory / "samplers_calls.png", steps, series("model_calls_per_sample"),
                  xlabel="reverse steps", ylabel="model calls per sample", logx=True, logy=True,
                  title=f"{label}: cost of each sampler")  # fmt: skip
        written += ["samplers_bleu.png", "samplers_calls.png"]
    return sorted(written)
