"""The fast BLEU / Self-BLEU equal nltk's exactly, under the paper's protocol (one corpus_bleu per
sample, averaged) and pooled (one corpus_bleu of all samples, a labelled extra); the other metrics
on tiny cases."""

from __future__ import annotations

import math
import random

import pytest
from nltk.translate.bleu_score import corpus_bleu

from pipeline.eval.metrics import (
    bleu,
    bleu_summary,
    bleu_tokens,
    distinct_n,
    generation_metrics,
    normalize_words,
    perplexity,
    pooled_bleu_tokens,
    pooled_self_bleu_tokens,
    self_bleu,
    self_bleu_summary,
    self_bleu_tokens,
    self_sentence_bleus,
    sentence_bleus,
    token_entropy,
    unigram_entropy,
)

# nltk warns on every zero-count order; the zero cases are exactly what we compare.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# Lines from the LM1B held-out shard (news.en.heldout-00013-of-00050), lower-cased.
LM1B_REFERENCES = [
    "it 's been on the market for more than a year , but elle macpherson 's house has finally sold .",
    "gundlach is unrepentant about tcw 's role in creating and managing cdo pools .",
    "it 's a bit of hollywood history .",
    "analysts were expecting earnings per share of 24 cents for the first quarter and $ 2.66 for the full year .",
    "angela doesn 't share her sister 's regrets .",
    "concerns that the us might repeat japan 's experience are likely to intensify .",
    "the state-owned kfw development bank is ikb 's biggest shareholder .",
    "all of salter 's poems are well said .",
    "a charcoal gray long-sleeve jersey ( $ 80 ) flattered my upper body .",
    '" that \'s just not me , " he said .',
    "it didn 't work that way .",
    "us forces advance into central baghdad in early april .",
    "there was no immediate word how much the rescue plan might cost .",
    "what advice do experts have for them ?",
    "and your tax return speaks volumes about your future .",
    "it accords with my experience when i was a school governor .",
    "his conduct over the past week has only exacerbated my gloom .",
    "no , the real point is instant book downloading .",
    "after shooting the four victims , the man ran .",
    "when the roman empire collapsed in the 5th century , so did the roman financial system .",
    "under an unusual power-sharing agreement , the council is made up of 10 republicans and 4 democrats .",
    "they could have had jose mourinho , the special one , but they did better .",
    "greg joined bonddesk in early 2008 as cfo .",
    '" now , we have a bit of a problem , " he confided .',
    "once the positions are filled , obama will have appointed five of seven governors .",
    "would the material differ between political parties ?",
    "her trial on charges of assault and attempted kidnapping is to begin in april .",
    "old consensual habits die hard , though .",
    "the australian press has welcomed a double miracle .",
    "the mini cables are harder to find and more expensive .",
]

# BERT-decoded style (re-joined contractions, spaced thousands) plus unrelated LM1B lines.
HYPOTHESES = [
    "it's been on the market for more than a year, but the house has finally sold.",
    "angela doesn't share her sister's regrets.",
    "it didn't work that way.",
    "analysts were expecting earnings per share of 24 cents for the first quarter.",
    "there was no immediate word how much the plan might cost.",
    '" that\'s just not me, " he said.',
    "what advice do experts have for them?",
    "the roman empire collapsed in the 5th century.",
    "greg joined the council in early 2008 as cfo.",
    "the mini cables are harder to find.",
    "thanh do pleaded guilty in march .",
    "it was a downer for me .",
    "the governors were given short blocs .",
    "no , says mr maslanka , sudoku will be with us for some time to come .",
    "would the material differ between parties?",
    "his conduct over the past week has only exacerbated my gloom.",
    "old consensual habits die hard.",
    "a charcoal gray jersey ( $ 80 ) flattered my upper body.",
    "reps who won't talk about the rescue plan.",
    "but now, it's looking like the page has turned.",
]


def nltk_sentence_bleus(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4) -> list[float]:
    """The authors' script: one corpus_bleu per sample, against every reference."""
    return [corpus_bleu([refs], [h], weights=(1 / max_n,) * max_n) for h in hyps]


def nltk_bleu(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4) -> float:
    scores = nltk_sentence_bleus(hyps, refs, max_n)
    return sum(scores) / len(scores)


def nltk_self_sentence_bleus(samples: list[list[str]], max_n: int = 4) -> list[float]:
    return [
        corpus_bleu([samples[:i] + samples[i + 1 :]], [s], weights=(1 / max_n,) * max_n) for i, s in enumerate(samples)
    ]


def nltk_self_bleu(samples: list[list[str]], max_n: int = 4) -> float:
    scores = nltk_self_sentence_bleus(samples, max_n)
    return sum(scores) / len(scores)


def nltk_pooled_bleu(hyps: list[list[str]], refs: list[list[str]], max_n: int = 4) -> float:
    return corpus_bleu([refs] * len(hyps), hyps, weights=(1 / max_n,) * max_n)


def nltk_pooled_self_bleu(samples: list[list[str]], max_n: int = 4) -> float:
    others = [samples[:i] + samples[i + 1 :] for i in range(len(samples))]
    return corpus_bleu(others, samples, weights=(1 / max_n,) * max_n)


def tok(texts: list[str]) -> list[list[str]]:
    return [normalize_words(t) for t in texts]


def random_corpus(rng: random.Random, size: int, vocab: int, max_len: int) -> list[list[str]]:
    words = [f"w{i}" for i in range(vocab)]
    return [[rng.choice(words) for _ in range(rng.randint(0, max_len))] for _ in range(size)]


# --- normalize_words -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lm1b", "bert_decoded"),
    [
        ("But now , it 's looking like the page", "but now, it's looking like the page"),
        ("Reps who won 't talk", "reps who won't talk"),
        ("$ 2,900 a month", "$ 2, 900 a month"),
        ("$ 2,900 a month", "$2, 900 a month"),
        ('" That \'s just not me , " he said .', '" that\'s just not me, " he said.'),
    ],
)
def test_normalize_words_makes_lm1b_and_bert_decoded_spellings_equal(lm1b, bert_decoded):
    assert normalize_words(lm1b) == normalize_words(bert_decoded)


def test_normalize_words_lower_cases_and_splits_every_punctuation_mark():
    assert normalize_words("It 's $2,900!") == ["it", "'", "s", "$", "2", ",", "900", "!"]
    assert normalize_words("   ") == []


# --- BLEU equals nltk ------------------------------------------------------------------------


def test_bleu_equals_nltk_on_lm1b_fixture():
    hyps, refs = tok(HYPOTHESES), tok(LM1B_REFERENCES)
    expected = nltk_bleu(hyps, refs)
    assert expected > 0.05  # real 4-gram overlap, not the degenerate case
    assert abs(bleu(HYPOTHESES, LM1B_REFERENCES) - expected) < 1e-12


def test_every_sample_s_bleu_equals_nltk_corpus_bleu_of_that_sample_alone():
    hyps, refs = tok(HYPOTHESES), tok(LM1B_REFERENCES)
    assert sentence_bleus(hyps, refs) == nltk_sentence_bleus(hyps, refs)
    samples = tok(LM1B_REFERENCES + HYPOTHESES)
    assert self_sentence_bleus(samples) == nltk_self_sentence_bleus(samples)


def test_the_headline_is_the_per_sample_mean_not_the_pooled_corpus_bleu():
    """Pooling every sample's n-gram counts into one corpus BLEU gives a
    different (larger) number than the paper's per-sample average."""
    hyps, refs = tok(HYPOTHESES), tok(LM1B_REFERENCES)
    pooled, mean = nltk_pooled_bleu(hyps, refs), nltk_bleu(hyps, refs)
    assert pooled > 1.05 * mean  # the two protocols really differ on this fixture (0.667 vs 0.604)
    assert bleu_tokens(hyps, refs) == pytest.approx(mean, abs=1e-12)
    assert pooled_bleu_tokens(hyps, refs) == pytest.approx(pooled, abs=1e-12)
    samples = tok(LM1B_REFERENCES + HYPOTHESES)
    assert self_bleu_tokens(samples) == pytest.approx(nltk_self_bleu(samples), abs=1e-12)
    assert pooled_self_bleu_tokens(samples) == pytest.approx(nltk_pooled_self_bleu(samples), abs=1e-12)
    out = generation_metrics(HYPOTHESES, LM1B_REFERENCES)
    assert out["bleu"] == bleu_tokens(hyps, refs) and out["bleu_pooled"] == pooled_bleu_tokens(hyps, refs)


def test_a_bleu_with_no_shared_four_gram_is_flagged_as_no_measurement():
    samples = [[f"w{10 * i + k}" for k in range(6)] for i in range(5)]  # no word shared
    summary = self_bleu_summary(samples)
    assert 0 <= summary.mean < 1e-70 and not summary.measured and summary.samples_with_match == 0
    assert summary.num_samples == 5 and summary.num_references == 4
    hyps, refs = tok(HYPOTHESES), tok(LM1B_REFERENCES)
    real = bleu_summary(hyps, refs)
    assert real.measured and 0 < real.samples_with_match <= len(hyps) and real.num_references == len(refs)
    assert len(real.precisions) == 4 and 1 >= real.precisions[0] >= real.precisions[3] > 0
    out = generation_metrics([" ".join(s) for s in samples], ["x y z w v"])
    assert out["self_bleu_measured"] is False and out["self_bleu_samples_with_4gram_match"] == 0


@pytest.mark.parametrize("max_n", [1, 2, 3, 4])
def test_bleu_equals_nltk_for_every_order(max_n):
    hyps, refs = tok(HYPOTHESES), tok(LM1B_REFERENCES)
    assert abs(bleu(HYPOTHESES, LM1B_REFERENCES, max_n) - nltk_bleu(hyps, refs, max_n)) < 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_bleu_equals_nltk_on_random_corpora_including_empty_and_short_sentences(seed):
    rng = random.Random(seed)
    hyps = random_corpus(rng, rng.randint(1, 40), vocab=12, max_len=15)
    refs = random_corpus(rng, rng.randint(1, 40), vocab=12, max_len=15)
    assert abs(bleu_tokens(hyps, refs) - nltk_bleu(hyps, refs)) < 1e-12


def test_bleu_with_zero_four_gram_matches_equals_nltks_tiny_positive_value():
    rng = random.Random(0)
    refs = random_corpus(rng, 30, vocab=20, max_len=12)
    # Trigrams cut from references, glued with a word no reference has: no 4-gram can match.
    hyps = []
    for _ in range(20):
        parts = []
        for _ in range(3):
            ref = rng.choice([r for r in refs if len(r) >= 3])
            start = rng.randint(0, len(ref) - 3)
            parts += [*ref[start : start + 3], "glue"]
        hyps.append(parts)
    expected = nltk_bleu(hyps, refs)
    assert 0 < expected < 1e-70  # nltk 3.10.4 substitutes sys.float_info.min, it does not return 0
    assert abs(bleu_tokens(hyps, refs) - expected) < 1e-12
    assert bleu_tokens(hyps, refs) == expected


def test_bleu_with_zero_unigram_matches_is_zero_like_nltk():
    hyps, refs = [["a", "b", "c", "d"]], [["x", "y", "z", "w"]]
    assert bleu_tokens(hyps, refs) == nltk_bleu(hyps, refs) == 0


def test_bleu_breaks_closest_reference_length_ties_towards_the_shorter_reference():
    hyps = [["a", "b", "c", "d", "e"]]
    refs = [["a", "b", "c", "d", "x", "y"], ["a", "b", "c", "d"]]  # lengths 6 and 4, hyp 5
    assert abs(bleu_tokens(hyps, refs) - nltk_bleu(hyps, refs)) < 1e-12
    assert abs(bleu_tokens(hyps, refs[:1]) - nltk_bleu(hyps, refs[:1])) < 1e-12


def test_fast_bleu_equals_nltk_on_300_hypotheses_against_300_references():
    rng = random.Random(1234)
    pool = tok(LM1B_REFERENCES + HYPOTHESES)
    # Real sentences recombined: shared phrases give matches at every order.
    corpus = []
    for _ in range(600):
        a, b = rng.sample(pool, 2)
        corpus.append(a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :])
    hyps, refs = corpus[:300], corpus[300:]
    assert abs(bleu_tokens(hyps, refs) - nltk_bleu(hyps, refs)) < 1e-12


# --- Self-BLEU equals nltk -------------------------------------------------------------------


def test_self_bleu_equals_nltk_on_lm1b_fixture():
    samples = LM1B_REFERENCES + HYPOTHESES
    expected = nltk_self_bleu(tok(samples))
    assert expected > 0.05
    assert abs(self_bleu(samples) - expected) < 1e-12


@pytest.mark.parametrize("seed", range(8))
def test_self_bleu_equals_nltk_on_random_samples_with_duplicates_and_equal_lengths(seed):
    rng = random.Random(100 + seed)
    samples = random_corpus(rng, rng.randint(2, 40), vocab=10, max_len=12)
    samples += [list(s) for s in rng.sample(samples, min(3, len(samples)))]  # exact duplicates
    rng.shuffle(samples)
    assert abs(self_bleu_tokens(samples) - nltk_self_bleu(samples)) < 1e-12


def test_self_bleu_of_identical_samples_is_one():
    samples = ["the same sentence again and again ."] * 5
    assert self_bleu(samples) == pytest.approx(1.0, abs=1e-12)
    assert abs(self_bleu(samples) - nltk_self_bleu(tok(samples))) < 1e-12


def test_self_bleu_with_a_unique_length_uses_the_nearest_other_length_like_nltk():
    samples = [
        ["a", "b", "c", "d"],
        ["a", "b", "c", "d", "e", "f"],
        ["a", "b", "c", "d", "e", "f"],
        ["b", "c", "d", "e", "f", "g", "h", "i", "j"],
    ]
    assert abs(self_bleu_tokens(samples) - nltk_self_bleu(samples)) < 1e-12


def test_fast_self_bleu_equals_nltk_on_150_samples():
    rng = random.Random(99)
    pool = tok(LM1B_REFERENCES + HYPOTHESES)
    samples = []
    for _ in range(150):
        a, b = rng.sample(pool, 2)
        samples.append(a[: rng.randint(0, len(a))] + b[rng.randint(0, len(b)) :])
    assert abs(self_bleu_tokens(samples) - nltk_self_bleu(samples)) < 1e-12


# --- empty inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: bleu([], ["a b c d"]), "hypotheses"),
        (lambda: bleu(["a b c d"], []), "references"),
        (lambda: bleu_tokens([], [["a"]]), "hypotheses"),
        (lambda: bleu_tokens([["a"]], []), "references"),
        (lambda: self_bleu([]), "samples"),
        (lambda: self_bleu(["only one sample here"]), "samples"),
        (lambda: unigram_entropy([]), "texts"),
        (lambda: token_entropy([]), "sequences"),
        (lambda: distinct_n([], 2), "texts"),
        (lambda: generation_metrics([], ["a b c d"]), "samples"),
        (lambda: generation_metrics(["a b c d"], []), "references"),
        (lambda: generation_metrics(["a b c d"], ["a b c d"], []), "self_bleu_samples"),
    ],
)
def test_every_empty_input_raises_value_error_naming_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


# --- entropy, distinct-n, perplexity ---------------------------------------------------------


def test_unigram_entropy_is_exact_on_tiny_cases():
    assert unigram_entropy(["a a a a"]) == 0.0
    # in bits (nats labelled bits would be wrong): four equally likely words = 2 bits
    assert unigram_entropy(["a b", "c d"]) == pytest.approx(2.0, abs=1e-15)
    # counts a:2 b:1 c:1 -> -(1/2 log2 1/2 + 2 * 1/4 log2 1/4) = 1.5 bits
    assert unigram_entropy(["A a", "b c"]) == pytest.approx(1.5, abs=1e-15)


def test_token_entropy_counts_ids_like_words():
    assert token_entropy([[1, 1], [2, 3]]) == pytest.approx(1.5, abs=1e-15)
    assert token_entropy([[]]) == 0.0


def test_distinct_n_is_exact_on_tiny_cases():
    texts = ["a b a b", "a b c"]
    assert distinct_n(texts, 1) == 3 / 7  # {a, b, c} of 7 tokens
    assert distinct_n(texts, 2) == 3 / 5  # {ab, ba, bc} of ab ba ab | ab bc
    assert distinct_n(texts, 3) == 3 / 3  # aba bab | abc
    assert distinct_n(texts, 4) == 1 / 1
    assert distinct_n(["a b"], 3) == 0.0  # no sample long enough


def test_perplexity_exponentiates_mean_nll_and_rejects_nonpositive_counts():
    assert perplexity(2 * math.log(10), 2) == pytest.approx(10.0, rel=1e-15)
    assert perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError, match="count"):
        perplexity(1.0, 0)


# --- bundle ----------------------------------------------------------------------------------


def test_generation_metrics_uses_the_disjoint_set_for_self_bleu_when_given():
    samples, second = HYPOTHESES[:10], HYPOTHESES[10:]
    out = generation_metrics(samples, LM1B_REFERENCES, self_bleu_samples=second)
    assert out["bleu"] == bleu(samples, LM1B_REFERENCES)
    assert out["self_bleu"] == self_bleu(second)
    assert out["self_bleu_disjoint"] is True
    assert out["num_self_bleu_samples"] == 10
    assert out["unigram_entropy_bits"] == unigram_entropy(samples)
    for n in (1, 2, 3, 4):
        assert out[f"distinct_{n}"] == distinct_n(samples, n)
    assert out["mean_length_words"] == sum(len(normalize_words(s)) for s in samples) / 10


def test_generation_metrics_falls_back_to_the_samples_for_self_bleu():
    out = generation_metrics(HYPOTHESES, LM1B_REFERENCES)
    assert out["self_bleu"] == self_bleu(HYPOTHESES)
    assert out["self_bleu_disjoint"] is False
    assert out["num_samples"] == len(HYPOTHESES) and out["num_references"] == len(LM1B_REFERENCES)


def test_dbert_evaluate_prints_what_each_bleu_counts_and_flags_a_non_measurement():
    from pipeline.eval.report import summary_lines

    summary = {
        "bound.ppl_token_mean": 500.0,
        "bound.num_tokens": 70,
        "bound.num_words": 60,
        "bound.num_truncated": 1,
        "generation.bleu": 0.06,
        "generation.bleu_p4": 0.01,
        "generation.bleu_measured": 1.0,
        "generation.self_bleu": 1e-78,
        "generation.self_bleu_p4": 0.0,
        "generation.self_bleu_measured": 0.0,
        "generation.num_samples": 128,
        "generation.num_references": 6119,
        "generation.num_self_bleu_samples": 128,
    }
    text = "\n".join(summary_lines(summary))
    assert "70 content WordPieces, 60 words (1 test lines cut" in text
    assert "generation.bleu: 0.0600 (mean of 128 per-sample BLEU-4, each against 6119 test lines" in text
    bleu_line, self_line = text.splitlines()[-2:]
    assert "NOT A MEASUREMENT" not in bleu_line
    assert "against the other 127 samples" in self_line and "NOT A MEASUREMENT" in self_line
