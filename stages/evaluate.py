"""evaluate: the perplexity bound on the test split and the quality of generated text.

Reads  params `evaluate.*`, `data.max_seq_len` (the length term, and the row length of packed
       scoring), `data.source` (the label: "LM1B-sample" for the bundled shards), `train.packed`
       (a model trained packed is scored on packed test rows, labelled `bound.format: packed`:
       not comparable with padded sentences), `model.*`,
       `diffusion.num_timesteps` and `diffusion.hybrid_lambda` (to rebuild the untrained model
       when `evaluate.compare_init`); models/final/ (or `--model`), data/prepared/test/,
       data/prepared/test.txt (BLEU references), data/token_stats/lengths.npy.
Writes outputs/evaluate/metrics.json (flat numbers: bound.ppl_*, generation.*),
       outputs/evaluate/report.json (everything, with settings and the leaky flag),
       outputs/evaluate/samples.txt (one generated sentence per line) and
       outputs/evaluate/plots/*.png (bound per seed and of the untrained model, quality vs
       diversity over top-k, bound and BLEU against the number of reverse steps).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path
from typing import Any

from pipeline.artifacts import Layout, atomic_directory, read_json, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, same_path, stage_run

STAGE = "evaluate"
# model.* and diffusion.num_timesteps/hybrid_lambda: `evaluate.compare_init` rebuilds the untrained
# model to bound it too; data.source and train.packed label the report.
PARAMS = ("evaluate", "model", "diffusion.num_timesteps", "diffusion.hybrid_lambda", "data.max_seq_len",
          "data.source", "train.packed")
INPUTS = ("models/final", "data/prepared/test", "data/prepared/test.txt", "data/token_stats/lengths.npy")


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, non-finite floats -> None, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def flat_metrics(report: dict) -> dict[str, Any]:
    """The small numbers for metrics.json and MLflow (the library's summary when it has one)."""
    try:
        from pipeline.eval.evaluate import summary_metrics
    except ImportError:  # pragma: no cover - older library
        summary_metrics = None
    if summary_metrics is not None:
        metrics = dict(summary_metrics(report))
    else:  # pragma: no cover
        metrics = {f"bound.{k}": v for k, v in report.get("bound", {}).items() if k.startswith("ppl_")}
        metrics.update({f"generation.{k}": v for k, v in report.get("generation", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
    metrics["leaky"] = bool(report.get("leaky", False))
    return jsonable(metrics)


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """What `dbert evaluate` prints: the bounds with their denominators, and BLEU / Self-BLEU with
    the sample counts and 4-gram precision they rest on (flagged when no sample shares a 4-gram)."""
    lines = [f"{key}: {summary[key]}" for key in sorted(summary) if key.startswith(("bound.ppl_token", "bound.ppl_word"))]
    if "bound.num_tokens" in summary:
        lines.append(f"bound counted: {summary['bound.num_tokens']} content WordPieces, {summary['bound.num_words']} words "
                     f"({summary.get('bound.num_truncated', 0)} test lines cut at data.max_seq_len)")
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
        detail = (f"mean of {n} per-sample BLEU-4, each against {against}; pooled 4-gram precision "
                  f"{summary.get(f'{key}_p4', float('nan')):.4f}")
        if not summary.get(f"{key}_measured", 1.0):
            detail += "; NOT A MEASUREMENT: no sample shares a 4-gram with its references"
        lines.append(f"{key}: {summary[key]:.4f} ({detail})")
    return lines


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", str(name)).strip("._") or "plot"


def draw_plots(report: dict, directory: Path) -> list[str]:
    """PNGs for the report: the bound per seed (and of the untrained model), quality vs diversity
    over top-k, bound and BLEU against the number of reverse steps, and each entry of
    report["plots"] (a plot spec for `pipeline.viz.plot_spec`, or the path of a PNG)."""
    from pipeline.viz import bar_plot, line_plot, plot_spec, quality_diversity

    directory.mkdir(parents=True, exist_ok=True)
    written: list[str] = []
    bound = report.get("bound", {})
    runs = bound.get("runs") or []
    if runs and all("ppl_token" in r for r in runs):
        labels = [f"seed {r.get('seed')}" for r in runs] + ["mean"]
        values = [r["ppl_token"] for r in runs] + [bound.get("ppl_token_mean", float("nan"))]
        errors = [0.0] * len(runs) + [bound.get("ppl_token_std", 0.0) or 0.0]
        initial = bound.get("initial_model") or {}
        if initial.get("ppl_token") is not None:
            labels.append("untrained")
            values.append(initial["ppl_token"])
            errors.append(0.0)
        bar_plot(directory / "bound.png", labels, values, errors=errors, ylabel="PPL bound per token",
                 title=f"{report.get('label', '')} test bound, {bound.get('num_steps', '?')}-step chain"
                 + (" (LEAKY)" if report.get("leaky") else "")
                 + (" (packed rows: not comparable with padded)" if bound.get("format") == "packed" else ""))
        written.append("bound.png")
    generation = report.get("generation", {})
    points = [{"bleu": p.get("bleu"), "self_bleu": p.get("self_bleu"),
               "label": f"top-k {p['top_k']}" if p.get("top_k") else "no top-k"}
              for p in report.get("quality_diversity") or []]
    if not points and "bleu" in generation and "self_bleu" in generation:
        points = [{"bleu": generation["bleu"], "self_bleu": generation["self_bleu"],
                   "label": report.get("time_design")}]
    if points:
        quality_diversity(directory / "quality_diversity.png", points, connect=len(points) > 1,
                          title=f"{report.get('label', '')} samples: quality vs diversity")
        written.append("quality_diversity.png")
    table = [row for row in report.get("steps_table") or [] if row.get("steps") is not None]
    if table:
        steps = [row["steps"] for row in table]
        line_plot(directory / "steps_bound.png", steps, {"PPL bound per token": [r.get("ppl_token") for r in table]},
                  xlabel="reverse steps", ylabel="PPL bound per token", logy=True, logx=True,
                  title=f"{report.get('label', '')}: bound of the k-step chain")
        line_plot(directory / "steps_quality.png", steps,
                  {"BLEU": [r.get("bleu") for r in table], "Self-BLEU": [r.get("self_bleu") for r in table]},
                  xlabel="reverse steps", ylabel="BLEU-4", logx=True,
                  title=f"{report.get('label', '')}: sample quality vs steps")
        written += ["steps_bound.png", "steps_quality.png"]
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


def _train_run_tag(layout: Layout, model_dir: Path) -> dict[str, str]:
    """Lineage: the MLflow run that trained the evaluated model (when it is the stage's own)."""
    record = layout.train_out / "metrics.json"
    if not (same_path(model_dir, layout.model) and record.is_file()):
        return {}
    try:
        run_id = read_json(record).get("mlflow_run_id")
    except ValueError:
        return {}
    return {"train_mlflow_run_id": run_id} if run_id else {}


def run(params: Params, root: Path, *, model_dir: Path | None = None, progress: ProgressCallback | None = None) -> dict:
    from pipeline.eval.evaluate import evaluate_model
    from pipeline.tracking import log_artifact, log_metrics

    layout = Layout(Path(root))
    model_dir = Path(model_dir) if model_dir is not None else layout.model
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no exported model in {model_dir} (run `dbert train` first, or pass --model)")
    require(layout.prepared / "test", "test split", "prepare")
    require(layout.prepared / "test.txt", "test references", "prepare")
    require(layout.token_stats / "lengths.npy", "length histogram", "token-stats")
    deps = [*code_paths(__name__), *INPUTS[1:], model_dir]
    with stage_run(STAGE, params, root, PARAMS, deps, tags=_train_run_tag(layout, model_dir)) as _run:
        report = jsonable(evaluate_model(params, layout, model_dir, progress=progress))
        metrics = flat_metrics(report)
        with atomic_directory(layout.eval_out) as tmp:
            write_json(metrics, tmp / "metrics.json")
            write_json(report, tmp / "report.json")
            samples = [s.replace("\n", " ") for s in report.get("samples", [])]
            (tmp / "samples.txt").write_text("".join(s + "\n" for s in samples), encoding="utf-8")
            plots = draw_plots(report, tmp / "plots")
            log_metrics(metrics)
            for name in ("metrics.json", "report.json", "samples.txt"):
                log_artifact(tmp / name)
            log_artifact(tmp / "plots", "plots")
    return {"stage": STAGE, "outputs": str(layout.eval_out), "plots": plots, **metrics}
