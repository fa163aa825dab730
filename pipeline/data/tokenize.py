"""Tokenise sentences into one flat id array plus offsets (a ragged array without padding).

Padding is decided per batch at training time (dynamic padding) or by packing, so the stored
split holds each sentence exactly once as [CLS] wordpieces [SEP]. The flat layout keeps 30M
LM1B sentences in a few compact .npy files that load (or memory-map) in one call.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SPLIT_FILES = ("ids.npy", "offsets.npy", "word_counts.npy")


@dataclass
class TokenizedSplit:
    """Sequences i = ids[offsets[i]:offsets[i+1]]; word_counts[i] = whitespace words of line i."""

    ids: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1], offsets[0] == 0, offsets[-1] == len(ids)
    word_counts: np.ndarray  # int32 [n], per-word perplexity denominator

    def __post_init__(self) -> None:
        if self.ids.ndim != 1 or self.offsets.ndim != 1 or self.word_counts.ndim != 1:
            raise ValueError("TokenizedSplit arrays must be one-dimensional")
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")
        if len(self.word_counts) != len(self.offsets) - 1:
            raise ValueError("word_counts must have one entry per sequence")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sequence index {i} out of range for {len(self)} sequences")
        i %= len(self)
        return self.ids[self.offsets[i] : self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Sequence lengths including [CLS] and [SEP] (int64 [n])."""
        return np.diff(self.offsets).astype(np.int64)

    @property
    def num_content_tokens(self) -> int:
        """WordPieces without [CLS]/[SEP]: the per-token perplexity denominator."""
        return int(len(self.ids) - 2 * len(self))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ids.npy, offsets.npy, word_counts.npy (byte-identical for equal arrays)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = (
            self.ids.astype(np.int32, copy=False),
            self.offsets.astype(np.int64, copy=False),
            self.word_counts.astype(np.int32, copy=False),
        )
        for name, array in zip(SPLIT_FILES, arrays):
            np.save(directory / name, np.ascontiguousarray(array), allow_pickle=False)

    @classmethod
    def load(cls, directory: str | os.PathLike[str], mmap: bool = False) -> TokenizedSplit:
        """Read a saved split; `mmap=True` memory-maps ids for corpora larger than RAM."""
        directory = Path(directory)
        missing = [name for name in SPLIT_FILES if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"tokenized split in {directory} is missing {', '.join(missing)}; "
                "run the prepare stage first"
            )
        ids = np.load(directory / "ids.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
        offsets = np.load(directory / "offsets.npy", allow_pickle=False)
        word_counts = np.load(directory / "word_counts.npy", allow_pickle=False)
        return cls(ids=ids, offsets=offsets, word_counts=word_counts)


def _check_max_seq_len(max_seq_len: int, tokenizer: Any) -> None:
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be >= 3 ([CLS], one token, [SEP]), got {max_seq_len}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1e6 and max_seq_len > model_max:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the tokenizer's model_max_length={model_max} "
            "(the model has no position embeddings beyond it)"
        )


def tokenize_lines(
    lines: Sequence[str],
    tokenizer: Any,
    max_seq_len: int,
    batch_size: int = 1000,
    show_progress: bool = False,
) -> TokenizedSplit:
    """Tokenise lines with [CLS]/[SEP], truncating to max_seq_len (the [SEP] stays last).

    Batches go through the fast (Rust) tokenizer; flattening uses C-level iteration into numpy,
    so there is no per-token Python loop.
    """
    _check_max_seq_len(max_seq_len, tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lines)
    id_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    word_chunks: list[np.ndarray] = []

    progress = None
    if show_progress:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task("tokenizing", total=n)
    try:
        for start in range(0, n, batch_size):
            batch = list(lines[start : start + batch_size])
            encoded = tokenizer(
                batch,
                add_special_tokens=True,
                truncation=True,
                max_length=max_seq_len,
                return_attention_mask=False,
                return_token_type_ids=False,
            )["input_ids"]
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            id_chunks.append(
                np.fromiter(
                    itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())
                )
            )
            length_chunks.append(lengths)
            word_chunks.append(
                np.fromiter(map(len, map(str.split, batch)), dtype=np.int32, count=len(batch))
            )
            if progress is not None:
                progress.advance(task, len(batch))
    finally:
        if progress is not None:
            progress.stop()

    ids = np.concatenate(id_chunks) if id_chunks else np.zeros(0, dtype=np.int32)
    lengths = np.concatenate(length_chunks) if length_chunks else np.zeros(0, dtype=np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    word_counts = np.concatenate(word_chunks) if word_chunks else np.zeros(0, dtype=np.int32)
    return TokenizedSplit(ids=ids, offsets=offsets, word_counts=word_counts)
