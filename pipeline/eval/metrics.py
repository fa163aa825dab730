"""Generation metrics: BLEU-4, Self-BLEU (`pipeline.eval.bleu`, named here too), unigram
entropy, distinct-n, perplexity (PAPER §7), and the one dictionary the reports carry
(`generation_metrics`). Entropies are in bits; both BLEU sides are lower-cased and brought to one
word tokenisation (:data:`TOKENIZATION` is the phrase to quote).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Sequence
from typing import Any

from pipeline.eval.bleu import (
    TOKENIZATION,
    BleuSummary,
    bleu,
    bleu_summary,
    bleu_tokens,
    ngrams,
    normalize_words,
    paired_corpus_bleu,
    pooled_bleu_tokens,
    pooled_self_bleu_tokens,
    self_bleu,
    self_bleu_summary,
    self_bleu_tokens,
    self_sentence_bleus,
    sentence_bleus,
)

__all__ = [
    "BLEU_PROTOCOL",
    "TOKENIZATION",
    "BleuSummary",
    "bleu",
    "bleu_summary",
    "bleu_tokens",
    "distinct_n",
    "generation_metrics",
    "normalize_words",
    "paired_corpus_bleu",
    "perplexity",
    "pooled_bleu_tokens",
    "pooled_self_bleu_tokens",
    "self_bleu",
    "self_bleu_summary",
    "self_bleu_tokens",
    "self_sentence_bleus",
    "sentence_bleus",
    "token_entropy",
    "unigram_entropy",
]


def _entropy(counts: Counter[Any]) -> float:
    """Shannon entropy in bits (log base 2): the one unit every report and metric name uses."""
    total = sum(counts.values())
    if total == 0:
        return 0.0
    return -math.fsum(c / total * math.log2(c / total) for c in counts.values())


def token_entropy(sequences: Sequence[Sequence[int]]) -> float:
    """Entropy (bits) of the pooled token distribution; 0.0 when there are no tokens."""
    if not sequences:
        raise ValueError("sequences is empty")
    counts: Counter[int] = Counter()
    for seq in sequences:
        counts.update(int(t) for t in seq)
    return _entropy(counts)


def _word_entropy(tokenised: Sequence[Sequence[str]]) -> float:
    counts: Counter[str] = Counter()
    for tokens in tokenised:
        counts.update(tokens)
    return _entropy(counts)


def unigram_entropy(texts: list[str]) -> float:
    """Entropy (bits) of the pooled normalised-word distribution; low means repetitive samples."""
    if not texts:
        raise ValueError("texts is empty")
    return _word_entropy([normalize_words(t) for t in texts])


def _distinct(tokenised: Sequence[Sequence[str]], n: int) -> float:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    unique: set[tuple[Hashable, ...]] = set()
    total = 0
    for tokens in tokenised:
        grams = list(ngrams(tokens, n))
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def distinct_n(texts: list[str], n: int) -> float:
    """Unique n-grams / total n-grams pooled over samples; 0.0 when no sample has n words."""
    if not texts:
        raise ValueError("texts is empty")
    return _distinct([normalize_words(t) for t in texts], n)


def perplexity(total_nll: float, count: int) -> float:
    """exp(total NLL / scored units); the unit (WordPiece or word) is the caller's choice."""
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    try:
        return math.exp(total_nll / count)
    except OverflowError:
        return math.inf


BLEU_PROTOCOL = (
    "BLEU-4: mean over samples of nltk corpus_bleu(all references, one sample), no smoothing "
    "(PAPER §7); Self-BLEU: mean over samples of each against the other samples"
)


def _bleu_fields(prefix: str, summary: BleuSummary) -> dict[str, Any]:
    """Flat fields of one BLEU summary: the headline, the pooled extra, precisions and the flag."""
    out = {
        prefix: summary.mean,
        f"{prefix}_pooled": summary.pooled,
        f"{prefix}_measured": summary.measured,
        f"{prefix}_samples_with_4gram_match": summary.samples_with_match,
    }
    out.update({f"{prefix}_p{i + 1}": p for i, p in enumerate(summary.precisions)})
    return out


def generation_metrics(
    samples: list[str],
    references: list[str],
    self_bleu_samples: list[str] | None = None,
    max_n: int = 4,
) -> dict[str, Any]:
    """BLEU, Self-BLEU, entropy (bits), distinct-1..4 and mean length, tokenising each text once.

    BLEU and Self-BLEU follow PAPER §7 (the per-sample mean; `*_pooled` is the pooled corpus
    BLEU, kept as a labelled extra), with the pooled n-gram precisions `*_p1..4`, how many samples
    share a 4-gram with their references, and `*_measured` = False when none does (no measurement).
    Self-BLEU uses ``self_bleu_samples`` when given (the paper draws a second, disjoint set of
    samples for it), else ``samples`` themselves; ``self_bleu_disjoint`` records which.
    """
    if not samples:
        raise ValueError("samples is empty")
    if not references:
        raise ValueError("references is empty")
    if self_bleu_samples is not None and not self_bleu_samples:
        raise ValueError("self_bleu_samples is empty (pass None to reuse samples)")
    hyp_tokens = [normalize_words(s) for s in samples]
    ref_tokens = [normalize_words(r) for r in references]
    sb_tokens = hyp_tokens if self_bleu_samples is None else [normalize_words(s) for s in self_bleu_samples]
    return {
        **_bleu_fields("bleu", bleu_summary(hyp_tokens, ref_tokens, max_n)),
        **_bleu_fields("self_bleu", self_bleu_summary(sb_tokens, max_n)),
        "unigram_entropy_bits": _word_entropy(hyp_tokens),
        **{f"distinct_{n}": _distinct(hyp_tokens, n) for n in range(1, 5)},
        "mean_length_words": sum(len(t) for t in hyp_tokens) / len(hyp_tokens),
        "num_samples": len(samples),
        "num_references": len(references),
        "num_self_bleu_samples": len(sb_tokens),
        "self_bleu_disjoint": self_bleu_samples is not None,
        "bleu_protocol": BLEU_PROTOCOL,
    }
