"""Judge-model metrics: gen-PPL against a hand-computed NLL, entropies, windows, off/unavailable.

The judge is a one-layer GPT-2 with a word-level tokenizer built here and saved to a folder, so
`load_judge` goes through the real Auto classes offline.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.eval.judge import JudgeUnavailable, generative_perplexity, judge_metrics, load_judge, windows

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "b", "c", "d"]
EOT = "<|endoftext|>"
N_POSITIONS = 8


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {EOT: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=EOT, eos_token=EOT, unk_token="[UNK]")
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=1, n_head=2, n_embd=16, vocab_size=len(vocab), n_positions=N_POSITIONS, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("judge")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def judge(judge_dir: Path) -> tuple[object, object]:
    return load_judge(str(judge_dir))


def _hand_nll(model: object, ids: list[int]) -> float:
    """Summed -log p(ids[i] | ids[:i]) for i >= 1, one position at a time from the model's logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # type: ignore[operator]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return -sum(float(logp[i - 1, ids[i]]) for i in range(1, len(ids)))


def test_gen_ppl_is_exp_of_mean_nll_with_bos_prepended_so_every_text_token_is_scored(judge):
    model, tokenizer = judge
    texts = ["the cat sat on the mat", "a dog ran"]
    out = generative_perplexity(texts, model, tokenizer, batch_size=2)
    ids = [[0, *tokenizer(t, add_special_tokens=False)["input_ids"]] for t in texts]
    nll = sum(_hand_nll(model, i) for i in ids)
    assert out["num_tokens"] == 6 + 3
    assert out["num_samples"] == 2
    assert out["gen_ppl"] == pytest.approx(math.exp(nll / 9), rel=1e-5)


def test_score_eos_adds_one_scored_token_per_sample(judge):
    model, tokenizer = judge
    out = generative_perplexity(["a dog ran"], model, tokenizer, score_eos=True)
    ids = [0, *tokenizer("a dog ran", add_special_tokens=False)["input_ids"], 0]
    assert out["num_tokens"] == 4
    assert out["gen_ppl"] == pytest.approx(math.exp(_hand_nll(model, ids) / 4), rel=1e-5)


def test_batch_size_does_not_change_the_numbers(judge):
    model, tokenizer = judge
    texts = ["the cat sat on the mat", "a dog ran", "cat", "the dog sat on a mat"]
    one = generative_perplexity(texts, model, tokenizer, batch_size=1)
    many = generative_perplexity(texts, model, tokenizer, batch_size=8)
    assert many["gen_ppl"] == pytest.approx(one["gen_ppl"], rel=1e-5)
    assert many["num_tokens"] == one["num_tokens"] == 6 + 3 + 1 + 6


def test_entropy_of_a_repeated_token_is_zero_and_of_n_distinct_tokens_is_log2_n(judge):
    model, tokenizer = judge
    assert generative_perplexity(["a a a a"], model, tokenizer)["token_entropy_bits"] == 0.0
    assert generative_perplexity(["a b c d"], model, tokenizer)["token_entropy_bits"] == pytest.approx(2.0)
    both = generative_perplexity(["a a a a", "a b c d"], model, tokenizer)
    assert both["token_entropy_bits"] == pytest.approx(1.0)  # mean over samples of 0 and 2
    pooled = [5 / 8, 1 / 8, 1 / 8, 1 / 8]  # a x5, b, c, d
    assert both["unigram_entropy_bits"] == pytest.approx(-sum(p * math.log2(p) for p in pooled))


def test_windows_score_every_token_once():
    ids = list(range(11))
    for size in (2, 3, 4, 11, 20):
        targets = [t for w in windows(ids, size) for t in w[1:]]
        assert targets == ids[1:]
        assert all(len(w) <= size for w in windows(ids, size))


def test_a_text_longer_than_the_context_is_scored_in_windows_each_token_once(judge):
    model, tokenizer = judge
    text = " ".join(WORDS + WORDS[:5])  # 16 tokens + BOS, over the 8-position context
    ids = [0, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    out = generative_perplexity([text], model, tokenizer, batch_size=3)
    nll = sum(_hand_nll(model, w) for w in windows(ids, N_POSITIONS))
    assert out["context_size"] == N_POSITIONS
    assert out["num_tokens"] == 16
    assert out["gen_ppl"] == pytest.approx(math.exp(nll / 16), rel=1e-5)
    assert generative_perplexity([text], model, tokenizer, max_length=4)["num_tokens"] == 16


def test_empty_texts_are_skipped_and_counted(judge):
    model, tokenizer = judge
    out = generative_perplexity(["", "a dog ran", "   "], model, tokenizer)
    assert (out["num_samples"], out["num_empty"], out["num_tokens"]) == (1, 2, 3)
    none = generative_perplexity([""], model, tokenizer)
    assert none["gen_ppl"] is None and none["token_entropy_bits"] is None


def test_judge_metrics_records_the_judge_name_and_status(judge_dir: Path):
    out = judge_metrics(["the cat sat", "a dog ran"], str(judge_dir))
    assert out["status"] == "ok"
    assert out["judge"] == str(judge_dir)
    assert out["gen_ppl"] > 1.0 and out["num_tokens"] == 6


def test_an_empty_judge_is_off_without_raising():
    assert judge_metrics(["the cat"], "") == {"judge": None, "gen_ppl": None, "status": "off: evaluate.judge is empty"}
    assert judge_metrics(["the cat"], None)["status"].startswith("off:")


def test_a_missing_judge_is_unavailable_without_raising(tmp_path: Path):
    missing = str(tmp_path / "no-such-judge")
    with pytest.raises(JudgeUnavailable) as raised:
        load_judge(missing)
    assert "\n" not in str(raised.value) and missing in str(raised.value) and "no such folder" in str(raised.value)
    out = judge_metrics(["the cat"], missing)
    assert out["judge"] == missing and out["gen_ppl"] is None
    assert out["status"].startswith("unavailable: ")
