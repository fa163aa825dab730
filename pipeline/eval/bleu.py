"""BLEU-4 and Self-BLEU as PAPER §7 and the authors' script compute them: one
``nltk.translate.bleu_score.corpus_bleu`` per sample (that sample against every reference; for
Self-BLEU, against the other samples), averaged. Each per-sample score equals nltk's (nltk 3.10.4,
default weights, no smoothing) bit for bit, but reference n-gram statistics are built once: nltk
rebuilds every reference's n-gram counts for every call, i.e. O(H * R) Counter builds, hours for
1,000 samples x the 6,119-line test split. The pooled corpus BLEU (all samples' counts summed, a
larger number) is kept as a labelled extra.

Both sides are lower-cased and brought to one word tokenisation (:func:`normalize_words`), a
documented correction of the authors' cased-versus-uncased comparison: say so in every report
(:data:`TOKENIZATION` is the phrase to quote).
"""

from __future__ import annotations

import math
import re
import sys
from bisect import bisect_left
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

TOKENIZATION = "lower-cased; tokens = regex \\w+|[^\\w\\s] (word runs and single punctuation marks)"

_WORD_RE = re.compile(r"\w+|[^\w\s]")


def normalize_words(text: str) -> list[str]:
    """Lower-case and split into word runs and single punctuation marks.

    LM1B is pre-tokenised (``it 's``, ``$ 2,900``) while decoded BERT WordPieces are re-joined
    (``it's``, ``$ 2, 900``); splitting at every punctuation mark maps both to the same tokens,
    so BLEU measures content rather than detokenisation conventions.
    """
    return _WORD_RE.findall(text.lower())


def ngrams(tokens: Sequence[Hashable], n: int) -> Iterable[tuple[Hashable, ...]]:
    """All n-gram tuples of ``tokens`` in order (same tuples as ``nltk.util.ngrams``)."""
    return zip(*(tokens[k:] for k in range(n)))


def _check_max_n(max_n: int) -> None:
    if max_n < 1:
        raise ValueError(f"max_n must be >= 1, got {max_n}")


class _LengthIndex:
    """Sorted distinct reference lengths with multiplicities, for nltk's closest_ref_length.

    nltk picks ``min(ref_lens, key=(|r - h|, r))``: the nearest length, ties to the shorter one.
    The nearest length is either the largest available length <= h or the smallest >= h.
    ``exclude`` removes one occurrence of a length (the hypothesis itself, for Self-BLEU).
    """

    def __init__(self, lengths: Iterable[int]) -> None:
        self.counts = Counter(lengths)
        self.sorted = sorted(self.counts)

    def _available(self, length: int, exclude: int | None) -> bool:
        return self.counts[length] - (length == exclude) > 0

    def closest(self, hyp_len: int, exclude: int | None = None) -> int:
        lengths = self.sorted
        idx = bisect_left(lengths, hyp_len)
        candidates = []
        up = idx
        while up < len(lengths) and not self._available(lengths[up], exclude):
            up += 1
        if up < len(lengths):
            candidates.append(lengths[up])
        down = idx - 1
        while down >= 0 and not self._available(lengths[down], exclude):
            down -= 1
        if down >= 0:
            candidates.append(lengths[down])
        if not candidates:
            raise ValueError("no reference lengths available")
        return min(candidates, key=lambda r: (abs(r - hyp_len), r))


def _combine(
    numerators: list[int],
    denominators: list[int],
    hyp_lengths: int,
    ref_lengths: int,
    max_n: int,
) -> float:
    """nltk corpus_bleu's final step, with the same float operations in the same order.

    Without smoothing nltk returns 0 only when there is no unigram match; a zero count at a
    higher order is replaced by ``sys.float_info.min`` (log = -708.4), which gives a tiny
    positive score (about 1e-77 for BLEU-4), not 0. We do the same.
    """
    if numerators[0] == 0:
        return 0.0
    if hyp_lengths > ref_lengths:
        bp = 1.0
    elif hyp_lengths == 0:
        bp = 0.0
    else:
        bp = math.exp(1 - ref_lengths / hyp_lengths)
    weight = 1 / max_n
    precisions = [num / den if num != 0 else sys.float_info.min for num, den in zip(numerators, denominators)]
    log_sum = math.fsum(weight * math.log(p) for p in precisions if p > 0)
    return bp * math.exp(log_sum)


def _reference_max_counts(references: Sequence[Sequence[str]], max_n: int) -> list[dict[Any, int]]:
    """Per order, every n-gram's maximum count in any single reference."""
    max_counts: list[dict[Any, int]] = []
    for n in range(1, max_n + 1):
        best: dict[Any, int] = {}
        for ref in references:
            for gram, count in Counter(ngrams(ref, n)).items():
                if count > best.get(gram, 0):
                    best[gram] = count
        max_counts.append(best)
    return max_counts


@dataclass
class _Counts:
    """One hypothesis's clipped n-gram matches and n-gram totals per order, and its lengths."""

    numerators: list[int]
    denominators: list[int]
    hyp_length: int
    ref_length: int


def _reference_counts(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int
) -> list[_Counts]:
    """Per hypothesis, the statistics nltk's corpus_bleu collects against the whole reference set."""
    if not hypotheses:
        raise ValueError("hypotheses is empty")
    if not references:
        raise ValueError("references is empty")
    _check_max_n(max_n)
    max_counts = _reference_max_counts(references, max_n)
    lengths = _LengthIndex(len(ref) for ref in references)
    out = []
    for hyp in hypotheses:
        nums, dens = [], []
        for i in range(max_n):
            counts = Counter(ngrams(hyp, i + 1))
            best = max_counts[i]
            nums.append(sum(min(c, best.get(g, 0)) for g, c in counts.items()))
            dens.append(max(1, sum(counts.values())))  # nltk's max(1, ...) per sentence
        out.append(_Counts(nums, dens, len(hyp), lengths.closest(len(hyp))))
    return out


def _self_counts(samples: Sequence[Sequence[str]], max_n: int) -> list[_Counts]:
    """Per sample, the statistics against all the *other* samples.

    Per n-gram we keep the largest count, which sample holds it, and the second largest count
    over the remaining samples, so "max over others" is O(1) instead of O(samples).
    """
    if len(samples) < 2:
        raise ValueError(f"samples needs at least 2 entries for Self-BLEU, got {len(samples)}")
    _check_max_n(max_n)
    sample_counts = [[Counter(ngrams(s, n)) for n in range(1, max_n + 1)] for s in samples]
    top: list[dict[Any, list[int]]] = [{} for _ in range(max_n)]  # gram -> [best, holder, second]
    for j, per_order in enumerate(sample_counts):
        for i, counts in enumerate(per_order):
            stats = top[i]
            for gram, c in counts.items():
                entry = stats.get(gram)
                if entry is None:
                    stats[gram] = [c, j, 0]
                elif c > entry[0]:
                    entry[2] = entry[0]
                    entry[0] = c
                    entry[1] = j
                elif c > entry[2]:
                    entry[2] = c
    lengths = _LengthIndex(len(s) for s in samples)
    out = []
    for j, (sample, per_order) in enumerate(zip(samples, sample_counts)):
        nums, dens = [], []
        for i, counts in enumerate(per_order):
            stats = top[i]
            matched = 0
            for gram, c in counts.items():
                best, holder, second = stats[gram]
                matched += min(c, second if holder == j else best)
            nums.append(matched)
            dens.append(max(1, sum(counts.values())))
        out.append(_Counts(nums, dens, len(sample), lengths.closest(len(sample), exclude=len(sample))))
    return out


def _pooled(stats: Sequence[_Counts], max_n: int) -> float:
    """One corpus BLEU over all hypotheses' pooled counts (nltk corpus_bleu of the whole list)."""
    nums = [sum(s.numerators[i] for s in stats) for i in range(max_n)]
    dens = [sum(s.denominators[i] for s in stats) for i in range(max_n)]
    return _combine(nums, dens, sum(s.hyp_length for s in stats), sum(s.ref_length for s in stats), max_n)


def _per_sample(stats: Sequence[_Counts], max_n: int) -> list[float]:
    """nltk corpus_bleu of each hypothesis on its own (PAPER §7: one score per sample)."""
    return [_combine(s.numerators, s.denominators, s.hyp_length, s.ref_length, max_n) for s in stats]


@dataclass(frozen=True)
class BleuSummary:
    """BLEU as the paper reports it, with what it was computed from.

    `mean` is the headline (the average of one nltk corpus_bleu per sample); `pooled` is one
    corpus BLEU over all samples' pooled counts (a different, larger number: a labelled extra).
    `precisions` are the pooled modified n-gram precisions p1..p_max_n. Without smoothing a
    sample with no matching max_n-gram scores ~1e-77, so when *no* sample has one, the value is
    no measurement: `measured` is False and reports print it as such.
    """

    mean: float
    pooled: float
    precisions: list[float]
    samples_with_match: int  # samples with at least one matching max_n-gram
    num_samples: int
    num_references: int  # references per sample (the others, for Self-BLEU)

    @property
    def measured(self) -> bool:
        return self.samples_with_match > 0


def _summary(stats: list[_Counts], max_n: int, num_references: int) -> BleuSummary:
    nums = [sum(s.numerators[i] for s in stats) for i in range(max_n)]
    dens = [sum(s.denominators[i] for s in stats) for i in range(max_n)]
    scores = _per_sample(stats, max_n)
    return BleuSummary(
        mean=sum(scores) / len(scores),  # summed in order, like the authors' script
        pooled=_pooled(stats, max_n),
        precisions=[n / d for n, d in zip(nums, dens)],
        samples_with_match=sum(1 for s in stats if s.numerators[max_n - 1] > 0),
        num_samples=len(stats),
        num_references=num_references,
    )


def bleu_summary(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> BleuSummary:
    """BLEU of tokenised hypotheses against the whole reference set: per-sample mean, pooled, precisions."""
    return _summary(_reference_counts(hypotheses, references, max_n), max_n, len(references))


def self_bleu_summary(samples: Sequence[Sequence[str]], max_n: int = 4) -> BleuSummary:
    """Self-BLEU of tokenised samples, each against all the others (lower = more diverse)."""
    return _summary(_self_counts(samples, max_n), max_n, len(samples) - 1)


def sentence_bleus(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> list[float]:
    """Per hypothesis: ``corpus_bleu([references], [hypothesis])`` (nltk, no smoothing)."""
    return _per_sample(_reference_counts(hypotheses, references, max_n), max_n)


def self_sentence_bleus(samples: Sequence[Sequence[str]], max_n: int = 4) -> list[float]:
    """Per sample j: ``corpus_bleu([samples without j], [samples[j]])``."""
    return _per_sample(_self_counts(samples, max_n), max_n)


def bleu_tokens(hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """The paper's BLEU: the mean over hypotheses of each one's BLEU against all references."""
    return bleu_summary(hypotheses, references, max_n).mean


def self_bleu_tokens(samples: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """The paper's Self-BLEU: the mean over samples of each one's BLEU against the others."""
    return self_bleu_summary(samples, max_n).mean


def pooled_bleu_tokens(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """One corpus BLEU of all hypotheses at once: equals
    ``corpus_bleu([references] * len(hypotheses), hypotheses)``. Not the paper's protocol."""
    return _pooled(_reference_counts(hypotheses, references, max_n), max_n)


def pooled_self_bleu_tokens(samples: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """One corpus BLEU of every sample against its others, counts pooled. Not the paper's protocol."""
    return _pooled(_self_counts(samples, max_n), max_n)


def paired_corpus_bleu(
    hypotheses: Sequence[Sequence[str]], references: Sequence[Sequence[str]], max_n: int = 4
) -> float:
    """One corpus BLEU where hypothesis i is scored against reference i only (counts pooled, as
    sacreBLEU's corpus BLEU): for filled spans against their true spans, which are often shorter
    than 4 words, so a per-span BLEU-4 would be ~0."""
    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError("need one reference per hypothesis, and at least one pair")
    stats = [_reference_counts([h], [r], max_n)[0] for h, r in zip(hypotheses, references)]
    return _pooled(stats, max_n)


def bleu(hypotheses: list[str], references: list[str], max_n: int = 4) -> float:
    """BLEU-max_n of generated sentences against the held-out set (per-sample mean), on normalised words."""
    if not hypotheses:
        raise ValueError("hypotheses is empty")
    if not references:
        raise ValueError("references is empty")
    return bleu_tokens([normalize_words(h) for h in hypotheses], [normalize_words(r) for r in references], max_n)


def self_bleu(samples: list[str], max_n: int = 4) -> float:
    """Self-BLEU (lower = more diverse; per-sample mean): each sample against the others, on normalised words."""
    if not samples:
        raise ValueError("samples is empty")
    return self_bleu_tokens([normalize_words(s) for s in samples], max_n)
