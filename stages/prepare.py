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

from pathlib import Path

import numpy as np

from pipeline.artifacts import Layout, atomic_directory, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, stage_run

STAGE = "prepare"
PARAMS = ("data", "model.name_or_path")
INPUTS: tuple[str, ...] = ()  # the corpus lives outside the repository: its params identify it
OUTPUTS = (
    "data/prepared/train",
    "data/prepared/validation",
    "data/prepared/test",
    "data/prepared/test.txt",
    "data/prepared/meta.json",
)
CHUNK = 5_000  # lines per progress update


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
    from pipeline.assembly.corpus import corpus_request
    from pipeline.model.loading import load_tokenizer
    from pipeline.tracking.log import log_artifact, log_metrics

    layout = Layout(Path(root))
    d = params.data
    request = corpus_request(params, root)  # a missing mirror fails before any run or output
    tokenizer = load_tokenizer(params.model.name_or_path)
    with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), *request.lineage]):
        corpus = request.load()
        sizes: dict[str, dict[str, int]] = {}
        with atomic_directory(layout.prepared) as tmp:
            for name, lines in corpus.as_dict().items():
                split = tokenize(lines, tokenizer, d.max_seq_len, f"tokenizing {name}", progress)
                split.save(tmp / name)
                sizes[name] = {
                    "sequences": len(split),
                    "tokens": len(split.ids),
                    "content_tokens": split.num_content_tokens,
                    "words": int(np.asarray(split.word_counts).sum()),
                    "truncated": split.num_truncated,  # cut at a word boundary; words counted = kept
                }
            (tmp / "test.txt").write_text("".join(line + "\n" for line in corpus.test), encoding="utf-8")
            meta = {
                "source": request.source,
                "corpus": request.described,
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
    return {
        "stage": STAGE,
        "output": str(layout.prepared),
        "source": request.source,
        **{f"{name}_sequences": row["sequences"] for name, row in sizes.items()},
    }
