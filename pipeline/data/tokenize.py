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

SPLIT_FILES = ("ids.npy", "offsets.npy", "word_counts.npy", "truncated.npy")


@dataclass
class TokenizedSplit:
    """Sequences i = ids[offsets[i]:offsets[i+1]]; word_counts[i] = whitespace words that
    sequence i holds (the whole line, or the whole words kept when the line was cut at
    max_seq_len: see `tokenize_lines`); truncated[i] = the line was cut."""

    ids: np.ndarray  # int32 [total tokens]
    offsets: np.ndarray  # int64 [n + 1], offsets[0] == 0, offsets[-1] == len(ids)
    word_counts: np.ndarray  # int32 [n], per-word perplexity denominator
    truncated: np.ndarray = None  # type: ignore[assignment]  # bool [n]; None: no line was cut

    def __post_init__(self) -> None:
        if self.truncated is None:
            self.truncated = np.zeros(len(self.word_counts), dtype=bool)
        arrays = (self.ids, self.offsets, self.word_counts, self.truncated)
        if any(a.ndim != 1 for a in arrays):
            raise ValueError("TokenizedSplit arrays must be one-dimensional")
        if len(self.offsets) < 1 or self.offsets[0] != 0 or self.offsets[-1] != len(self.ids):
            raise ValueError("offsets must start at 0 and end at len(ids)")
        if len(self.word_counts) != len(self.offsets) - 1 or len(self.truncated) != len(self.word_counts):
            raise ValueError("word_counts and truncated must have one entry per sequence")

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

    def head(self, n: int) -> "TokenizedSplit":
        """The first n sequences (all of them when n >= len)."""
        n = min(n, len(self))
        end = int(self.offsets[n])
        return TokenizedSplit(self.ids[:end], self.offsets[: n + 1], self.word_counts[:n], self.truncated[:n])

    @property
    def num_truncated(self) -> int:
        """Lines cut at max_seq_len (their word counts cover the kept whole words only)."""
        return int(np.count_nonzero(self.truncated))

    @property
    def num_content_tokens(self) -> int:
        """WordPieces without [CLS]/[SEP]: the per-token perplexity denominator."""
        return int(len(self.ids) - 2 * len(self))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ids.npy, offsets.npy, word_counts.npy, truncated.npy (byte-identical for equal arrays)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = (
            self.ids.astype(np.int32, copy=False),
            self.offsets.astype(np.int64, copy=False),
            self.word_counts.astype(np.int32, copy=False),
            self.truncated.astype(bool, copy=False),
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
        truncated = np.load(directory / "truncated.npy", allow_pickle=False)
        return cls(ids=ids, offsets=offsets, word_counts=word_counts, truncated=truncated)


def _check_max_seq_len(max_seq_len: int, tokenizer: Any) -> None:
    if max_seq_len < 3:
        raise ValueError(f"max_seq_len must be >= 3 ([CLS], one token, [SEP]), got {max_seq_len}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and model_max < 1e6 and max_seq_len > model_max:
        raise ValueError(
            f"max_seq_len={max_seq_len} exceeds the tokenizer's model_max_length={model_max} "
            "(the model has no position embeddings beyond it)"
        )


def _cut_at_word_boundary(line: str, encoded: list[int], tokenizer: Any, max_seq_len: int) -> tuple[list[int], int, bool]:
    """(ids, words, truncated) for a line whose encoding filled max_seq_len.

    A line longer than max_seq_len is cut after its last whole whitespace word that fits, so
    every WordPiece kept belongs to a word that is counted and every counted word is scored in
    full: the per-word denominator matches the text the bound scores. A first word that alone
    overflows keeps its leading pieces and counts as one word.
    """
    words = line.split()
    pieces = tokenizer(words, add_special_tokens=False, return_attention_mask=False,
                       return_token_type_ids=False)["input_ids"]
    budget = max_seq_len - 2  # [CLS] and [SEP]
    used = kept = 0
    for count in map(len, pieces):
        if used + count > budget:
            break
        used += count
        kept += 1
    if kept == len(words):
        return encoded, len(words), False
    if kept == 0:
        return encoded, 1, True
    cut = tokenizer(" ".join(words[:kept]), add_special_tokens=True, return_attention_mask=False,
                    return_token_type_ids=False)["input_ids"]
    if len(cut) > max_seq_len:  # a tokenizer whose pieces cross whitespace: keep the hard cut
        return encoded, kept, True
    return cut, kept, True


def tokenize_lines(
    lines: Sequence[str],
    tokenizer: Any,
    max_seq_len: int,
    batch_size: int = 1000,
    show_progress: bool = False,
) -> TokenizedSplit:
    """Tokenise lines with [CLS]/[SEP]; a line over max_seq_len WordPieces is cut at a word
    boundary (the [SEP] stays last), marked truncated, and counts only the words it keeps.

    Batches go through the fast (Rust) tokenizer; flattening uses C-level iteration into numpy,
    so there is no per-token Python loop (only the few lines that fill max_seq_len are revisited).
    """
    _check_max_seq_len(max_seq_len, tokenizer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(lines)
    id_chunks: list[np.ndarray] = []
    length_chunks: list[np.ndarray] = []
    word_chunks: list[np.ndarray] = []
    cut_chunks: list[np.ndarray] = []

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
            words = np.fromiter(map(len, map(str.split, batch)), dtype=np.int32, count=len(batch))
            cut = np.zeros(len(batch), dtype=bool)
            for i, ids in enumerate(encoded):
                if len(ids) >= max_seq_len:  # filled: maybe cut, revisit at a word boundary
                    encoded[i], words[i], cut[i] = _cut_at_word_boundary(batch[i], ids, tokenizer, max_seq_len)
            lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
            id_chunks.append(
                np.fromiter(
                    itertools.chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum())
                )
            )
            length_chunks.append(lengths)
            word_chunks.append(words)
            cut_chunks.append(cut)
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
    truncated = np.concatenate(cut_chunks) if cut_chunks else np.zeros(0, dtype=bool)
    return TokenizedSplit(ids=ids, offsets=offsets, word_counts=word_counts, truncated=truncated)
