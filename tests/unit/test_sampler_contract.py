"""The one contract every sampler keeps, run over every sampler through its one interface
(`pipeline.diffusion.sampler`), as diffusers tests every scheduler: the output layout, seeds that
repeat, honest model-call counts, top-k of one, fixed canvas tokens never changed, bad options
refused by name before any model call, CPU tokens, and the exact token distribution where the
sampler claims the model's own chain."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.block_sampler import blocks
from pipeline.diffusion.canvas import template_canvas
from pipeline.diffusion.sampler import Sampler, sampler
from pipeline.vocab import SAMPLERS
from tests.support.toy import CLS, CONTENT, MASK, PAD, SEP, SPECIAL, ConstantDenoiser, toy_schedule
from tests.unit.test_samplers import tiny_bert

T = 64
LENGTHS = [3, 1, 5, 4]
# kind -> (sampler name, its options); resident-<kind> runs the device-resident path (on the CPU here)
KINDS = {
    "ancestral": ("ancestral", {"steps": T}),
    "ancestral-cached": ("ancestral", {"steps": T, "cache": True}),
    "ancestral-skipping": ("ancestral", {"steps": 4}),
    "remdm": ("remdm", {"steps": T, "remdm_eta": 0.3}),
    "confidence-prob": ("confidence", {"steps": 8, "confidence_score": "prob"}),
    "confidence-margin": ("confidence", {"steps": 8, "confidence_score": "margin"}),
    "confidence-entropy": ("confidence", {"steps": 8, "confidence_score": "entropy"}),
    "gibbs": ("gibbs", {"gibbs_sweeps": 2}),
}
# blocks-<kind>: <kind> written BLOCK positions at a time in a window of WINDOW (below the longest row)
BLOCK, WINDOW = 2, 3
EVERY = [
    *KINDS,
    *(f"resident-{k}" for k in ("ancestral", "remdm", "confidence-prob", "gibbs")),
    *(f"blocks-{k}" for k in ("ancestral", "remdm", "confidence-prob", "gibbs")),
]
PROBS = torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3])


def build(kind: str, schedule_name: str = "spindle", **options) -> Sampler:
    if kind.startswith("blocks-"):
        return blocks(build(kind.removeprefix("blocks-"), schedule_name, **options), block=BLOCK, window=WINDOW)
    resident = kind.startswith("resident-")
    name, base = KINDS[kind.removeprefix("resident-")]
    return sampler(name, toy_schedule(schedule_name, T), **{**base, **options}, resident=resident or None)


def draw(kind: str, denoiser, seed: int = 0, schedule_name: str = "spindle", canvas=None, **options):
    lengths = None if canvas is not None else LENGTHS
    return build(kind, schedule_name, **options)(denoiser, SPECIAL, CLS, SEP, lengths=lengths, canvas=canvas, seed=seed)


def test_every_sampler_name_has_a_contract_and_only_the_ancestral_chain_claims_exactness():
    assert {name for name, _ in KINDS.values()} == set(SAMPLERS)
    assert {kind for kind in KINDS if build(kind).exact} == {"ancestral", "ancestral-cached", "ancestral-skipping"}


@pytest.mark.parametrize("kind", EVERY)
class TestEverySampler:
    def test_output_is_cls_content_sep_then_padding_as_cpu_long_tokens(self, kind):
        out = draw(kind, tiny_bert().denoise)
        assert out.tokens.device.type == "cpu" and out.tokens.dtype == torch.long
        for row, n in enumerate(LENGTHS):
            seq = out.tokens[row]
            assert seq[0] == CLS and seq[n + 1] == SEP and (seq[n + 2 :] == PAD).all()
            assert all(int(v) in CONTENT for v in seq[1 : n + 1]), seq

    def test_the_same_seed_gives_the_same_tokens_and_another_seed_others(self, kind):
        model = tiny_bert()
        assert torch.equal(draw(kind, model.denoise, seed=3).tokens, draw(kind, model.denoise, seed=3).tokens)
        assert not torch.equal(draw(kind, model.denoise, seed=1).tokens, draw(kind, model.denoise, seed=2).tokens)

    def test_top_k_of_one_always_picks_the_most_likely_token(self, kind):
        out = draw(kind, ConstantDenoiser(PROBS), top_k=1)
        for row, n in enumerate(LENGTHS):
            assert (out.tokens[row, 1 : n + 1] == 5).all()

    def test_it_calls_the_model_as_often_as_it_says(self, kind):
        denoiser = ConstantDenoiser(PROBS)
        out = draw(kind, denoiser)
        assert denoiser.calls == out.model_calls > 0

    def test_fixed_canvas_tokens_are_never_changed(self, kind):
        templates = [[4, None, 6, None], [None, 5, 5], [6, 6, None, None, 4]]
        canvas = template_canvas(templates, SPECIAL, CLS, SEP)
        out = draw(kind, tiny_bert().denoise, canvas=canvas)
        for row, template in enumerate(templates):
            content = out.tokens[row, 1 : len(template) + 1].tolist()
            assert all(got == fixed for got, fixed in zip(content, template) if fixed is not None), (content, template)
            assert MASK not in content and all(v in CONTENT for v in content)

    @pytest.mark.parametrize(
        ("option", "value", "match"),
        [
            ("top_k", -1, "top_k must be an integer >= 0"),
            ("top_p", 0.0, r"top_p must lie in \(0, 1\]"),
            ("top_p", 1.5, r"top_p must lie in \(0, 1\]"),
            ("temperature", 0.0, "temperature must be a finite number > 0"),
            ("temperature", math.inf, "temperature must be a finite number > 0"),
        ],
    )
    def test_bad_truncation_is_refused_by_name_before_any_model_call(self, kind, option, value, match):
        with pytest.raises(ValueError, match=match):
            build(kind, **{option: value})


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("nope", {}, "unknown sampler 'nope'; choose one of ancestral, remdm, confidence, gibbs"),
        ("remdm", {"remdm_eta": 1.5}, r"remdm_eta must lie in \[0, 1\]"),
        ("confidence", {"confidence_score": "luck"}, "unknown confidence score 'luck'"),
        ("gibbs", {"gibbs_sweeps": 0}, "gibbs_sweeps must be an integer >= 1"),
    ],
)
def test_a_sampler_s_own_bad_options_are_refused_by_name(name, options, match):
    with pytest.raises(ValueError, match=match):
        sampler(name, toy_schedule("linear", T), **options)


@pytest.mark.parametrize("kind", ["ancestral", "ancestral-cached", "ancestral-skipping", "resident-ancestral"])
def test_a_sampler_that_claims_the_model_chain_draws_its_exact_token_distribution(kind):
    """With a token-independent schedule and a denoiser that always predicts p, the model's reverse
    chain leaves every position with token v with probability p(v): a chi-square over 4,000 draws
    (3 cells, 2 df: 13.8 is the 0.1% point)."""
    chain = build(kind, "linear")
    assert chain.exact
    out = chain(ConstantDenoiser(PROBS), SPECIAL, CLS, SEP, lengths=[4] * 1000, seed=11)
    tokens = out.tokens[:, 1:5].reshape(-1)
    counts = torch.stack([(tokens == v).sum() for v in CONTENT]).double()
    expected = PROBS[list(CONTENT)].double() * tokens.numel()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts, expected)


class WindowSpy(ConstantDenoiser):
    """A constant denoiser that records the widest canvas it was shown."""

    def __init__(self, probs):
        super().__init__(probs)
        self.widest = 0

    def __call__(self, x, attention_mask, *args, **kwargs):
        self.widest = max(self.widest, int(attention_mask.sum(1).max()))
        return super().__call__(x, attention_mask, *args, **kwargs)


@pytest.mark.parametrize("kind", ["ancestral", "gibbs"])
def test_blocks_never_show_the_model_more_than_its_window_and_write_every_mask(kind):
    spy = WindowSpy(PROBS)
    templates = [[4, 4, 4, 4, 4, None, None, 6, None], [None] * 7]  # a fixed run longer than the window
    canvas = template_canvas(templates, SPECIAL, CLS, SEP)
    out = build(f"blocks-{kind}")(spy, SPECIAL, CLS, SEP, canvas=canvas, seed=0)
    assert spy.widest <= WINDOW + 2  # [CLS] + window + [SEP]
    for row, template in enumerate(templates):
        content = out.tokens[row, 1 : len(template) + 1].tolist()
        assert MASK not in content and all(got == fixed for got, fixed in zip(content, template) if fixed is not None)
    assert out.row_calls.tolist()[1] > out.row_calls.tolist()[0] > 0  # 7 free positions take more blocks than 3


@pytest.mark.parametrize(
    ("block", "window", "match"),
    [
        (0, 3, r"block must lie in 1\.\.3"),
        (4, 3, r"block must lie in 1\.\.3"),
        (1, 0, "window must be an integer >= 1"),
    ],
)
def test_a_bad_block_or_window_is_refused_by_name(block, window, match):
    with pytest.raises(ValueError, match=match):
        blocks(build("ancestral"), block=block, window=window)
