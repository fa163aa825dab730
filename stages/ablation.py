"""ablation (opt-in, `dbert ablation`): PAPER §8's rows trained and evaluated on one budget each,
then one report with the table and the paper's four claims checked.

Reads  params (every group: each row is the base params plus the row's overrides; `ablation.*`
       picks the rows, the per-row budget and the training seeds), data/prepared/ and
       data/token_stats/ (run `dvc repro token_stats` first).
Writes outputs/ablation/rows/<key>/ - each row's own checkout-shaped root (data/ links to the
       project's; its schedule, checkpoints, model, train and evaluate outputs) with result.json
       when it is done - outputs/ablation/state.json (MLflow run ids, for resuming) and
       outputs/ablation/report/ (report.json, report.md, curves.png, quality_diversity.png).
MLflow: one parent run `ablation`, one child per row (its table numbers as metrics), and under
       each child the row's schedule, train and evaluate stage runs.

Resumable: run it again and finished rows (same params fingerprint) are reused, an interrupted
row's training continues from its last checkpoint, and the MLflow runs are reopened.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.ablation.rows import RowRun, digest, plan
from pipeline.artifacts import (
    Layout,
    atomic_directory,
    read_json,
    write_file_atomic,
    write_json,
    write_json_atomic,
)
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run, tracking_root

STAGE = "ablation"
ROW_STAGE = "ablation_row"
PARAMS = ("ablation", "model", "diffusion", "train", "evaluate", "data.max_seq_len", "data.source")
INPUTS = ("data/prepared/train", "data/prepared/validation", "data/prepared/test", "data/prepared/test.txt",
          "data/token_stats")
SHARED_DATA = ("prepared", "token_stats")  # linked into each row's root; the schedule is per row

# on_row(index, total, key, status): the CLI prints one line per row ("start", "done", "reused").
RowCallback = Callable[[int, int, str, str], None]


def run(
    params: Params,
    root: Path,
    *,
    only: list[str] | None = None,
    fresh: bool = False,
    progress: ProgressCallback | None = None,
    on_row: RowCallback | None = None,
) -> dict:
    """Train and evaluate every planned row (reusing finished ones), then write the report."""
    from pipeline.tracking import log_artifact, log_metrics, tracking_uri

    layout = Layout(Path(root))
    runs = plan(params, only)  # an unknown row is named before anything else is checked
    for path in INPUTS:
        require(layout.root / path, path, "token-stats" if "token_stats" in path else "prepare")
    out = layout.ablation_out
    if fresh and out.exists():
        shutil.rmtree(out)
    state_path = out / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    same_plan = state.get("plan") == [r.key for r in runs] and state.get("params") == _base_fingerprint(params)
    with _project_store(tracking_uri(tracking_root(layout.root))), stage_run(
        STAGE, params, root, PARAMS, [*code_paths(__name__), *INPUTS], run_name="ablation",
        resume_run_id=state.get("parent_run_id") if same_plan else None,
    ) as parent:
        state.update({"parent_run_id": parent.info.run_id, "plan": [r.key for r in runs],
                      "params": _base_fingerprint(params)})
        state.setdefault("rows", {})
        _save_state(state, state_path)
        results = []
        for index, row_run in enumerate(runs):
            results.append(_run_row(row_run, layout, state, state_path, index, len(runs), progress, on_row))
        report = build_report(params, results, parent.info.run_id)
        with atomic_directory(out / "report") as tmp:
            write_report(report, tmp)
            log_metrics(parent_metrics(report))
            for name in sorted(p.name for p in tmp.iterdir()):
                log_artifact(tmp / name, "report")
    return {"stage": STAGE, "report": str(out / "report"), "mlflow_run_id": parent.info.run_id,
            "rows": len(results), "claims": {c["claim"]: c["verdict"] for c in report["claims"]}}


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


def _run_row(row_run: RowRun, layout: Layout, state: dict, state_path: Path, index: int, total: int,
             progress: ProgressCallback | None, on_row: RowCallback | None) -> dict:
    from pipeline.tracking import log_metrics, start_stage_run

    row_root = layout.ablation_out / "rows" / row_run.key
    parent_id = state["parent_run_id"]
    record = state["rows"].get(row_run.key, {})
    result_path = row_root / "result.json"
    if result_path.is_file() and read_json(result_path).get("fingerprint") == row_run.fingerprint:
        result = read_json(result_path)
        if record.get("parent") != parent_id:  # finished under an earlier parent: give it a child here
            trained_in = result["mlflow"].get("trained_in_row", result["mlflow"]["row"])
            with start_stage_run(ROW_STAGE, _row_params(row_run), run_name=row_run.key, nested=True,
                                 tags={**_row_tags(row_run), "reused_from_run": trained_in}) as child:
                log_metrics(row_metrics(result))
            # "row" is the child of the current parent; the stage runs stay under "trained_in_row".
            result["mlflow"].update({"row": child.info.run_id, "trained_in_row": trained_in})
            write_json_atomic(result, result_path)
            state["rows"][row_run.key] = {"run_id": child.info.run_id, "parent": parent_id,
                                          "fingerprint": row_run.fingerprint}
            _save_state(state, state_path)
        _notify(on_row, index, total, row_run.key, "reused")
        return result
    stamp = row_root / "fingerprint.json"
    trained_as = read_json(stamp).get("train_fingerprint") if stamp.is_file() else None
    if trained_as != row_run.train_fingerprint and row_root.exists():
        shutil.rmtree(row_root)  # the row's training params changed: nothing of it can be reused
    result_path.unlink(missing_ok=True)  # only the evaluation changed: keep the model, evaluate again
    _link_shared_data(layout, row_root)
    write_json_atomic({"fingerprint": row_run.fingerprint, "train_fingerprint": row_run.train_fingerprint}, stamp)
    # Reopen the row's run only when it was interrupted with these very params (MLflow refuses
    # to change a logged param); a re-evaluation with other settings gets a new child run.
    same = record.get("parent") == parent_id and record.get("fingerprint") == row_run.fingerprint
    resume_id = record.get("run_id") if same else None
    _notify(on_row, index, total, row_run.key, "start")
    with start_stage_run(ROW_STAGE, _row_params(row_run), run_name=row_run.key, nested=True,
                         tags=_row_tags(row_run), resume_run_id=resume_id) as child:
        state["rows"][row_run.key] = {"run_id": child.info.run_id, "parent": parent_id,
                                      "fingerprint": row_run.fingerprint}
        _save_state(state, state_path)
        seconds = _train_and_evaluate(row_run.params, row_root, progress)
        result = collect_result(row_run, row_root, child.info.run_id, seconds)
        log_metrics(row_metrics(result))
        write_json_atomic(result, result_path)
    _notify(on_row, index, total, row_run.key, "done")
    return result


def _train_and_evaluate(params: Params, row_root: Path, progress: ProgressCallback | None) -> dict[str, float]:
    """The pipeline's own stages on the row's root; a finished training is not repeated, an
    interrupted one resumes from its checkpoint. Seconds per phase accumulate over resumptions."""
    from pipeline.train.ray_driver import last_run
    from stages import evaluate, schedule, train

    row_layout = Layout(row_root)
    timing_path = row_root / "timing.json"
    seconds = read_json(timing_path) if timing_path.is_file() else {"train": 0.0, "evaluate": 0.0}
    schedule.run(params, row_root)
    if not ((row_layout.train_out / "metrics.json").is_file() and (row_layout.model / "config.json").is_file()):
        start = time.perf_counter()
        try:
            train.run(params, row_root, resume=last_run(row_layout) is not None, progress=progress)
        finally:
            seconds["train"] += time.perf_counter() - start
            write_json_atomic(seconds, timing_path)
    start = time.perf_counter()
    evaluate.run(params, row_root, progress=progress)
    seconds["evaluate"] = time.perf_counter() - start
    write_json_atomic(seconds, timing_path)
    return seconds


def _link_shared_data(layout: Layout, row_root: Path) -> None:
    """The row reads the project's prepared text and token statistics through symlinks."""
    data = row_root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DATA:
        link, target = data / name, (layout.root / "data" / name).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)


def _row_params(row_run: RowRun) -> dict[str, Any]:
    return {k: v for k, v in row_run.params.flat().items() if not k.startswith(("ablation.", "tune."))}


def _row_tags(row_run: RowRun) -> dict[str, str]:
    spec = row_run.row
    return {"ablation_row": spec.name, "training_seed": str(row_run.seed), "method": spec.method,
            "init": spec.init, "schedule": spec.schedule, "time": spec.time, "fingerprint": row_run.fingerprint,
            **({"note": spec.note} if spec.note else {})}


def _notify(on_row: RowCallback | None, index: int, total: int, key: str, status: str) -> None:
    if on_row is not None:
        on_row(index, total, key, status)


# ---------------------------------------------------------------------------------------------
# Results and report
# ---------------------------------------------------------------------------------------------


def collect_result(row_run: RowRun, row_root: Path, row_run_id: str, seconds: dict[str, float]) -> dict:
    """The row's numbers from its stage outputs, with the MLflow ids they trace to."""
    row_layout = Layout(row_root)
    train_metrics = read_json(row_layout.train_out / "metrics.json")
    report = read_json(row_layout.eval_out / "report.json")
    bound, generation = report["bound"], report["generation"]
    spec = row_run.row
    evaluate = {
        "seconds": seconds["evaluate"], "format": bound.get("format", "padded"), "leaky": bool(report.get("leaky")),
        "split": report["settings"]["split"], "seeds": bound["seeds"], "num_steps": bound["num_steps"],
        "time_grid": bound["time_grid"], "schedule": bound["schedule"],
        "num_sequences": bound["runs"][0]["num_sequences"], "num_tokens": bound["runs"][0]["num_tokens"],
        **{k: v for k, v in bound.items() if k.startswith("ppl_")},
        "runs": [{k: r[k] for k in ("seed", "ppl_token", "ppl_word", "nll_bound_nats")} for r in bound["runs"]],
        "num_words": bound["runs"][0]["num_words"], "num_truncated": bound["runs"][0].get("num_truncated", 0),
        **{k: generation[k] for k in ("bleu", "bleu_pooled", "bleu_measured", "bleu_p1", "bleu_p2", "bleu_p3",
                                      "bleu_p4", "bleu_samples_with_4gram_match", "self_bleu", "self_bleu_pooled",
                                      "self_bleu_measured", "self_bleu_p4", "self_bleu_samples_with_4gram_match",
                                      "unigram_entropy_bits", "distinct_1", "distinct_2",
                                      "distinct_4", "mean_length_words", "num_samples", "num_references",
                                      "num_self_bleu_samples", "sample_steps",
                                      "model_calls_per_sample", "seconds_per_sample") if k in generation},
        "sampler": row_run.params.evaluate.sampler, "top_k": row_run.params.evaluate.top_k,
        "steps_table": report.get("steps_table") or [],
        "quality_diversity": report.get("quality_diversity") or [],
        "samples": report.get("samples", [])[:8],
    }
    return {
        "key": row_run.key, "row": spec.name, "seed": row_run.seed, "method": spec.method,
        "init": "random" if row_run.params.model.name_or_path == "random" else spec.init,
        "schedule": spec.schedule, "time": spec.time, "note": spec.note, "fingerprint": row_run.fingerprint,
        "train_fingerprint": row_run.train_fingerprint,
        "overrides": spec.overrides,
        "mlflow": {"row": row_run_id, **_stage_run_ids(row_run_id, train_metrics)},
        "train": {"seconds": seconds["train"], "steps": train_metrics["step"],
                  "tokens_per_s": train_metrics.get("tokens_per_s"), "val_bound": train_metrics.get("val_bound"),
                  "precision": train_metrics.get("precision"), "curve": _curve(row_layout.train_out / "history.csv")},
        "evaluate": evaluate,
    }


def _stage_run_ids(row_run_id: str, train_metrics: dict) -> dict[str, str]:
    """The stage runs nested under the row run: stage -> latest run id."""
    import mlflow

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_run(row_run_id).info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{row_run_id}'",
                              order_by=["attributes.start_time DESC"])
    ids: dict[str, str] = {}
    for found in runs:
        ids.setdefault(found.data.tags.get("stage", "?"), found.info.run_id)
    if train_metrics.get("mlflow_run_id"):
        ids["train"] = train_metrics["mlflow_run_id"]
    return ids


def _curve(history_csv: Path) -> dict[str, list]:
    steps, bounds = [], []
    with open(history_csv, encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            if row.get("val_bound"):
                steps.append(int(float(row["step"])))
                bounds.append(float(row["val_bound"]))
    return {"step": steps, "val_bound": bounds}


def row_metrics(result: dict) -> dict[str, float]:
    ev = result["evaluate"]
    metrics = {k: ev[k] for k in ("ppl_token_mean", "ppl_token_std", "ppl_word_mean", "ppl_word_std", "bleu",
                                  "self_bleu", "unigram_entropy_bits") if ev.get(k) is not None}
    metrics.update({"train_minutes": result["train"]["seconds"] / 60.0, "eval_minutes": ev["seconds"] / 60.0})
    return metrics


def parent_metrics(report: dict) -> dict[str, float]:
    out = {}
    for line in report["table"]:
        for key in ("ppl_token", "ppl_word", "bleu", "self_bleu", "unigram_entropy_bits"):
            out[f"{line['row']}.{key}"] = line[key]
    return out


def build_report(params: Params, results: list[dict], parent_run_id: str) -> dict:
    from pipeline.ablation.report import check_claims, table_rows
    from pipeline.eval.evaluate import corpus_label, evaluation_settings
    from pipeline.project import git_commit

    ab, ev = params.ablation, params.evaluate
    return {
        "label": corpus_label(params),
        "command": "dbert ablation",
        "mlflow_parent_run_id": parent_run_id,
        "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "budget": {"train_steps": ab.train_steps, "batch_size": params.train.batch_size, "lr": params.train.lr,
                   "precision": params.train.precision, "model": params.model.name_or_path,
                   "max_seq_len": params.data.max_seq_len, "training_seeds": ab.seeds,
                   "repeat_rows": ab.repeat_rows,
                   "evaluation": {**evaluation_settings(params), "seeds": ev.seeds, "split": "test",
                                  "sample_steps": ev.sample_steps, "top_k": ev.top_k,
                                  "detail_rows": ab.detail_rows, "table_steps": ev.table_steps,
                                  "table_sequences": ab.table_sequences, "detail_samples": ab.detail_samples,
                                  "qd_top_k": ev.qd_top_k}},
        "table": table_rows(results),
        "claims": check_claims(results),
        "rows": results,
    }


def write_report(report: dict, directory: Path) -> None:
    """report.json, report.md and the two plots."""
    from pipeline.ablation.report import markdown_claims, markdown_table
    from pipeline.viz import curves_plot, quality_diversity_groups

    write_json(report, directory / "report.json")
    curves = {r["key"]: (r["train"]["curve"]["step"], r["train"]["curve"]["val_bound"]) for r in report["rows"]}
    curves_plot(directory / "curves.png", curves, xlabel="optimizer step", ylabel="validation bound (nats/token)",
                title=f"{report['label']}: validation bound per row ({report['budget']['train_steps']} steps each)")
    groups: dict[str, list[dict]] = {
        f"rows (top-k {report['budget']['evaluation']['top_k']})": [
            {"bleu": r["evaluate"]["bleu"], "self_bleu": r["evaluate"]["self_bleu"], "label": r["key"]}
            for r in report["rows"]]}
    for r in report["rows"]:
        if r["evaluate"]["quality_diversity"]:
            groups[f"{r['key']}: top-k sweep"] = [
                {"bleu": p["bleu"], "self_bleu": p["self_bleu"], "label": f"k={p['top_k'] or 'all'}"}
                for p in r["evaluate"]["quality_diversity"]]
    quality_diversity_groups(directory / "quality_diversity.png", groups, joined=[g for g in groups if "sweep" in g],
                             title=f"{report['label']}: quality vs diversity (per-sample BLEU-4)")
    text = [f"# Ablation ({report['label']})", "",
            f"Command: `{report['command']}`; MLflow parent run `{report['mlflow_parent_run_id']}`; "
            f"commit `{report['git_commit']}`.", "",
            f"Budget per row: {report['budget']['train_steps']} optimizer steps, batch "
            f"{report['budget']['batch_size']}, lr {report['budget']['lr']}, model `{report['budget']['model']}`.", "",
            markdown_table(report["table"], label=report["label"]), "## The claims of PAPER §8", "",
            markdown_claims(report["claims"]), "![curves](curves.png)", "",
            "![quality-diversity](quality_diversity.png)", "", "## MLflow runs", "",
            "| Row | row run | train run | evaluate run |", "|---|---|---|---|",
            *[f"| `{r['key']}` | `{r['mlflow']['row']}` | `{r['mlflow'].get('train', '-')}` | "
              f"`{r['mlflow'].get('evaluate', '-')}` |" for r in report["rows"]], ""]
    write_file_atomic(directory / "report.md", "\n".join(text))


# ---------------------------------------------------------------------------------------------
# Plumbing
# ---------------------------------------------------------------------------------------------


def _base_fingerprint(params: Params) -> str:
    return digest(params.model_dump(exclude={"tune"}))


def _save_state(state: dict, path: Path) -> None:
    write_json_atomic(state, path)


@contextlib.contextmanager
def _project_store(uri: str) -> Iterator[None]:
    """Every stage run of every row goes to the project's store (a row's root is not a project)."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old
