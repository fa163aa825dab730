"""How a `[MASK*?]` gap gets its length: the context method's arithmetic, its refusals, and on real
held-out LM1B sentences that it hits the true length more often than every trivial baseline."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from pipeline.data.stats import length_log_probs
from pipeline.eval.conditional import hidden_span
from pipeline.generation.gap_length import (
    choose_gap_length,
    context_gap_scores,
    prior_gap_scores,
    resolve_open_gap,
    shown_and_hidden,
)

CANDIDATES = list(range(1, 13))


def one_length(length: int, size: int = 64) -> np.ndarray:
    """log p_len with every sentence `length` WordPieces long."""
    hist = np.zeros(size)
    hist[length] = 1
    return length_log_probs(hist, smoothing=0.0)


def test_shown_and_hidden_follow_the_evaluation_spans():
    assert shown_and_hidden(12, at_end=False) == (8, 4)  # the middle third
    assert shown_and_hidden(13, at_end=False) == (8, 5)
    assert shown_and_hidden(12, at_end=True) == (6, 6)  # the second half
    assert shown_and_hidden(13, at_end=True) == (7, 6)


def test_a_gap_inside_takes_the_middle_third_and_a_gap_at_the_end_the_missing_half():
    prior = one_length(12)
    assert choose_gap_length(context_gap_scores(4, 4, CANDIDATES, prior)) == 4  # 4 + [4] + 4
    assert choose_gap_length(context_gap_scores(6, 0, CANDIDATES, prior)) == 6  # 6 + [6]
    assert choose_gap_length(context_gap_scores(0, 6, CANDIDATES, prior)) == 6  # [6] + 6
    scores = context_gap_scores(4, 4, CANDIDATES, prior)
    assert scores[4] == 0.0 and all(math.isinf(scores[n]) for n in CANDIDATES if n != 4)


def test_when_no_length_of_the_histogram_matches_the_prior_decides():
    prior = one_length(12)
    far = context_gap_scores(40, 40, CANDIDATES, prior)  # no 12-WordPiece text shows 80
    assert far == prior_gap_scores(40, 40, CANDIDATES, prior)


def test_an_unknown_method_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown gap-length method 'luck'; choose one of context, bound, prior"):
        resolve_open_gap(None, None, None, None, one_length(12), method="luck")


def _spans(lines, tokenizer, task, continuation, max_gap=12):
    out = []
    for ids in tokenizer(lines, add_special_tokens=False)["input_ids"]:
        span = hidden_span(ids, task, continuation) if 6 <= len(ids) <= 62 else None
        if span is not None and span.end - span.start <= max_gap:
            out.append((span.start, len(ids) - span.end, span.end - span.start))
    return out


@pytest.mark.parametrize("task", ["infill", "prefix"])
def test_on_held_out_lm1b_the_context_method_beats_every_trivial_baseline(lm1b_dir, tokenizer, task):
    """Length histogram and the baseline's most common span from one shard, 512 sentences of
    another held out: the context method must hit the true length more often, and miss by less,
    than the prior alone, the training spans' most common length, and even the held-out spans'
    own most common length (an oracle)."""
    shards = sorted(lm1b_dir.glob("news.en.heldout-*"))
    train_lines = shards[0].read_text(encoding="utf-8").splitlines()[:3000]
    test_lines = shards[-1].read_text(encoding="utf-8").splitlines()[:1200]
    vocab = tokenizer.get_vocab()
    continuation = np.zeros(max(vocab.values()) + 1, dtype=bool)
    continuation[[i for token, i in vocab.items() if token.startswith("##")]] = True
    lengths = [len(ids) for ids in tokenizer(train_lines, add_special_tokens=False)["input_ids"] if len(ids) <= 62]
    prior = length_log_probs(np.bincount(lengths), max_length=64)
    held_out = _spans(test_lines, tokenizer, task, continuation)[:512]
    assert len(held_out) >= 128
    truth = np.array([m for _, _, m in held_out])

    def score(chosen) -> tuple[float, float]:
        chosen = np.array(chosen)
        return float((chosen == truth).mean()), float(np.abs(chosen - truth).mean())

    context = score([choose_gap_length(context_gap_scores(a, b, CANDIDATES, prior)) for a, b, _ in held_out])
    baselines = {
        "prior": score([choose_gap_length(prior_gap_scores(a, b, CANDIDATES, prior)) for a, b, _ in held_out]),
        "train mode": score(
            [Counter(m for *_, m in _spans(train_lines, tokenizer, task, continuation)).most_common(1)[0][0]]
            * len(truth)
        ),
        "test mode": score([Counter(truth.tolist()).most_common(1)[0][0]] * len(truth)),
    }
    for name, (exact, error) in baselines.items():
        assert context[0] > exact and context[1] < error, (name, context, exact, error)
