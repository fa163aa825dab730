"""The ablation's report folder: report.json (budget, table, claims, every row), report.md and the
plots, and the parent MLflow run's metrics.

Built from the row results of `pipeline.ablation.results` with the table and claims of
`pipeline.ablation.tables` and `pipeline.ablation.claims` (as markdown: `pipeline.ablation.report`).
"""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.ablation.claims import check_claims
from pipeline.ablation.report import markdown_claims
from pipeline.ablation.tables import markdown_table, mean_curves, table_rows
from pipeline.artifacts import write_file_atomic, write_json
from pipeline.config import Params
from pipeline.eval.evaluate import corpus_label, evaluation_settings
from pipeline.project import git_commit
from pipeline.viz import band_curves_plot, curves_plot, quality_diversity_groups


def build_report(
    params: Params,
    results: list[dict],
    parent_run_id: str,
    planned: int | None = None,
    command: str = "dbert ablation",
) -> dict:
    """report.json: what was run on which budget, the table, the claims checked, every row.
    `planned` (the rows the plan has) marks a report written while rows are still running;
    `command` is the command line that wrote it."""
    ab, ev = params.ablation, params.evaluate
    return {
        "label": corpus_label(params),
        "command": command,
        "rows_finished": len(results),
        "rows_planned": len(results) if planned is None else planned,
        "mlflow_parent_run_id": parent_run_id,
        "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget": {
            "train_steps": ab.train_steps,
            "batch_size": params.train.batch_size,
            "lr": params.train.lr,
            "precision": params.train.precision,
            "model": params.model.name_or_path,
            "max_seq_len": params.data.max_seq_len,
            "training_seeds": ab.seeds,
            "repeat_rows": ab.repeat_rows,
            "evaluation": {
                **_row_evaluation_size(params),
                "seeds": ab.bound_seeds,  # what row_params gives every row
                "split": "test",
                "sample_steps": ev.sample_steps,
                "top_k": ev.top_k,
                "detail_rows": ab.detail_rows,
                "table_steps": ab.table_steps,
                "table_sequences": ab.table_sequences,
                "detail_samples": ab.detail_samples,
                "qd_top_k": ab.qd_top_k,
            },
        },
        "table": table_rows(results),
        "claims": check_claims(results),
        "rows": results,
    }


def _row_evaluation_size(params: Params) -> dict:
    """What every row's evaluation scored: the ablation's own size (`row_params`), not the
    default run's, unless `evaluate.full` asks for the paper-sized one."""
    settings = evaluation_settings(params)
    if not params.evaluate.full:
        settings.update(num_sequences=params.ablation.num_sequences, num_samples=params.ablation.num_samples)
    return settings


def parent_metrics(report: dict) -> dict[str, float]:
    """`<row>.<metric>` for every table line: the parent run compares the rows in MLflow."""
    out = {}
    for line in report["table"]:
        for key in ("ppl_token", "ppl_word", "bleu", "self_bleu", "unigram_entropy_bits"):
            out[f"{line['row']}.{key}"] = line[key]
    return out


def write_report(report: dict, directory: Path) -> None:
    """report.json, report.md and the plots (validation curves per row and per seed, quality vs
    diversity)."""
    write_json(report, directory / "report.json")
    curves = {r["key"]: (r["train"]["curve"]["step"], r["train"]["curve"]["val_bound"]) for r in report["rows"]}
    curves_plot(
        directory / "curves.png",
        curves,
        xlabel="optimizer step",
        ylabel="validation bound (nats/token)",
        title=f"{report['label']}: validation bound per row ({report['budget']['train_steps']} steps each)",
    )
    steps = report["budget"]["train_steps"]
    band_curves_plot(
        directory / "curves_by_row.png",
        {
            f"{row} ({int(c['seeds'][0])} seed{'s' if c['seeds'][0] > 1 else ''})": c
            for row, c in mean_curves(report["rows"]).items()
        },
        xlabel="optimizer step",
        ylabel="validation bound (nats/token)",
        title=f"{report['label']}: validation bound, mean over training seeds (band: lowest-highest seed)",
        zoom_from=0.2 * steps,
    )
    groups: dict[str, list[dict]] = {
        f"rows (top-k {report['budget']['evaluation']['top_k']})": [
            {"bleu": r["evaluate"]["bleu"], "self_bleu": r["evaluate"]["self_bleu"], "label": r["key"]}
            for r in report["rows"]
        ]
    }
    for r in report["rows"]:
        if r["evaluate"]["quality_diversity"]:
            groups[f"{r['key']}: top-k sweep"] = [
                {"bleu": p["bleu"], "self_bleu": p["self_bleu"], "label": f"k={p['top_k'] or 'all'}"}
                for p in r["evaluate"]["quality_diversity"]
            ]
    quality_diversity_groups(
        directory / "quality_diversity.png",
        groups,
        joined=[g for g in groups if "sweep" in g],
        title=f"{report['label']}: quality vs diversity (per-sample BLEU-4)",
    )
    write_file_atomic(directory / "report.md", markdown(report))


def _trained_by(report: dict) -> list[str]:
    """A re-rendered report names the command and commit that trained its rows."""
    trained = report.get("trained_by")
    if not trained:
        return []
    return [
        f"Re-rendered from the published rows, which were trained by `{trained['command']}` at commit "
        f"`{trained['git_commit']}`.",
        "",
    ]


def markdown(report: dict) -> str:
    """report.md: budget, table, the claims with their intervals, the plots, the MLflow run ids."""
    budget = report["budget"]
    text = [
        f"# Ablation ({report['label']})",
        "",
        f"Command: `{report['command']}`; MLflow parent run `{report['mlflow_parent_run_id']}`; "
        f"commit `{report['git_commit']}`.",
        "",
        *_trained_by(report),
        *_partial_notice(report),
        f"Budget per row: {budget['train_steps']} optimizer steps, batch "
        f"{budget['batch_size']}, lr {budget['lr']}, model `{budget['model']}`.",
        "",
        markdown_table(report["table"], label=report["label"]),
        "## The claims of PAPER §8",
        "",
        markdown_claims(report["claims"]),
        "![curves by row](curves_by_row.png)",
        "",
        "![curves](curves.png)",
        "",
        "![quality-diversity](quality_diversity.png)",
        "",
        "## MLflow runs",
        "",
        "| Row | row run | train run | evaluate run |",
        "|---|---|---|---|",
        *[
            f"| `{r['key']}` | `{r['mlflow']['row']}` | `{r['mlflow'].get('train', '-')}` | "
            f"`{r['mlflow'].get('evaluate', '-')}` |"
            for r in report["rows"]
        ],
        "",
    ]
    return "\n".join(text)


def _partial_notice(report: dict) -> list[str]:
    """A report written while rows are still running says so before any number."""
    done, planned = report.get("rows_finished"), report.get("rows_planned")
    if done is None or planned is None or done >= planned:
        return []
    return [
        f"**Partial: {done} of {planned} planned rows finished** (written as rows land; the claims use only these).",
        "",
    ]
