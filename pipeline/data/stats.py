"""Corpus token statistics (PAPER §3) and the sentence-length distribution (PAPER §7).

Unigram counts of the training split give each vocabulary id an information I(v) = -log p(v)
and its centred, scaled form h(v) in [-1, 1], which the spindle schedule turns into a
per-token masking speed. Special ids never count. Outputs are byte-identical across reruns so
DVC does not rebuild downstream stages for nothing.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import write_json
from pipeline.data.tokenize import TokenizedSplit

SIGNIFICANT_DIGITS = 6


def token_counts(split: TokenizedSplit, vocab_size: int, exclude_ids: Sequence[int]) -> np.ndarray:
    """Occurrences of every id, int64 [vocab_size]; excluded (special) ids are set to 0."""
    ids = np.asarray(split.ids)
    if len(ids) and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"token ids span [{int(ids.min())}, {int(ids.max())}], outside vocab_size={vocab_size}"
        )
    counts = np.bincount(ids, minlength=vocab_size).astype(np.int64)
    counts[np.asarray(list(exclude_ids), dtype=np.int64)] = 0
    return counts


def _round(x: float) -> float:
    """Six significant digits: stable JSON across platforms and tiny float noise."""
    return float(f"{x:.{SIGNIFICANT_DIGITS}g}")


@dataclass
class TokenStatistics:
    """Unigram counts over the vocabulary plus the ids that never count ([CLS], [SEP], ...)."""

    counts: np.ndarray  # int64 [V]; zero at excluded ids
    excluded_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        self.excluded_ids = tuple(sorted({int(i) for i in self.excluded_ids}))
        if self.counts.ndim != 1:
            raise ValueError("counts must be one-dimensional [vocab_size]")
        if (self.counts < 0).any():
            raise ValueError("counts must be non-negative")
        ex = self.excluded_ids
        if ex and not 0 <= ex[0] <= ex[-1] < len(self.counts):
            raise ValueError(f"excluded ids {self.excluded_ids} outside the vocabulary")
        if self.excluded_ids and self.counts[list(self.excluded_ids)].any():
            raise ValueError("excluded ids must have zero counts")

    @classmethod
    def from_split(
        cls, split: TokenizedSplit, vocab_size: int, exclude_ids: Sequence[int]
    ) -> TokenStatistics:
        return cls(token_counts(split, vocab_size, exclude_ids), tuple(exclude_ids))

    @property
    def vocab_size(self) -> int:
        return len(self.counts)

    @property
    def total(self) -> int:
        """Counted tokens (special ids excluded)."""
        return int(self.counts.sum())

    @property
    def countable(self) -> np.ndarray:
        """Bool [V]: ids that take part in the distribution."""
        mask = np.ones(self.vocab_size, dtype=bool)
        mask[list(self.excluded_ids)] = False
        return mask

    def probabilities(self) -> np.ndarray:
        """Add-one smoothed unigram p(v) over countable ids (sums to 1); 0 at excluded ids."""
        countable = self.countable
        p = np.zeros(self.vocab_size, dtype=np.float64)
        p[countable] = (self.counts[countable] + 1.0) / (self.total + int(countable.sum()))
        return p

    def information(self) -> np.ndarray:
        """I(v) = -log p(v) in nats; 0 at excluded ids."""
        countable = self.countable
        info = np.zeros(self.vocab_size, dtype=np.float64)
        info[countable] = -np.log(self.probabilities()[countable])
        return info

    @property
    def entropy(self) -> float:
        """Unigram entropy H = sum_v p(v) I(v) in nats."""
        return float(np.dot(self.probabilities(), self.information()))

    def information_scale(self) -> float:
        """max_u |I(u) - H| over countable ids: the divisor that puts h in [-1, 1]."""
        return float(np.abs(self.information()[self.countable] - self.entropy).max())

    def centred_information(self) -> np.ndarray:
        """h(v) = (I(v) - H) / max_u |I(u) - H|: > 0 for informative ids, < 0 for frequent ones."""
        countable = self.countable
        h = np.zeros(self.vocab_size, dtype=np.float64)
        deviation = self.information()[countable] - self.entropy
        scale = float(np.abs(deviation).max()) if deviation.size else 0.0
        if scale > 0:
            h[countable] = deviation / scale
        return h

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write counts.npy and summary.json (vocabulary size, excluded ids, totals, entropy)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / "counts.npy", self.counts, allow_pickle=False)
        write_json(
            {
                "entropy_nats": _round(self.entropy),
                "excluded_ids": list(self.excluded_ids),
                "ids_seen": int((self.counts > 0).sum()),
                "tokens": self.total,
                "vocab_size": self.vocab_size,
            },
            directory / "summary.json",
        )

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> TokenStatistics:
        directory = Path(directory)
        missing = [n for n in ("counts.npy", "summary.json") if not (directory / n).is_file()]
        if missing:
            raise FileNotFoundError(
                f"token statistics in {directory} are missing {', '.join(missing)}; "
                "run the token_stats stage first"
            )
        counts = np.load(directory / "counts.npy", allow_pickle=False)
        summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
        return cls(counts=counts, excluded_ids=tuple(summary["excluded_ids"]))


def _token_rows(
    stats: TokenStatistics, tokenizer: Any, ids: np.ndarray, info: np.ndarray, h: np.ndarray
) -> list[dict[str, Any]]:
    return [
        {
            "count": int(stats.counts[i]),
            "h": _round(float(h[i])),
            "id": int(i),
            "information_nats": _round(float(info[i])),
            "token": str(tokenizer.convert_ids_to_tokens(int(i))),
        }
        for i in ids
    ]


def summarize(
    stats: TokenStatistics, tokenizer: Any, n_sentences: int, top_k: int = 20
) -> dict[str, Any]:
    """Readable, JSON-stable report: totals, coverage, entropy, extreme seen tokens."""
    info, h = stats.information(), stats.centred_information()
    countable = stats.countable
    seen = np.flatnonzero(stats.counts > 0)
    seen_counts = stats.counts[seen]
    # Ties broken by id so the order never depends on the sort algorithm.
    rare_first = seen[np.lexsort((seen, seen_counts))]
    frequent_first = seen[np.lexsort((seen, -seen_counts))]
    entropy = stats.entropy
    return {
        "excluded_ids": list(stats.excluded_ids),
        "ids_seen": int(len(seen)),
        "ids_seen_fraction": _round(len(seen) / max(int(countable.sum()), 1)),
        "information_scale_nats": _round(stats.information_scale()),
        "least_informative": _token_rows(stats, tokenizer, frequent_first[:top_k], info, h),
        "most_informative": _token_rows(stats, tokenizer, rare_first[:top_k], info, h),
        "sentences": int(n_sentences),
        "tokens": stats.total,
        "tokens_per_sentence": _round(stats.total / n_sentences) if n_sentences else 0.0,
        "unigram_entropy_bits": _round(entropy / math.log(2)),
        "unigram_entropy_nats": _round(entropy),
        "vocab_size": stats.vocab_size,
    }


def length_histogram(split: TokenizedSplit) -> np.ndarray:
    """Counts of content lengths (without [CLS]/[SEP]), int64 [max length + 1]."""
    return np.bincount(split.lengths - 2).astype(np.int64)


def length_log_probs(
    hist: np.ndarray, smoothing: float = 1.0, max_length: int | None = None
) -> np.ndarray:
    """log p(length) over lengths 0..max_length (default: the histogram's max), add-`smoothing`.

    The bound is conditional on length; adding -log p(length) makes it a full bound. Smoothing
    keeps test lengths unseen in training finite (smoothing=0 gives -inf there).
    """
    hist = np.asarray(hist, dtype=np.float64)
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    size = len(hist) if max_length is None else max(len(hist), max_length + 1)
    counts = np.zeros(size, dtype=np.float64)
    counts[: len(hist)] = hist
    counts += smoothing
    total = counts.sum()
    if total <= 0:
        raise ValueError("length histogram is empty and smoothing is 0")
    with np.errstate(divide="ignore"):
        return np.log(counts) - math.log(total)


def sample_lengths(hist: np.ndarray, n: int, seed: int | np.random.Generator = 0) -> np.ndarray:
    """Draw n content lengths from the empirical histogram (int64 [n]) for generation."""
    hist = np.asarray(hist, dtype=np.float64)
    if hist.sum() <= 0:
        raise ValueError("cannot sample from an empty length histogram")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return rng.choice(len(hist), size=n, p=hist / hist.sum()).astype(np.int64)
