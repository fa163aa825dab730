"""Conditional generation: fixed tokens never change under any sampler, the conditional chain
samples p(gap | fixed) exactly, the confidence sampler's pace and order, and text templates."""

from __future__ import annotations

import pytest
import torch

from pipeline.diffusion.canvas import template_canvas
from pipeline.diffusion.forward import at_positions
from pipeline.diffusion.reverse import confidence, reveal_counts
from pipeline.diffusion.samplers import ancestral_sample, confidence_sample, gibbs_sample
from pipeline.diffusion.schedules import time_grid
from pipeline.generation.sampling import generated_spans
from pipeline.generation.templates import (
    TemplateError,
    check_fits,
    infill_template,
    prompt_template,
    request_from_line,
)
from tests.support.toy import (
    CLS,
    CONTENT,
    DATA_PROBS,
    MASK,
    PAIRS,
    SEP,
    SPECIAL,
    VOCAB,
    BayesDenoiser,
    ConstantDenoiser,
    toy_schedule,
)
from tests.unit.test_samplers import tiny_bert

N = None
# Prefix, suffix, two gaps, a lone gap: content ids 4..6 fixed, None generated.
TEMPLATES = [[4, 4, N, N, N], [N, N, 6, 5], [5, N, 6, N, N, 4], [N], [6, N, 6]]
T = 64


def run(kind: str, denoiser, templates=TEMPLATES, seed: int = 0, **kw):
    """`kind` is a sampler; `resident-<kind>` runs it device-resident (here on the CPU)."""
    if kind.startswith("resident-"):
        kind, kw = kind.removeprefix("resident-"), {**kw, "resident": True}
    canvas = template_canvas(templates, SPECIAL, CLS, SEP)
    schedule = toy_schedule("spindle", T)
    if kind == "gibbs":
        return gibbs_sample(denoiser, None, SPECIAL, CLS, SEP, canvas=canvas, seed=seed, **kw)
    grid = time_grid(T, 16 if kind == "skipping" else 1)
    if kind.startswith("confidence"):
        score = kind.split("-")[1]
        return confidence_sample(
            denoiser, schedule, None, SPECIAL, CLS, SEP, canvas=canvas, grid=grid, seed=seed, score=score, **kw
        )
    remask = 0.5 if kind == "remdm" else 0.0
    return ancestral_sample(
        denoiser, schedule, None, SPECIAL, CLS, SEP, canvas=canvas, grid=grid, seed=seed, cache=kind == "cached",
        remask=remask, **kw,
    )  # fmt: skip


KINDS = [
    "ancestral",
    "cached",
    "skipping",
    "remdm",
    "confidence-prob",
    "confidence-margin",
    "confidence-entropy",
    "gibbs",
    "resident-ancestral",
    "resident-remdm",
    "resident-confidence-prob",
    "resident-confidence-margin",
    "resident-gibbs",
]


@pytest.mark.parametrize("kind", KINDS)
def test_every_sampler_keeps_every_fixed_token_and_fills_every_gap(kind):
    # The model would rather write 5 everywhere: a sampler that touched a fixed 4 or 6 shows.
    out = run(kind, ConstantDenoiser(torch.tensor([0, 0, 0, 0, 0.05, 0.9, 0.05])))
    for row, template in enumerate(TEMPLATES):
        content = out.tokens[row, 1 : len(template) + 1].tolist()
        assert out.tokens[row, 0] == CLS and out.tokens[row, len(template) + 1] == SEP
        for tok, fixed in zip(content, template):
            assert tok == fixed if fixed is not None else tok in CONTENT, (row, content, template)


@pytest.mark.parametrize("kind", KINDS)
def test_a_real_denoiser_never_changes_fixed_tokens_either(kind):
    out = run(kind, tiny_bert().denoise, top_k=3)
    for row, template in enumerate(TEMPLATES):
        fixed = [(i + 1, tok) for i, tok in enumerate(template) if tok is not None]
        assert all(int(out.tokens[row, i]) == tok for i, tok in fixed)
        assert (out.tokens[row, 1 : len(template) + 1] != MASK).all()


@pytest.mark.parametrize("kind", ["confidence-prob", "ancestral"])
def test_caching_stays_exact_with_fixed_tokens(kind):
    model = tiny_bert()
    plain = run(kind, model.denoise, seed=4, top_k=3)
    cached_kind = "cached" if kind == "ancestral" else kind
    canvas = template_canvas(TEMPLATES, SPECIAL, CLS, SEP)
    schedule = toy_schedule("spindle", T)
    if cached_kind == "cached":
        cached = run("cached", model.denoise, seed=4, top_k=3)
    else:
        cached = confidence_sample(
            model.denoise, schedule, None, SPECIAL, CLS, SEP, canvas=canvas, grid=time_grid(T, 1), seed=4, top_k=3,
            cache=True,
        )  # fmt: skip
    assert torch.equal(plain.tokens, cached.tokens)
    gaps = torch.tensor([sum(tok is None for tok in t) for t in TEMPLATES])
    assert (cached.row_calls <= gaps).all()  # a row is recomputed only after one of its gaps changed


@pytest.mark.parametrize("schedule_name", ["linear", "spindle", "power"])
def test_the_conditional_chain_samples_the_exact_conditional_of_the_data(schedule_name):
    """With the Bayes-optimal denoiser and x1 fixed, the ancestral chain over x2 alone must draw
    x2 ~ p_data(x2 | x1): the reveal and token probabilities telescope to it exactly."""
    torch.manual_seed(0)
    schedule = toy_schedule(schedule_name, 8)
    x1, n = 4, 1500
    canvas = template_canvas([[x1, None]] * n, SPECIAL, CLS, SEP)
    out = ancestral_sample(
        BayesDenoiser(schedule), schedule, None, SPECIAL, CLS, SEP, canvas=canvas, grid=time_grid(8, 1), seed=1
    )
    assert (out.tokens[:, 1] == x1).all()
    freq = torch.bincount(out.tokens[:, 2], minlength=VOCAB).double()[list(CONTENT)] / n
    joint = torch.tensor([float(p) for (a, _b), p in zip(PAIRS, DATA_PROBS) if a == x1], dtype=torch.float64)
    assert torch.allclose(freq, joint / joint.sum(), atol=0.045), (freq, joint / joint.sum())


@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
def test_confidence_sampler_reveals_what_the_linear_schedule_expects_each_step(resident):
    # Linear, T = 8, 8 gaps, one step per time step: the chain expects exactly one reveal per step.
    out = confidence_sample(
        ConstantDenoiser(torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3])),
        toy_schedule("linear", 8),
        [8, 8, 8],
        SPECIAL,
        CLS,
        SEP,
        grid=time_grid(8, 1),
        seed=0,
        resident=resident,
    )
    assert out.trace == [3 * m for m in range(7, -1, -1)]


def test_reveal_counts_carry_the_fraction_so_slow_steps_still_reveal():
    owed = torch.zeros(1, dtype=torch.float64)
    counts = [int(reveal_counts(torch.tensor([10]), torch.tensor([0.3]), owed, last_step=False)[0]) for _ in range(10)]
    assert sum(counts) == 3 and max(counts) == 1  # rounding each step alone would give 0 every time
    assert int(reveal_counts(torch.tensor([7]), torch.tensor([0.1]), owed, last_step=True)[0]) == 7


def test_confidence_sampler_reveals_the_surest_position_first():
    class PeakedAtThree:
        """Sure (p = 0.98) at content position 3, unsure (flat) everywhere else."""

        def __call__(self, x_t, attention_mask, s, positions):
            logits = torch.zeros(*x_t.shape, VOCAB)
            logits[:, :, list(CONTENT)] = 0.0
            logits[:, 3, 5] = 6.0
            return at_positions(logits, positions)

    out = confidence_sample(
        PeakedAtThree(), toy_schedule("linear", 8), [8], SPECIAL, CLS, SEP, grid=time_grid(8, 1), seed=0
    )
    assert out.trace[0] == 7 and out.tokens[0, 3] == 5  # the one reveal of step one is position 3
    # ... which the first step fixed: every later call saw position 3 already revealed.


def test_confidence_scores_rank_a_peaked_distribution_above_a_flat_one():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.34, 0.33, 0.33]])
    drawn = torch.tensor([0, 0])
    for score in ("prob", "margin", "entropy"):
        sure = confidence(probs, drawn, score)
        assert sure[0] > sure[1], score
    with pytest.raises(ValueError, match="unknown confidence score"):
        confidence(probs, drawn, "vibes")


def test_a_canvas_that_fixes_a_special_token_or_has_no_gap_is_refused():
    with pytest.raises(ValueError, match="special token"):
        template_canvas([[4, SEP, None]], SPECIAL, CLS, SEP)
    with pytest.raises(ValueError, match="nothing to generate"):
        template_canvas([[4, 5]], SPECIAL, CLS, SEP)
    with pytest.raises(ValueError, match="special token"):
        template_canvas([[MASK, None]], SPECIAL, CLS, SEP)


def test_generated_spans_are_the_maximal_runs_of_gaps():
    assert generated_spans([N, N, 4, N, 5, N, N]) == [(0, 2), (3, 4), (5, 7)]
    assert generated_spans([4, 5, N]) == [(2, 3)]


@pytest.fixture(scope="module")
def tokenizer():
    from pipeline.model.loading import load_tokenizer

    return load_tokenizer("default")


def test_infill_marks_one_wordpiece_per_mask_and_n_per_mask_star_n(tokenizer):
    request = infill_template(tokenizer, "the [MASK*3] sat on the [MASK] .")
    words = tokenizer("the", add_special_tokens=False)["input_ids"]
    assert request.kind == "infill"
    assert list(request.template[:4]) == [*words, N, N, N]
    assert request.template.count(None) == 4
    assert request.template[-1] == tokenizer.convert_tokens_to_ids(".")


def test_a_prompt_is_followed_by_length_gaps(tokenizer):
    request = prompt_template(tokenizer, "the president said", 5)
    assert request.template[-5:] == (N,) * 5 and None not in request.template[:-5]
    assert request_from_line(tokenizer, "a [MASK] b").kind == "infill"
    assert request_from_line(tokenizer, "a b", 3).template[-3:] == (N, N, N)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda tok: infill_template(tok, "no gap here"), "has no gap"),
        (lambda tok: infill_template(tok, "zero [MASK*0] here"), "asks for no WordPiece"),
        (lambda tok: infill_template(tok, "odd [MASK*x] here"), "malformed"),
        (lambda tok: prompt_template(tok, "", 4), "empty"),
        (lambda tok: prompt_template(tok, "hi", 0), "at least 1"),
        (lambda tok: prompt_template(tok, "a [MASK] b", 3), "infill template instead"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(tokenizer, make, match):
    with pytest.raises(TemplateError, match=match):
        make(tokenizer)


def test_a_request_longer_than_the_window_is_refused_by_number(tokenizer):
    with pytest.raises(TemplateError, match="request 2 needs 12 WordPieces"):
        check_fits([prompt_template(tokenizer, "hi", 2), prompt_template(tokenizer, "hi", 11)], 10)


@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_remdm_keeps_the_forward_marginals_whatever_its_budget(eta, resident):
    """ReMDM's point: with remasking, a position is still [MASK] at step s with probability
    1 - alpha_s, as in the forward process (the reveal chance a' compensates sigma)."""
    T, n, rows = 8, 4, 3000
    out = ancestral_sample(
        ConstantDenoiser(torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3])),
        toy_schedule("linear", T),
        [n] * rows,
        SPECIAL,
        CLS,
        SEP,
        grid=time_grid(T, 1),
        seed=0,
        remask=eta,
        resident=resident,
    )
    masked_share = torch.tensor(out.trace, dtype=torch.float64) / (n * rows)
    expected = torch.arange(T - 1, -1, -1, dtype=torch.float64) / T  # 1 - alpha_s = s / T
    assert torch.allclose(masked_share, expected, atol=0.015), (masked_share, expected)


class _CanvasRecorder(ConstantDenoiser):
    """A constant denoiser that keeps the step and canvas of every call (x before each step)."""

    def __init__(self, probs: torch.Tensor, num_timesteps: int) -> None:
        super().__init__(probs)
        self.num_timesteps = num_timesteps
        self.calls_seen: list[tuple[int, torch.Tensor]] = []

    def __call__(self, x_t, attention_mask, s, positions):
        self.calls_seen.append((round(float(s[0]) * self.num_timesteps), x_t.clone()))
        return super().__call__(x_t, attention_mask, s, positions)


@pytest.mark.parametrize("resident", [False, True], ids=["host", "resident"])
@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_remdm_remasks_each_position_as_often_as_its_sigma_says(eta, resident):
    """ReMDM-cap's sigma = min(eta, (1 - alpha_s) / alpha_t) sets how often a generated token goes
    back to [MASK]: a position is generated before step t -> s with chance alpha_t (the forward
    marginal), so it is sent back sum_t alpha_t sigma(t, s) times on average. Linear, T = 8:
    1.5 at eta = 1 and 0.6875 at eta = 0.3. A smaller sigma with a' recomputed from it would keep
    the marginals (the test above) and lower this.

    Counted from the canvases the model is shown, one long row per chain (every call shows the whole
    row): a token generated at the call before step t and [MASK] at the call before step t - 1 was
    sent back at step t. The rows are long enough that every step but the last has a call (and the
    last has none only when nothing went back to [MASK] before it)."""
    T, n, chains = 8, 40, 60
    remasks = 0
    for seed in range(chains):
        model = _CanvasRecorder(torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3]), T)
        ancestral_sample(
            model, toy_schedule("linear", T), [n], SPECIAL, CLS, SEP,
            grid=time_grid(T, 1), seed=seed, remask=eta, resident=resident,
        )  # fmt: skip
        steps = [t for t, _ in model.calls_seen]
        # a call before every step up to the last one (none before 1 -> 0 only when nothing is masked)
        assert steps == list(range(T, T - len(steps), -1)) and len(steps) >= T - 1
        masked = torch.stack([x for _, x in model.calls_seen]) == SPECIAL.mask  # [calls, 1, L]
        remasks += int((~masked[:-1] & masked[1:]).sum())  # generated before step t, [MASK] after it
    alpha = lambda t: 1 - t / T  # noqa: E731
    expected = sum(alpha(t) * min(eta, (1 - alpha(t - 1)) / alpha(t)) for t in range(T - 1, 0, -1))
    assert expected == pytest.approx({1.0: 1.5, 0.3: 0.6875}[eta])
    assert remasks / (n * chains) == pytest.approx(expected, abs=0.08)


def test_remdm_sends_tokens_back_and_costs_more_calls_when_cached():
    model = tiny_bert()
    schedule = toy_schedule("spindle", T)
    common = dict(grid=time_grid(T, 1), seed=2, cache=True, top_k=3)
    plain = ancestral_sample(model.denoise, schedule, [6] * 4, SPECIAL, CLS, SEP, **common)
    remdm = ancestral_sample(model.denoise, schedule, [6] * 4, SPECIAL, CLS, SEP, remask=0.5, **common)
    assert any(b > a for a, b in zip(remdm.trace, remdm.trace[1:]))  # some step re-masked more than it revealed
    assert remdm.trace[-1] == 0 and remdm.model_calls > plain.model_calls
    with pytest.raises(ValueError, match="eta must lie in"):
        ancestral_sample(model.denoise, schedule, [3], SPECIAL, CLS, SEP, grid=time_grid(T, 1), remask=1.5)


def test_an_open_gap_is_marked_and_filled_to_the_chosen_length(tokenizer):
    request = infill_template(tokenizer, "the [MASK*?] sat on the mat .")
    words = tokenizer("the", add_special_tokens=False)["input_ids"]
    assert request.auto_gap == len(words) and None not in request.template
    assert request.with_gap(3).template == (*words, N, N, N, *request.template[len(words) :])
    with pytest.raises(TemplateError, match="more than one"):
        infill_template(tokenizer, "[MASK*?] and [MASK*?]")
    with pytest.raises(TemplateError, match="only gap"):
        infill_template(tokenizer, "[MASK*?] and [MASK]")
    with pytest.raises(TemplateError, match="open"):
        check_fits([request], 60)
