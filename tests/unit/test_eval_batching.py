"""Evaluation batches sorted by length (half the padding): every result still lands on its own
sentence or request, for the bound, the conditional bound and generation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.batching import sorted_batches
from pipeline.eval.bound import bound_per_sequence
from pipeline.generation.sampling import generate
from tests.support.exports import export_tiny
from tests.support.toy import CLS, SEP, SPECIAL, VOCAB, ConstantDenoiser, toy_schedule


def test_sorted_batches_take_every_index_once_in_rising_length():
    lengths = [5, 1, 9, 3, 3, 7, 2]
    batches = sorted_batches(lengths, 3)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert np.all(np.diff([lengths[i] for i in flat]) >= 0)
    with pytest.raises(ValueError, match="batch_size"):
        sorted_batches(lengths, 0)


def test_the_bound_of_each_sentence_stays_with_that_sentence():
    """Long and short sentences alternate; sorting puts them in different batches. A bound that
    came back in sorted order would hand the long sentences' NLL to the short ones."""
    short, long = 1, 40
    split = [np.array([CLS, *([4] * n), SEP]) for n in [long, short] * 4]
    uniform = torch.full((VOCAB,), 1 / 3)
    uniform[:4] = 1e-9
    nll = bound_per_sequence(
        ConstantDenoiser(uniform / uniform.sum()), split, toy_schedule("linear", 16), SPECIAL, num_steps=8,
        batch_size=2,
    )  # fmt: skip
    assert nll.shape == (8,)
    assert nll[0::2].min() > 10 * nll[1::2].max()  # -log(1/3) per token: ~44 nats against ~1


class SessionEnded(Exception):
    """Stands in for the stop signal (a KeyboardInterrupt would stop pytest itself)."""


def test_a_cut_off_bound_goes_on_from_its_saved_seeds_with_the_same_numbers(tmp_path):
    """perplexity_bound(cache_dir=...): each finished seed is saved; a second call (the evaluation
    resumed) computes only the seeds not saved yet, and the report equals one uninterrupted run."""
    from pipeline.data.tokenize import TokenizedSplit
    from pipeline.eval import bound as bound_module

    sentences = [[CLS, *([4, 5, 6][: 1 + i % 3]), SEP] for i in range(9)]
    ids = np.array([t for s in sentences for t in s], dtype=np.int32)
    offsets = np.cumsum([0] + [len(s) for s in sentences]).astype(np.int64)
    split = TokenizedSplit(ids, offsets, np.array([1 + i % 3 for i in range(9)], dtype=np.int32))
    denoiser = ConstantDenoiser(torch.tensor([1e-9, 1e-9, 1e-9, 1e-9, 0.5, 0.3, 0.2]))
    schedule = toy_schedule("spindle", 16)
    settings = dict(num_steps=4, seeds=(0, 1, 2), batch_size=4)
    whole = bound_module.perplexity_bound(denoiser, split, schedule, SPECIAL, **settings)

    computed: list[int] = []
    real = bound_module.bound_per_sequence

    def counting(*args, seed, **kwargs):
        computed.append(seed)
        if len(computed) == 2 and not (tmp_path / "nll_seed1.npy").exists():
            raise SessionEnded  # the session ends during seed 1
        return real(*args, seed=seed, **kwargs)

    bound_module.bound_per_sequence = counting
    try:
        with pytest.raises(SessionEnded):
            bound_module.perplexity_bound(denoiser, split, schedule, SPECIAL, cache_dir=tmp_path, **settings)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["nll_seed0.npy"]  # no half-written file
        computed.clear()
        progress: list[int] = []
        resumed = bound_module.perplexity_bound(
            denoiser, split, schedule, SPECIAL, cache_dir=tmp_path, progress=progress.append, **settings
        )
    finally:
        bound_module.bound_per_sequence = real
    assert computed == [1, 2]  # seed 0 was read back, not recomputed
    assert sum(progress) == 3 * len(split)  # the bar still counts every seed's sentences
    assert resumed == whole
    np.save(tmp_path / "nll_seed0.npy", np.zeros(4))  # saved for another split: not taken
    assert bound_module.perplexity_bound(denoiser, split, schedule, SPECIAL, cache_dir=tmp_path, **settings) == whole


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from pipeline.model.export import load_exported

    return load_exported(export_tiny(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("sampler", ["ancestral", "confidence", "gibbs"])
def test_generation_returns_each_request_its_own_completion_in_request_order(tiny, sampler):
    model, tokenizer, schedule = tiny
    lengths = [7, 2, 5, 1, 3, 6]
    out = generate(model, tokenizer, schedule, lengths=lengths, steps=4, top_k=5, batch_size=2, sampler=sampler)
    assert [len(ids) for ids in out.content_ids] == lengths
    fixed = 1000  # a content id the tiny vocabulary has
    templates = [[fixed] * n + [None] for n in lengths]
    out = generate(model, tokenizer, schedule, templates=templates, steps=4, top_k=5, batch_size=2, sampler=sampler)
    for template, ids in zip(templates, out.content_ids):
        assert len(ids) == len(template) and ids[:-1] == [fixed] * (len(template) - 1)
