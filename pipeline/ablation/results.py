"""One ablation row's result, read back from the outputs its own stages wrote (train's metrics
and history, evaluate's report), with the MLflow run ids they trace to.

`pipeline.ablation.tables` and `pipeline.ablation.claims` turn a list of these into the table and the claims.
"""

from __future__ import annotations

import csv
from pathlib import Path

from pipeline.ablation.rows import RowRun
from pipeline.artifacts import Layout, read_json

# What a row result keeps of evaluate's `generation` block (the table, the claims, the report).
GENERATION_KEYS = (
    "bleu",
    "bleu_pooled",
    "bleu_measured",
    "bleu_p1",
    "bleu_p2",
    "bleu_p3",
    "bleu_p4",
    "bleu_samples_with_4gram_match",
    "self_bleu",
    "self_bleu_pooled",
    "self_bleu_measured",
    "self_bleu_p4",
    "self_bleu_samples_with_4gram_match",
    "unigram_entropy_bits",
    "distinct_1",
    "distinct_2",
    "distinct_4",
    "mean_length_words",
    "num_samples",
    "num_references",
    "num_self_bleu_samples",
    "sample_steps",
    "model_calls_per_sample",
    "seconds_per_sample",
)


def collect_result(
    row_run: RowRun, row_root: Path, row_run_id: str, seconds: dict[str, float], tracking_uri: str
) -> dict:
    """The row's numbers from its stage outputs, with the MLflow ids they trace to."""
    row_layout = Layout(row_root)
    train_metrics = read_json(row_layout.train_out / "metrics.json")
    report = read_json(row_layout.eval_out / "report.json")
    compared = row_layout.samplers_out / "report.json"  # the detail rows' steps table and top-k curve
    comparison = read_json(compared) if compared.is_file() else report  # rows evaluated before the split
    bound, generation = report["bound"], report["generation"]
    spec = row_run.row
    first = bound["runs"][0]
    evaluate = {
        "seconds": seconds["evaluate"],
        "format": bound.get("format", "padded"),
        "leaky": bool(report.get("leaky")),
        "split": report["settings"]["split"],
        "seeds": bound["seeds"],
        "num_steps": bound["num_steps"],
        "time_grid": bound["time_grid"],
        "schedule": bound["schedule"],
        "num_sequences": first["num_sequences"],
        "num_tokens": first["num_tokens"],
        **{k: v for k, v in bound.items() if k.startswith("ppl_")},
        "runs": [{k: r[k] for k in ("seed", "ppl_token", "ppl_word", "nll_bound_nats")} for r in bound["runs"]],
        "num_words": first["num_words"],
        "num_truncated": first.get("num_truncated", 0),
        **{k: generation[k] for k in GENERATION_KEYS if k in generation},
        "sampler": row_run.params.evaluate.sampler,
        "top_k": row_run.params.evaluate.top_k,
        "steps_table": comparison.get("steps_table") or [],
        "quality_diversity": comparison.get("quality_diversity") or [],
        "samples": report.get("samples", [])[:8],
    }
    return {
        "key": row_run.key,
        "row": spec.name,
        "seed": row_run.seed,
        "method": spec.method,
        "init": "random" if row_run.params.model.name_or_path == "random" else spec.init,
        "schedule": spec.schedule,
        "time": spec.time,
        "note": spec.note,
        "fingerprint": row_run.fingerprint,
        "train_fingerprint": row_run.train_fingerprint,
        "overrides": spec.overrides,
        "mlflow": {"row": row_run_id, **stage_run_ids(row_run_id, train_metrics, tracking_uri)},
        "train": {
            "seconds": seconds["train"],
            "steps": train_metrics["step"],
            "tokens_per_s": train_metrics.get("tokens_per_s"),
            "val_bound": train_metrics.get("val_bound"),
            "precision": train_metrics.get("precision"),
            "curve": validation_curve(row_layout.train_out / "history.csv"),
        },
        "evaluate": evaluate,
    }


def stage_run_ids(row_run_id: str, train_metrics: dict, tracking_uri: str) -> dict[str, str]:
    """The stage runs nested under the row run: stage -> latest run id (train's from its metrics)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    runs = client.search_runs(
        [client.get_run(row_run_id).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{row_run_id}'",
        order_by=["attributes.start_time DESC"],
    )
    ids: dict[str, str] = {}
    for found in runs:
        ids.setdefault(found.data.tags.get("stage", "?"), found.info.run_id)
    if train_metrics.get("mlflow_run_id"):
        ids["train"] = train_metrics["mlflow_run_id"]
    return ids


def validation_curve(history_csv: Path) -> dict[str, list]:
    """The validation bound against the optimizer step, from train's history.csv."""
    steps, bounds = [], []
    with open(history_csv, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("val_bound"):
                steps.append(int(float(row["step"])))
                bounds.append(float(row["val_bound"]))
    return {"step": steps, "val_bound": bounds}


def row_metrics(result: dict) -> dict[str, float]:
    """The numbers a row's MLflow run carries."""
    ev = result["evaluate"]
    metrics = {
        k: ev[k]
        for k in (
            "ppl_token_mean",
            "ppl_token_std",
            "ppl_word_mean",
            "ppl_word_std",
            "bleu",
            "self_bleu",
            "unigram_entropy_bits",
        )
        if ev.get(k) is not None
    }
    metrics.update({"train_minutes": result["train"]["seconds"] / 60.0, "eval_minutes": ev["seconds"] / 60.0})
    return metrics
