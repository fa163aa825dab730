"""Contract tests for corpus token statistics and the length distribution (pipeline/data/stats)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import dumps_json, write_json
from pipeline.data.stats import (
    TokenStatistics,
    length_histogram,
    length_log_probs,
    sample_lengths,
    summarize,
    token_counts,
)
from pipeline.data.tokenize import TokenizedSplit, tokenize_lines

EXCLUDED = (0, 101, 102, 103)  # UNK is a real (if rare) token and counts
VOCAB = 30522


@pytest.fixture(scope="module")
def lines(lm1b_dir: Path) -> list[str]:
    text = (lm1b_dir / "news.en.heldout-00010-of-00050").read_text(encoding="utf-8")
    return [line.strip() for line in text.split("\n") if line.strip()][:3000]


@pytest.fixture(scope="module")
def split(lines, tokenizer) -> TokenizedSplit:
    return tokenize_lines(lines, tokenizer, max_seq_len=128)


@pytest.fixture(scope="module")
def stats(split) -> TokenStatistics:
    return TokenStatistics.from_split(split, VOCAB, EXCLUDED)


def test_token_counts_equal_a_naive_counter(split):
    small = TokenizedSplit(
        ids=split.ids[: split.offsets[200]],
        offsets=split.offsets[:201],
        word_counts=split.word_counts[:200],
    )
    counts = token_counts(small, VOCAB, EXCLUDED)
    naive = Counter(int(i) for i in small.ids if int(i) not in EXCLUDED)
    assert counts.dtype == np.int64 and counts.shape == (VOCAB,)
    assert {int(i): int(counts[i]) for i in np.flatnonzero(counts)} == dict(naive)


def test_excluded_ids_never_count_and_get_no_probability(stats):
    for i in EXCLUDED:
        assert stats.counts[i] == 0
        assert stats.probabilities()[i] == 0.0
        assert stats.information()[i] == 0.0
        assert stats.centred_information()[i] == 0.0
    assert stats.total == int(stats.counts.sum())


def test_ids_outside_the_vocabulary_are_rejected(split):
    with pytest.raises(ValueError, match="vocab_size"):
        token_counts(split, vocab_size=1000, exclude_ids=EXCLUDED)


def test_smoothed_probabilities_sum_to_one_and_unseen_ids_get_add_one_mass(stats):
    p = stats.probabilities()
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    unseen = np.flatnonzero((stats.counts == 0) & stats.countable)
    n_countable = VOCAB - len(EXCLUDED)
    assert p[unseen[0]] == pytest.approx(1.0 / (stats.total + n_countable))
    assert stats.entropy == pytest.approx(float(-(p[p > 0] * np.log(p[p > 0])).sum()))


def test_centred_information_lies_in_minus_one_to_one_and_reaches_the_edge(stats):
    h = stats.centred_information()
    assert h.min() >= -1.0 and h.max() <= 1.0
    assert np.isclose(np.abs(h).max(), 1.0)


def test_frequent_tokens_have_negative_h_and_rare_seen_tokens_positive_h(stats, tokenizer):
    h = stats.centred_information()
    for word in ("the", ".", ","):
        assert h[tokenizer.convert_tokens_to_ids(word)] < 0
    singletons = np.flatnonzero(stats.counts == 1)
    assert len(singletons) > 0 and (h[singletons] > 0).all()


def test_statistics_save_and_load_round_trip(stats, tmp_path):
    stats.save(tmp_path / "a")
    loaded = TokenStatistics.load(tmp_path / "a")
    np.testing.assert_array_equal(loaded.counts, stats.counts)
    assert loaded.excluded_ids == tuple(sorted(EXCLUDED))
    np.testing.assert_array_equal(loaded.centred_information(), stats.centred_information())


def test_saved_statistics_and_summary_json_are_byte_identical_on_rerun(split, tokenizer, tmp_path):
    outputs = []
    for run in ("one", "two"):
        stats = TokenStatistics.from_split(split, VOCAB, EXCLUDED)
        stats.save(tmp_path / run)
        report = summarize(stats, tokenizer, n_sentences=len(split))
        write_json(report, tmp_path / run / "report.json")
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run).iterdir())})
    assert outputs[0] == outputs[1]
    assert set(outputs[0]) == {"counts.npy", "summary.json", "report.json"}
    assert outputs[0]["report.json"].endswith(b"}\n")


def test_summary_reports_coverage_entropy_and_extreme_tokens(stats, split, tokenizer):
    summary = summarize(stats, tokenizer, n_sentences=len(split), top_k=5)
    assert summary["tokens"] == stats.total == split.num_content_tokens
    assert summary["sentences"] == len(split)
    assert 0 < summary["ids_seen"] == int((stats.counts > 0).sum())
    coverage = summary["ids_seen"] / (VOCAB - len(EXCLUDED))
    assert summary["ids_seen_fraction"] == pytest.approx(coverage, rel=1e-5)
    bits = summary["unigram_entropy_nats"] / np.log(2)
    assert summary["unigram_entropy_bits"] == pytest.approx(bits, rel=1e-5)
    least, most = summary["least_informative"], summary["most_informative"]
    assert len(least) == len(most) == 5
    assert least[0]["token"] in {"the", ",", "."} and least[0]["h"] < 0
    assert all(row["count"] >= 1 and row["h"] > 0 for row in most)
    assert [row["count"] for row in least] == sorted((row["count"] for row in least), reverse=True)
    assert dumps_json(summary) == dumps_json(summarize(stats, tokenizer, len(split), top_k=5))


def test_length_histogram_sums_to_the_number_of_sequences(split):
    hist = length_histogram(split)
    assert hist.sum() == len(split)
    assert len(hist) == int(split.lengths.max()) - 2 + 1
    assert hist[int(split.lengths[0]) - 2] >= 1


def test_length_log_probs_normalise_and_smoothing_keeps_unseen_lengths_finite(split):
    hist = length_histogram(split)
    logp = length_log_probs(hist, smoothing=1.0, max_length=200)
    assert logp.shape == (201,)
    assert np.exp(logp).sum() == pytest.approx(1.0)
    assert np.isfinite(logp).all()
    exact = length_log_probs(hist, smoothing=0.0)
    np.testing.assert_allclose(np.exp(exact), hist / hist.sum())


def test_sampled_lengths_follow_the_histogram_and_are_seeded():
    hist = np.array([0, 0, 10, 30, 60], dtype=np.int64)
    draws = sample_lengths(hist, 20000, seed=1)
    assert draws.dtype == np.int64 and set(np.unique(draws)) <= {2, 3, 4}
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, hist / hist.sum(), atol=0.015)
    np.testing.assert_array_equal(draws, sample_lengths(hist, 20000, seed=1))
    rng = np.random.default_rng(1)
    assert sample_lengths(hist, 10, seed=rng).shape == (10,)
