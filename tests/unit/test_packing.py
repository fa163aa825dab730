"""Token-budget batches in packed rows: the same loss as the padded batch of the same sentences,
for every family and time design that takes them, and a clear refusal for the others."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.config import ParamsError, load_params
from pipeline.data.batching import token_budget_batches
from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.loss import bound_loss, cross_entropy_loss
from pipeline.diffusion.noising import noise_for_diffusion, noise_for_mlm
from pipeline.diffusion.packing import first_fit_rows, pack_rows
from pipeline.diffusion.schedules import build_schedule
from pipeline.model.families import UnsupportedDesignError
from tests.unit.test_model_families import T, perturb_time_modules, tiny
from tests.unit.test_train_loop import tiny_data

SENTENCES = [
    "the cat sat on the mat .",
    "stocks fell sharply on monday after the report on jobs",
    "hello there",
    "a much longer sentence about nothing in particular that keeps going for a while",
    "yes",
    "prices rose .",
]
PACKABLE = [(f, d) for f in ("bert", "roberta", "distilbert") for d in ("none", "embedding", "layerwise")]


def padded_batch(tokenizer):
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def noised(tokenizer, seed: int = 0):
    ids, attn = padded_batch(tokenizer)
    special = SpecialIds.from_tokenizer(tokenizer)
    schedule = build_schedule("linear", T)
    return noise_for_diffusion(ids, attn, schedule, special, torch.Generator().manual_seed(seed)), schedule, special


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize(("family", "design"), PACKABLE)
def test_packed_rows_give_the_padded_batchs_loss(family, design, attention, tokenizer):
    model = tiny(family, design, tokenizer)
    perturb_time_modules(model)
    model.mlm.set_attn_implementation(attention)
    batch, schedule, special = noised(tokenizer)
    width = batch.x_t.shape[1]
    packed = pack_rows(batch, row_length=width + 8)  # several sentences share a row
    assert packed.input_ids.shape[0] < batch.x_t.shape[0]
    with torch.no_grad():
        padded_logits = model.denoise(batch.x_t, batch.attention_mask, batch.s_frac, batch.flat_positions)
        packed_logits = model.denoise(
            packed.input_ids,
            None,
            batch.s_frac,
            packed.flat_positions,
            segments=packed.segments,
            position_ids=packed.position_ids,
        )
        torch.testing.assert_close(packed_logits, padded_logits, rtol=1e-5, atol=1e-5)
        want = bound_loss(model.denoise, batch, schedule, special, 0.01)
        got = bound_loss(model.denoise, batch, schedule, special, 0.01, packed)
    assert got.num_masked == want.num_masked > 0 and got.num_tokens == want.num_tokens
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.bound_sum, want.bound_sum, rtol=1e-5, atol=1e-5)


def test_packed_rows_give_the_padded_mlm_loss(tokenizer):
    model = tiny("bert", "none", tokenizer)
    ids, attn = padded_batch(tokenizer)
    special = SpecialIds.from_tokenizer(tokenizer)
    batch = noise_for_mlm(ids, attn, special, torch.Generator().manual_seed(1), mask_prob=0.5)
    packed = pack_rows(batch, row_length=ids.shape[1] + 8)
    with torch.no_grad():
        want = cross_entropy_loss(model.denoise, batch, special)
        got = cross_entropy_loss(model.denoise, batch, special, packed)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_a_sentence_in_a_packed_row_does_not_see_its_neighbours(tokenizer):
    """Change every other sentence of a row: the first sentence's logits do not move."""
    model = tiny("bert", "none", tokenizer)
    batch, _, _ = noised(tokenizer)
    packed = pack_rows(batch, row_length=batch.x_t.shape[1] + 8)
    first_row = packed.segments[0]
    own = int(first_row[0])
    others = (first_row != own) & (first_row > 0)
    assert others.any()
    changed = packed.input_ids.clone()
    changed[0, others] = 1000

    def logits(ids):
        with torch.no_grad():
            return model.denoise(
                ids, None, batch.s_frac, None, segments=packed.segments, position_ids=packed.position_ids
            )[0, first_row == own]

    torch.testing.assert_close(logits(changed), logits(packed.input_ids), rtol=0, atol=0)


@pytest.mark.parametrize(("family", "design"), [("modernbert", "none"), ("bert", "prefix")])
def test_families_and_designs_that_cannot_pack_are_refused_by_name(family, design, tokenizer):
    model = tiny(family, design, tokenizer)
    batch, _, _ = noised(tokenizer)
    packed = pack_rows(batch, row_length=64)
    with pytest.raises(UnsupportedDesignError, match=family if family != "bert" else "prefix"):
        model.denoise(
            packed.input_ids,
            None,
            batch.s_frac,
            packed.flat_positions,
            segments=packed.segments,
            position_ids=packed.position_ids,
        )


def test_pack_rows_places_every_token_once_and_keeps_the_masked_order(tokenizer):
    batch, _, _ = noised(tokenizer, seed=3)
    packed = pack_rows(batch, row_length=40)
    lengths = batch.attention_mask.sum(1)
    assert int((packed.segments > 0).sum()) == int(lengths.sum())
    for b, n in enumerate(lengths.tolist()):
        slots = packed.segments == b + 1
        assert int(slots.sum()) == n
        assert torch.equal(packed.input_ids[slots], batch.x_t[b, :n])
        assert torch.equal(packed.position_ids[slots], torch.arange(n))
    assert torch.equal(packed.input_ids.reshape(-1)[packed.flat_positions], batch.x_t.reshape(-1)[batch.flat_positions])


def test_first_fit_never_overflows_a_row_and_refuses_a_sentence_longer_than_one():
    lengths = np.random.default_rng(0).integers(1, 64, size=500)
    row, offset = first_fit_rows(lengths, 128)
    for r in np.unique(row):
        spans = sorted(zip(offset[row == r], lengths[row == r]))
        ends = [o + n for o, n in spans]
        assert ends[-1] <= 128 and all(e <= o for e, (o, _) in zip(ends, spans[1:]))
    filled = lengths.sum() / ((row.max() + 1) * 128)
    assert filled > 0.95  # only row tails are padding
    with pytest.raises(ValueError, match="does not fit a row of 16"):
        first_fit_rows(np.array([3, 17]), 16)


def test_token_budget_batches_hold_at_most_the_budget_and_every_sentence_once():
    lengths = np.random.default_rng(1).integers(3, 64, size=1000)
    batches = token_budget_batches(lengths, 512, seed=7)
    assert all(lengths[b].sum() <= 512 for b in batches)
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    assert all(lengths[b].sum() + lengths[a[0]] > 512 for b, a in itertools.pairwise(batches))  # greedy fill
    again = token_budget_batches(lengths, 512, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    dropped = token_budget_batches(lengths, 512, seed=7, drop_last=True)
    assert len(dropped) == len(batches) - 1


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.packed=true", "train.tokens_per_batch=4096"], "two different layouts"),
        (["train.tokens_per_batch=4096", "train.row_length=32"], "train.row_length=32"),
        (["train.tokens_per_batch=16"], "train.tokens_per_batch=16"),
        (["train.tokens_per_batch=4096", "train.global_batch_size=64"], "unset train.global_batch_size"),
    ],
)
def test_token_budget_params_that_cannot_work_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ParamsError, match=message):
        load_params("params.yaml", overrides)


def test_training_with_a_token_budget_refuses_a_design_that_cannot_pack_before_any_step(tiny_data):
    from pipeline.train.loop import train_loop
    from tests.unit.test_train_loop import params

    p = params("train.tokens_per_batch=160", "train.row_length=64", "model.time_design=prefix", "train.steps=1")
    with pytest.raises(UnsupportedDesignError, match="prefix"):
        train_loop(p, tiny_data, on_step=lambda step: pytest.fail("a step ran"))
