"""train: the diffusion denoiser on the prepared data, through Ray Train.

Reads  params `model.*`, `diffusion.*`, `train.*`, `data.max_seq_len`; data/prepared/train/,
       data/prepared/validation/, data/token_stats/counts.npy + summary.json, and
       data/schedule/schedule.json (train refuses to run when the checked schedule is not the
       one the params describe).
Writes models/final/ (Hugging Face export: safetensors, tokenizer, schedule, model card README.md), and
       outputs/train/metrics.json (final step, val_bound, val_ppl, tokens_per_s, precision,
       run_name, mlflow_run_id), outputs/train/history.csv (one row per report) and
       outputs/train/curve.png. Checkpoints go to checkpoints/ (not a DVC output), so
       `--resume` continues an interrupted run.

The MLflow run of this stage is the one the Ray driver logs step metrics into; the exported
model is logged as its artifact `model/`, and as an MLflow pyfunc (`pipeline.serving.pyfunc`)
registered as `tracking.registered_model` (best effort: a warning when the store has no registry).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, read_json, write_csv_atomic, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "train"
PARAMS = ("model", "diffusion", "train", "data.max_seq_len")
INPUTS = (
    "data/prepared/train",
    "data/prepared/validation",
    "data/token_stats/counts.npy",
    "data/token_stats/summary.json",
    "data/schedule/schedule.json",
)
OUTPUTS = ("models/final", "outputs/train/metrics.json", "outputs/train/history.csv", "outputs/train/curve.png")


def check_schedule(params: Params, layout: Layout) -> dict:
    """The schedule stage's report must describe the schedule these params build, and have passed."""
    from pipeline.assembly.schedule import schedule_from_params
    from pipeline.data.stats import TokenStatistics
    from pipeline.diffusion.checks import require_passed

    report = read_json(require(layout.schedule / "schedule.json", "schedule report", "schedule"))
    stats = TokenStatistics.load(require(layout.token_stats, "token statistics", "token-stats"))
    schedule = schedule_from_params(params.diffusion, information=stats.centred_information(), counts=stats.counts)
    require_passed(report, schedule)
    return report


def step_progress(progress: ProgressCallback | None, total_steps: int):
    """The driver's `progress(metrics)` (one call per report) as a bar over optimizer steps."""
    if progress is None:
        return None
    done = {"step": 0}

    def on_report(metrics: dict) -> None:
        step = int(metrics.get("step", done["step"]))
        progress("training", max(step - done["step"], 0), total_steps)
        done["step"] = max(step, done["step"])

    return on_report


def run(
    params: Params,
    root: Path,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    tracking_uri: str | None = None,
) -> dict:
    from pipeline.model.card import write_model_card
    from pipeline.serving.registry import log_and_register
    from pipeline.tracking.log import log_artifact, log_metrics
    from pipeline.train.history import final_metrics, history_table
    from pipeline.train.ray.driver import run_training
    from pipeline.viz import training_curves

    layout = Layout(Path(root))
    for split in ("train", "validation"):
        require(layout.prepared / split, f"{split} split", "prepare")
    check_schedule(params, layout)
    deps: list[str | Path] = [*code_paths(__name__), *INPUTS]
    with stage_run(STAGE, params, root, PARAMS, deps, tracking_uri=tracking_uri) as active:
        run_id = active.info.run_id
        with atomic_directory(layout.model) as export_dir:
            outcome = run_training(
                params,
                layout,
                resume=resume,
                mlflow_run_id=run_id,
                export_dir=export_dir,
                progress=step_progress(progress, params.train.steps),
            )
            history = list(outcome.history)
            metrics = final_metrics(history, outcome.precision, outcome.run_name, run_id)
            write_model_card(export_dir, params, training=metrics)
            log_artifact(export_dir, "model", run_id=run_id)
            with atomic_directory(layout.train_out) as out:
                write_json(metrics, out / "metrics.json")
                write_csv_atomic(out / "history.csv", *history_table(history))
                training_curves(
                    out / "curve.png", history, title=f"{params.model.time_design}, {params.diffusion.schedule}"
                )
                log_metrics({f"final.{k}": v for k, v in metrics.items()}, run_id=run_id)
                for name in ("metrics.json", "history.csv", "curve.png"):
                    log_artifact(out / name, run_id=run_id)
        log_and_register(layout.model, params.tracking.registered_model)  # best effort, once the export is in place
    return {"stage": STAGE, "model": str(layout.model), "outputs": str(layout.train_out), **metrics}
