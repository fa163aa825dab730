"""evaluate: the perplexity bound on the test split and the quality of generated text.

Reads  params `evaluate.*`, `data.max_seq_len` (the length term, and the row length of packed
       scoring), `data.source` (the label: "LM1B-sample" for the bundled shards), `train.packed`
       (a model trained packed is scored on packed test rows, labelled `bound.format: packed`:
       not comparable with padded sentences), `model.*`,
       `diffusion.num_timesteps` and `diffusion.hybrid_lambda` (to rebuild the untrained model
       when `evaluate.compare_init`); models/final/ (or `--model`), data/prepared/test/,
       data/prepared/test.txt (BLEU references), data/token_stats/lengths.npy.
Writes outputs/evaluate/metrics.json (flat numbers: bound.ppl_*, conditional.*, generation.*),
       outputs/evaluate/report.json (everything, with settings and the leaky flag),
       outputs/evaluate/samples.txt (one generated sentence per line) and
       outputs/evaluate/plots/*.png (bound per seed and of the untrained model, BLEU vs
       Self-BLEU of the sample set). The steps table and the sampler comparison are the
       `samplers` stage's. While it runs, outputs/evaluate.partial/ holds the bound's finished
       seeds: a run cut off goes on from the next seed, and a finished run removes it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, jsonable, read_json, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, same_path, select_params, stage_run

STAGE = "evaluate"
# model.* and diffusion.num_timesteps/hybrid_lambda: `evaluate.compare_init` rebuilds the untrained
# model to bound it too; data.source and train.packed label the report.
# evaluate.* but the samplers stage's own (table_*, qd_*, compare_samplers): changing the steps
# table must not re-run the bound.
EVALUATE_KEYS = (
    "full",
    "num_sequences",
    "batch_size",
    "bound_steps",
    "seeds",
    "num_samples",
    "sample_length",
    "sample_steps",
    "top_k",
    "top_p",
    "temperature",
    "num_references",
    "sample_seed",
    "sampler",
    "confidence_score",
    "remdm_eta",
    "gibbs_sweeps",
    "precision",
    "device",
    "compare_init",
    "conditional_sequences",
    "judge",
)
PARAMS = (
    *(f"evaluate.{key}" for key in EVALUATE_KEYS),
    "model",
    "diffusion.num_timesteps",
    "diffusion.hybrid_lambda",
    "data.max_seq_len",
    "data.source",
    "train.packed",
)
INPUTS = ("models/final", "data/prepared/test", "data/prepared/test.txt", "data/token_stats/lengths.npy")
OUTPUTS = (
    "outputs/evaluate/metrics.json",
    "outputs/evaluate/report.json",
    "outputs/evaluate/samples.txt",
    "outputs/evaluate/plots",
)


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


def _bound_cache(params: Params, layout: Layout, model_dir: Path) -> Path:
    """Where the bound's finished seeds wait when an evaluation is cut off (an ablation row's bound
    runs for tens of minutes): outputs/evaluate.partial/<key>, the key hashing the model's and the
    test data's md5s and this stage's params, so changed inputs never read another's numbers."""
    from pipeline.lineage import dependency_md5s

    inputs = [model_dir, layout.prepared / "test", layout.token_stats / "lengths.npy"]
    chosen = select_params(params, PARAMS)
    blob = json.dumps(
        {"inputs": sorted(dependency_md5s(inputs).values()), "params": chosen}, sort_keys=True, default=str
    )
    return layout.eval_out.with_name("evaluate.partial") / hashlib.sha256(blob.encode()).hexdigest()[:16]


def run(
    params: Params,
    root: Path,
    *,
    model_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    tracking_uri: str | None = None,
) -> dict:
    from pipeline.eval.evaluate import evaluate_model
    from pipeline.eval.report import draw_plots, flat_metrics
    from pipeline.serving.registry import attach_metrics
    from pipeline.tracking.log import log_artifact, log_metrics

    layout = Layout(Path(root))
    model_dir = Path(model_dir) if model_dir is not None else layout.model
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no exported model in {model_dir} (run `dbert train` first, or pass --model)")
    require(layout.prepared / "test", "test split", "prepare")
    require(layout.prepared / "test.txt", "test references", "prepare")
    require(layout.token_stats / "lengths.npy", "length histogram", "token-stats")
    deps: list[str | Path] = [*code_paths(__name__), *INPUTS[1:], model_dir]
    tags = _train_run_tag(layout, model_dir)
    cache = _bound_cache(params, layout, model_dir)
    with stage_run(STAGE, params, root, PARAMS, deps, tags=tags, tracking_uri=tracking_uri) as active:
        report = jsonable(evaluate_model(params, layout, model_dir, progress=progress, bound_cache=cache))
        metrics = flat_metrics(report)
        with atomic_directory(layout.eval_out) as tmp:
            write_json(metrics, tmp / "metrics.json")
            write_json(report, tmp / "report.json")
            samples = [s.replace("\n", " ") for s in report.get("samples", [])]
            (tmp / "samples.txt").write_text("".join(s + "\n" for s in samples), encoding="utf-8")
            plots = draw_plots(report, tmp / "plots")
            log_metrics(metrics)
            # The registered model version the train run made carries these numbers as tags.
            attach_metrics(tags.get("train_mlflow_run_id"), metrics, evaluate_run_id=active.info.run_id)
            for name in ("metrics.json", "report.json", "samples.txt"):
                log_artifact(tmp / name)
            log_artifact(tmp / "plots", "plots")
    shutil.rmtree(cache.parent, ignore_errors=True)  # done: no seed is waiting to be reused
    return {"stage": STAGE, "outputs": str(layout.eval_out), "plots": plots, **metrics}
