"""samplers: the sampler comparison, after evaluate (kept out of it so the evaluate stage stays
the bound, the conditional bounds and one sample set).

Reads  params `evaluate.*` (table_steps, table_sequences, table_samples, qd_top_k, qd_samples,
       compare_samplers and the sampling settings), `data.source`, `data.max_seq_len`,
       `train.packed`; models/final/ (or `--model`), data/prepared/test/,
       data/prepared/test.txt (BLEU references), data/token_stats/lengths.npy.
Writes outputs/samplers/metrics.json (flat: steps.<k>.ppl_token, samplers.<name>.<k>.*),
       outputs/samplers/report.json (everything), outputs/samplers/table.md (the steps table with
       every sampler, chain samplers marked) and outputs/samplers/plots/*.png (bound and quality
       against steps, quality vs diversity over top-k, quality vs seconds per sample per sampler).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, jsonable, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "samplers"
PARAMS = (
    "evaluate.table_steps",
    "evaluate.table_sequences",
    "evaluate.table_samples",
    "evaluate.qd_top_k",
    "evaluate.qd_samples",
    "evaluate.compare_samplers",
    "evaluate.compare_steps",
    "evaluate.sample_steps",
    "evaluate.sample_length",
    "evaluate.sample_seed",
    "evaluate.top_k",
    "evaluate.top_p",
    "evaluate.temperature",
    "evaluate.seeds",
    "evaluate.batch_size",
    "evaluate.num_references",
    "evaluate.precision",
    "evaluate.device",
    "evaluate.confidence_score",
    "evaluate.remdm_eta",
    "evaluate.gibbs_sweeps",
    "evaluate.sampler",
    "data.source",
    "data.max_seq_len",
    "train.packed",
)
INPUTS = ("models/final", "data/prepared/test", "data/prepared/test.txt", "data/token_stats/lengths.npy")
OUTPUTS = (
    "outputs/samplers/metrics.json",
    "outputs/samplers/report.json",
    "outputs/samplers/table.md",
    "outputs/samplers/plots",
)


def run(
    params: Params,
    root: Path,
    *,
    model_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    tracking_uri: str | None = None,
) -> dict:
    from pipeline.eval.compare import compare_samplers, comparison_metrics
    from pipeline.eval.compare_report import draw_comparison_plots, markdown_table
    from pipeline.tracking.log import log_artifact, log_metrics

    layout = Layout(Path(root))
    model_dir = Path(model_dir) if model_dir is not None else layout.model
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no exported model in {model_dir} (run `dbert train` first, or pass --model)")
    require(layout.prepared / "test", "test split", "prepare")
    require(layout.prepared / "test.txt", "test references", "prepare")
    require(layout.token_stats / "lengths.npy", "length histogram", "token-stats")
    deps: list[str | Path] = [*code_paths(__name__), *INPUTS[1:], model_dir]
    with stage_run(STAGE, params, root, PARAMS, deps, tracking_uri=tracking_uri):
        report = jsonable(compare_samplers(params, layout, model_dir, progress=progress))
        metrics = jsonable(comparison_metrics(report))
        with atomic_directory(layout.samplers_out) as tmp:
            write_json(metrics, tmp / "metrics.json")
            write_json(report, tmp / "report.json")
            (tmp / "table.md").write_text(markdown_table(report), encoding="utf-8")
            plots = draw_comparison_plots(report, tmp / "plots")
            log_metrics(metrics)
            for name in ("metrics.json", "report.json", "table.md"):
                log_artifact(tmp / name)
            log_artifact(tmp / "plots", "plots")
    return {"stage": STAGE, "outputs": str(layout.samplers_out), "plots": plots, "seconds": report["seconds"]}
