"""The corpus that `data.*` params name: which source of `pipeline.data.sources`, with which
options, and how `prepare` records it in meta.json.

Corpus paths (`data.mirror_dir`, relative `data.*_files`) are relative to the *project* root (the
main repository, also from a `dvc exp run --temp` copy); `$DBERT_LM1B_DIR` overrides the mirror
directory. A missing mirror fails here, before any MLflow run or output exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from pipeline.config import DataParams, Params
from pipeline.data.sources import LM1B_HUB_NAME, LM1B_SHARD_PATTERN, SOURCES, CorpusError, CorpusSplits, load_corpus
from pipeline.lineage import file_md5
from pipeline.project import project_root

ENV_LM1B_DIR = "DBERT_LM1B_DIR"


@dataclass(frozen=True)
class CorpusRequest:
    """A source of `pipeline.data.sources`, its loader options, what meta.json says about it, and
    the paths whose md5s tag the MLflow run."""

    source: str
    options: dict[str, Any]
    described: dict[str, Any]
    lineage: tuple[Path, ...] = field(default=())

    def load(self) -> CorpusSplits:
        return load_corpus(self.source, **self.options)


def corpus_dir(params: Params, root: Path) -> Path:
    """The LM1B mirror: `$DBERT_LM1B_DIR`, else `data.mirror_dir` (relative to the project root of
    the checkout `root`)."""
    env = os.environ.get(ENV_LM1B_DIR)
    if env:
        return Path(env).expanduser().resolve()
    path = Path(params.data.mirror_dir).expanduser()
    return path if path.is_absolute() else (project_root(Path(root)) / path).resolve()


def corpus_request(params: Params, root: Path) -> CorpusRequest:
    """The request `data.source` names, for the checkout `root`; fails fast on a missing mirror."""
    d = params.data
    common = {"validation_fraction": d.validation_fraction, "seed": d.seed, "max_sentences": d.max_sentences}
    return REQUESTS[d.source](params, Path(root), common)


def _lm1b_mirror(params: Params, root: Path, common: dict[str, Any]) -> CorpusRequest:
    d = params.data
    mirror = corpus_dir(params, root)
    if not mirror.is_dir():
        hint = f"${ENV_LM1B_DIR}" if os.environ.get(ENV_LM1B_DIR) else f"data.mirror_dir={d.mirror_dir!r}"
        raise CorpusError(
            f"LM1B mirror directory not found: {mirror} (from {hint}; set data.mirror_dir or ${ENV_LM1B_DIR})"
        )
    files = [mirror / LM1B_SHARD_PATTERN.format(i=int(i)) for i in [*d.train_shards, *d.test_shards]]
    described = {
        "mirror_dir": d.mirror_dir,
        "train_shards": list(d.train_shards),
        "test_shards": list(d.test_shards),
        "files": {f.name: file_md5(f) for f in files if f.is_file()},
    }
    options = {"mirror_dir": mirror, "train_shards": d.train_shards, "test_shards": d.test_shards, **common}
    return CorpusRequest("lm1b_mirror", options, described, lineage=(mirror,))


def _text_files(params: Params, root: Path, common: dict[str, Any]) -> CorpusRequest:
    d = params.data
    base = project_root(root)
    options = {
        "train": _resolve_patterns(d.train_files, base),
        "test": _resolve_patterns(d.test_files, base),
        "validation": _resolve_patterns(d.validation_files, base) if d.validation_files else None,
        **common,
    }
    described = {
        "train_files": list(d.train_files),
        "validation_files": list(d.validation_files),
        "test_files": list(d.test_files),
    }
    return CorpusRequest("text_files", options, described)


def _lm1b_hub(params: Params, root: Path, common: dict[str, Any]) -> CorpusRequest:
    return CorpusRequest("lm1b_hub", common, {"hub_name": LM1B_HUB_NAME})


def _hub(params: Params, root: Path, common: dict[str, Any]) -> CorpusRequest:
    d = params.data
    if not d.hub_name:
        raise CorpusError("data.source=hub needs data.hub_name (a Hugging Face dataset id)")
    options = {"name": d.hub_name, "config": d.hub_config, "text_column": d.text_column, **common}
    return CorpusRequest(
        "hub", options, {"hub_name": d.hub_name, "hub_config": d.hub_config, "text_column": d.text_column}
    )


def _resolve_patterns(patterns: list[str], base: Path) -> list[str]:
    return [p if Path(p).expanduser().is_absolute() else str(base / p) for p in patterns]


# data.source -> its request; the schema's Literal and the loaders name the same sources.
REQUESTS: dict[str, Callable[[Params, Path, dict[str, Any]], CorpusRequest]] = {
    "lm1b_mirror": _lm1b_mirror,
    "text_files": _text_files,
    "lm1b_hub": _lm1b_hub,
    "hub": _hub,
}
assert set(REQUESTS) == set(SOURCES) == set(get_args(DataParams.model_fields["source"].annotation)), (
    "REQUESTS, pipeline.data.sources.SOURCES and the schema's data.source must name the same sources"
)
