"""prepare: corpus -> tokenized train/validation/test splits.

Reads  params `data.*` and `model.name_or_path` (whose tokenizer cuts the text); the corpus
       (`data.source`: an LM1B mirror directory, text files, or the Hub).
Writes data/prepared/{train,validation,test}/ (TokenizedSplit: ids.npy, offsets.npy,
       word_counts.npy, truncated.npy: lines over data.max_seq_len are cut at a word boundary and
       count only the words kept), data/prepared/test.txt (the raw test lines, BLEU references) and
       data/prepared/meta.json (source, tokenizer, max_seq_len, sizes, corpus file md5s).

Corpus paths (`data.mirror_dir`, relative `data.*_files`) are relative to the *project* root
(the main repository, also from a `dvc exp run --temp` copy); `$DBERT_LM1B_DIR` overrides the
mirror directory. All outputs appear at once or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import Layout, atomic_directory, write_json
from pipeline.config import Params
from pipeline.lineage import file_md5
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, project_dir, stage_run

STAGE = "prepare"
PARAMS = ("data", "model.name_or_path")
ENV_LM1B_DIR = "DBERT_LM1B_DIR"
SPLITS = ("train", "validation", "test")
CHUNK = 5_000  # lines per progress update


def corpus_dir(params: Params, root: Path) -> Path:
    """The LM1B mirror: `$DBERT_LM1B_DIR`, else `data.mirror_dir` (relative to the project root)."""
    env = os.environ.get(ENV_LM1B_DIR)
    if env:
        return Path(env).expanduser().resolve()
    path = Path(params.data.mirror_dir).expanduser()
    return path if path.is_absolute() else (project_dir(root) / path).resolve()


def _resolve_patterns(patterns: list[str], base: Path) -> list[str]:
    return [p if Path(p).expanduser().is_absolute() else str(base / p) for p in patterns]


def corpus_request(params: Params, root: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(source, loader options, description for meta.json); fails fast on a missing mirror."""
    from pipeline.data.sources import LM1B_SHARD_PATTERN, CorpusError

    d = params.data
    common = {"validation_fraction": d.validation_fraction, "seed": d.seed, "max_sentences": d.max_sentences}
    if d.source == "lm1b_mirror":
        mirror = corpus_dir(params, root)
        if not mirror.is_dir():
            hint = f"${ENV_LM1B_DIR}" if os.environ.get(ENV_LM1B_DIR) else f"data.mirror_dir={d.mirror_dir!r}"
            raise CorpusError(f"LM1B mirror directory not found: {mirror} (from {hint}; set data.mirror_dir "
                              f"or ${ENV_LM1B_DIR})")
        files = [mirror / LM1B_SHARD_PATTERN.format(i=int(i)) for i in [*d.train_shards, *d.test_shards]]
        described = {"mirror_dir": d.mirror_dir, "train_shards": list(d.train_shards),
                     "test_shards": list(d.test_shards),
                     "files": {f.name: file_md5(f) for f in files if f.is_file()}}
        options = {"mirror_dir": mirror, "train_shards": d.train_shards, "test_shards": d.test_shards, **common}
        return "lm1b_mirror", options, described
    if d.source == "text_files":
        base = project_dir(root)
        options = {
            "train": _resolve_patterns(d.train_files, base),
            "test": _resolve_patterns(d.test_files, base),
            "validation": _resolve_patterns(d.validation_files, base) if d.validation_files else None,
            **common,
        }
        described = {"train_files": list(d.train_files), "validation_files": list(d.validation_files),
                     "test_files": list(d.test_files)}
        return "text_files", options, described
    if d.source == "lm1b_hub":
        return "lm1b_hub", common, {"hub_name": "billion-word-benchmark/lm1b"}
    if d.source == "hub":
        if not d.hub_name:
            raise CorpusError("data.source=hub needs data.hub_name (a Hugging Face dataset id)")
        options = {"name": d.hub_name, "config": d.hub_config, "text_column": d.text_column, **common}
        return "hub", options, {"hub_name": d.hub_name, "hub_config": d.hub_config, "text_column": d.text_column}
    raise CorpusError(f"unknown data.source {d.source!r}")  # the schema already refuses this


def tokenize(lines: list[str], tokenizer, max_seq_len: int, task: str, progress: ProgressCallback | None):
    """`tokenize_lines` in chunks (same result as one call) so the progress bar moves."""
    from pipeline.data.tokenize import TokenizedSplit, tokenize_lines

    parts = []
    for start in range(0, max(len(lines), 1), CHUNK):
        chunk = lines[start : start + CHUNK]
        parts.append(tokenize_lines(chunk, tokenizer, max_seq_len))
        if progress is not None:
            progress(task, len(chunk), len(lines))
    ids = np.concatenate([p.ids for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    word_counts = np.concatenate([p.word_counts for p in parts])
    truncated = np.concatenate([p.truncated for p in parts])
    return TokenizedSplit(ids=ids, offsets=offsets, word_counts=word_counts, truncated=truncated)


def run(params: Params, root: Path, *, progress: ProgressCallback | None = None) -> dict:
    from pipeline.data.sources import load_corpus
    from pipeline.model.loading import load_tokenizer
    from pipeline.tracking import log_artifact, log_metrics

    layout = Layout(Path(root))
    d = params.data
    source, options, described = corpus_request(params, root)  # before any run or output
    tokenizer = load_tokenizer(params.model.name_or_path)
    lineage = [*code_paths(__name__), *([options["mirror_dir"]] if source == "lm1b_mirror" else [])]
    with stage_run(STAGE, params, root, PARAMS, lineage) as _run:
        corpus = load_corpus(source, **options)
        sizes: dict[str, dict[str, int]] = {}
        with atomic_directory(layout.prepared) as tmp:
            for name, lines in corpus.as_dict().items():
                split = tokenize(lines, tokenizer, d.max_seq_len, f"tokenizing {name}", progress)
                split.save(tmp / name)
                sizes[name] = {
                    "sequences": len(split),
                    "tokens": int(len(split.ids)),
                    "content_tokens": split.num_content_tokens,
                    "words": int(np.asarray(split.word_counts).sum()),
                    "truncated": split.num_truncated,  # cut at a word boundary; words counted = kept
                }
            (tmp / "test.txt").write_text("".join(line + "\n" for line in corpus.test), encoding="utf-8")
            meta = {
                "source": source,
                "corpus": described,
                "tokenizer": params.model.name_or_path,
                "vocab_size": int(tokenizer.vocab_size),
                "max_seq_len": d.max_seq_len,
                "validation_fraction": d.validation_fraction,
                "max_sentences": d.max_sentences,
                "seed": d.seed,
                "sizes": sizes,
            }
            write_json(meta, tmp / "meta.json")
            log_metrics({f"{split}.{key}": value for split, row in sizes.items() for key, value in row.items()})
            log_artifact(tmp / "meta.json")
    return {"stage": STAGE, "output": str(layout.prepared), "source": source,
            **{f"{name}_sequences": row["sequences"] for name, row in sizes.items()}}
