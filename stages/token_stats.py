"""token_stats: unigram counts and information of every vocabulary id, and the length histogram.

Reads  data/prepared/train/ and data/prepared/meta.json (which names the tokenizer); no params.
Writes data/token_stats/counts.npy (int64 [V]), data/token_stats/summary.json (totals, entropy,
       excluded ids, the most / least informative tokens), data/token_stats/lengths.npy
       (histogram of content lengths, for the length term of the bound and for sampling
       lengths), and the metrics file outputs/token_stats.json.

Outputs are byte-identical across reruns, so an unchanged corpus never retriggers the schedule.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.artifacts import Layout, atomic_directory, dumps_json, read_json, write_file_atomic, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "token_stats"
PARAMS: tuple[str, ...] = ()
INPUTS = ("data/prepared/train", "data/prepared/meta.json")
METRICS_FILE = "outputs/token_stats.json"
OUTPUTS = ("data/token_stats/counts.npy", "data/token_stats/summary.json", "data/token_stats/lengths.npy", METRICS_FILE)
TOP_K = 20


def run(params: Params, root: Path, *, progress: ProgressCallback | None = None) -> dict:
    del progress  # one vectorised pass over the ids: nothing to show
    from pipeline.data.stats import TokenStatistics, length_histogram, summarize
    from pipeline.data.tokenize import TokenizedSplit
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.model.loading import load_tokenizer
    from pipeline.tracking.log import log_artifact, log_metrics

    layout = Layout(Path(root))
    meta = read_json(require(layout.prepared / "meta.json", "prepared data", "prepare"))
    train = TokenizedSplit.load(require(layout.prepared / "train", "training split", "prepare"))
    tokenizer = load_tokenizer(meta["tokenizer"])
    if int(tokenizer.vocab_size) != int(meta["vocab_size"]):
        raise ValueError(
            f"tokenizer {meta['tokenizer']!r} has {tokenizer.vocab_size} ids but data/prepared was "
            f"tokenized with {meta['vocab_size']}; rerun `dbert prepare`"
        )
    excluded = SpecialIds.from_tokenizer(tokenizer).forbidden_outputs  # [CLS] [SEP] [PAD] [MASK] ...
    with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), *INPUTS]) as _run:
        stats = TokenStatistics.from_split(train, int(tokenizer.vocab_size), excluded)
        summary = summarize(stats, tokenizer, len(train), top_k=TOP_K)
        lengths = length_histogram(train) if len(train) else np.zeros(1, dtype=np.int64)
        with atomic_directory(layout.token_stats) as tmp:
            stats.save(tmp)  # counts.npy + the short summary TokenStatistics.load reads
            saved = read_json(tmp / "summary.json")
            write_json({**saved, **summary}, tmp / "summary.json")  # one file: both summaries
            np.save(tmp / "lengths.npy", lengths, allow_pickle=False)
            log_artifact(tmp / "summary.json")
        metrics = _metrics(summary, lengths)
        metrics_path = write_file_atomic(layout.root / METRICS_FILE, dumps_json(metrics))
        log_metrics(metrics)
        log_artifact(metrics_path)
    return {"stage": STAGE, "output": str(layout.token_stats), "metrics": str(metrics_path), **metrics}


def _metrics(summary: dict, lengths: np.ndarray) -> dict:
    n = int(lengths.sum())
    mean = float((np.arange(len(lengths)) * lengths).sum() / n) if n else 0.0
    return {
        "sentences": summary["sentences"],
        "tokens": summary["tokens"],
        "tokens_per_sentence": summary["tokens_per_sentence"],
        "ids_seen": summary["ids_seen"],
        "ids_seen_fraction": summary["ids_seen_fraction"],
        "unigram_entropy_bits": summary["unigram_entropy_bits"],
        "information_scale_nats": summary["information_scale_nats"],
        "mean_content_length": float(f"{mean:.6g}"),
        "max_content_length": int(len(lengths) - 1),
    }
