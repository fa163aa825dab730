"""The conditional bound -log p(hidden | shown) on the enumerable toy world: it is an upper bound
on the model chain's exact conditional NLL, `sequence_bound(hidden=...)` estimates it without
bias, and the task spans and span scores of the conditional evaluation."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pipeline.data.tokenize import TokenizedSplit
from pipeline.diffusion.loss import position_kl, sequence_bound, subs_log_probs
from pipeline.diffusion.schedules import grid_for_steps
from pipeline.eval.conditional import HiddenSpan, conditional_bound, hidden_span, span_fill_quality, task_set
from tests.support.toy import DATA_PROBS, MASK, PAIRS, SPECIAL, VOCAB, BayesDenoiser, as_mask, sequence, toy_schedule


class ConditionalBayes:
    """Bayes-optimal for the conditional process: shown tokens are given (never noised), so the
    posterior of a [MASK] is p_data(x0 | shown) reweighted by q(masked at t | x0)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def __call__(self, x_t, attention_mask, s, positions):
        t = torch.tensor([float(s[0]) * self.schedule.num_timesteps], dtype=torch.float64)
        post = torch.zeros(2, VOCAB, dtype=torch.float64)
        for pair, p in zip(PAIRS, DATA_PROBS):
            x0 = sequence(pair)[None, :]
            alpha = self.schedule.alpha(t, x0)[0]
            like = float(p)
            for i in (1, 2):
                if x_t[0, i] == MASK:
                    like *= float(1 - alpha[i])
                elif x_t[0, i] != x0[0, i]:
                    like = 0.0
            post[0, pair[0]] += like
            post[1, pair[1]] += like
        logits = torch.full((x_t.shape[1], VOCAB), -30.0, dtype=torch.float64)
        for i in (1, 2):
            logits[i] = torch.log(post[i - 1].clamp_min(1e-300))
        return logits[as_mask(positions, x_t.shape)[0]].float()


def _one_hidden(pair, hidden: int):
    x0 = sequence(pair)[None, :]
    masked = torch.zeros_like(x0, dtype=torch.bool)
    masked[0, hidden] = True
    return x0, masked, torch.where(masked, torch.full_like(x0, MASK), x0)


def exact_conditional_bound(denoiser, schedule, pair, hidden: int, grid) -> float:
    """sum over steps of q(position `hidden` masked at t | x0) * its KL term; the other stays shown."""
    x0, masked, x_t = _one_hidden(pair, hidden)
    context = (x0, x0 > 3) if schedule.token_dependent else None
    total = 0.0
    for t_step, s_step in itertools.pairwise(grid):
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        alpha = float(schedule.alpha(t, x0, x0 > 3)[0, hidden])
        reveal = schedule.reveal_probability(t, torch.full_like(t, float(s_step)), context)
        logits = denoiser(x_t, x0 != 0, t.float() / schedule.num_timesteps, masked)
        lp = subs_log_probs(logits, SPECIAL.forbidden_outputs).double()
        total += (1 - alpha) * float(position_kl(lp, x0[masked], reveal.double()).sum())
    return total


def exact_conditional_nll(denoiser, schedule, pair, hidden: int, grid) -> float:
    """-log P(the model's chain over the one hidden position ends at its true token)."""
    x0, masked, x_t = _one_hidden(pair, hidden)
    still_masked, hit = 1.0, 0.0
    for t_step, s_step in itertools.pairwise(grid):
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        a = schedule.reveal_probability(t, torch.full_like(t, float(s_step)))[0].double()  # [V] or [1]
        logits = denoiser(x_t, x0 != 0, t.float() / schedule.num_timesteps, masked)
        p = subs_log_probs(logits, SPECIAL.forbidden_outputs).double().exp()[0]  # [V]
        a = a.expand_as(p)
        hit += still_masked * float(p[x0[0, hidden]] * a[x0[0, hidden]])
        still_masked *= float((p * (1 - a)).sum())
    return -math.log(hit)


def data_conditional(pair, hidden: int) -> float:
    shown = 0 if hidden == 2 else 1  # pair index of the shown token
    joint = {p: float(w) for p, w in zip(PAIRS, DATA_PROBS)}
    marginal = sum(w for p, w in joint.items() if p[shown] == pair[shown])
    return joint[pair] / marginal


@pytest.mark.parametrize("name", ["linear", "cosine", "spindle", "power"])
@pytest.mark.parametrize("num_steps", [6, 3])
@pytest.mark.parametrize("hidden", [1, 2])
def test_conditional_bound_is_at_least_the_exact_conditional_nll(name, num_steps, hidden):
    schedule = toy_schedule(name, 6)
    grid = grid_for_steps(6, num_steps)
    for denoiser in (BayesDenoiser(schedule), ConditionalBayes(schedule)):  # unconditional- and conditional-optimal
        gaps = []
        for pair in PAIRS:
            bound = exact_conditional_bound(denoiser, schedule, pair, hidden, grid)
            nll = exact_conditional_nll(denoiser, schedule, pair, hidden, grid)
            gaps.append(bound - nll)
            if isinstance(denoiser, ConditionalBayes):  # its chain draws the data's conditional, on any grid
                assert nll == pytest.approx(-math.log(data_conditional(pair, hidden)), abs=1e-5)
        assert min(gaps) >= -1e-6, gaps


@pytest.mark.parametrize("hidden", [1, 2])
def test_sequence_bound_with_hidden_positions_estimates_the_exact_conditional_bound(hidden):
    schedule = toy_schedule("spindle", 6)
    denoiser = BayesDenoiser(schedule)
    grid = grid_for_steps(6, 6)
    pair = PAIRS[4]
    x0 = sequence(pair)[None, :].repeat(400, 1)
    mask = torch.zeros_like(x0, dtype=torch.bool)
    mask[:, hidden] = True
    estimates = sequence_bound(
        denoiser, x0, x0 != 0, schedule, SPECIAL, grid, torch.Generator().manual_seed(0), hidden=mask
    )
    exact = exact_conditional_bound(denoiser, schedule, pair, hidden, grid)
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) < 4 * stderr + 1e-6


def test_hidden_spans_show_and_hide_something_and_never_cut_a_word():
    plain = np.zeros(100, dtype=bool)
    continuation = plain.copy()
    continuation[50] = True  # id 50 is a ##piece
    assert hidden_span([10, 11, 12, 13], "prefix", plain) == HiddenSpan(2, 4)
    assert hidden_span([10, 11, 12, 13, 14, 15], "infill", plain) == HiddenSpan(2, 4)
    assert hidden_span([10, 11, 50, 13], "prefix", continuation) == HiddenSpan(3, 4)  # not inside "11 ##50"
    assert hidden_span([10], "prefix", plain) is None
    assert hidden_span([10, 11], "infill", plain) is None
    with pytest.raises(ValueError, match="unknown task"):
        hidden_span([10, 11], "sideways", plain)


def test_conditional_bound_counts_hidden_tokens_and_fractional_words():
    ids = np.array([1, 4, 5, 6, 5, 2, 1, 6, 2], dtype=np.int32)  # a 4-piece and a 1-piece sentence
    split = TokenizedSplit(ids, np.array([0, 6, 9]), np.array([2, 1], dtype=np.int32))
    tasks = task_set(split, "prefix", np.zeros(7, dtype=bool))
    assert tasks.index == [0] and tasks.spans == [HiddenSpan(2, 4)]
    schedule = toy_schedule("linear", 6)
    report = conditional_bound(BayesDenoiser(schedule), split, tasks, schedule, SPECIAL, num_steps=6, seeds=(0, 1))
    assert report["num_hidden_tokens"] == 2 and report["num_hidden_words"] == 1.0  # 2 of 4 pieces of 2 words
    assert report["ppl_word_mean"] > report["ppl_token_mean"] > 1.0


def test_span_scores_are_perfect_for_the_truth_and_fall_for_wrong_fills():
    def decode(ids):
        return " ".join(f"w{i}" for i in ids)

    truth = [[1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert span_fill_quality(truth, truth, decode) == {"token_accuracy": 1.0, "span_bleu": 1.0, "num_spans": 2}
    wrong = span_fill_quality(truth, [[1, 2, 0, 0], [0, 0, 0, 0, 0]], decode)
    assert wrong["token_accuracy"] == pytest.approx(2 / 9) and wrong["span_bleu"] < 0.5


def test_gap_length_follows_the_length_prior_when_the_model_ignores_context():
    """A context-blind denoiser scores the shown words the same whatever the gap: the choice is
    the length prior's mode (L = 5 -> a gap of 2 between 3 shown words)."""
    from pipeline.generation.gap_length import choose_gap_length, gap_length_scores
    from tests.support.toy import CLS, SEP, ConstantDenoiser

    prior = np.log(np.array([1e-9, 0.05, 0.05, 0.1, 0.1, 0.6, 0.1]))
    scores = gap_length_scores(
        ConstantDenoiser(torch.tensor([0, 0, 0, 0, 0.2, 0.5, 0.3])), toy_schedule("linear", 8), SPECIAL, CLS, SEP,
        [4, 5], [6], [1, 2, 3], prior, num_steps=8, seeds=(0, 1),
    )  # fmt: skip
    assert choose_gap_length(scores) == 2
    shown = {n: scores[n] + prior[3 + n] for n in scores}  # the bound part alone
    assert max(shown.values()) - min(shown.values()) < 0.5 and all(math.isfinite(v) for v in shown.values())


def test_gap_length_scores_only_the_shown_words():
    """Held at [MASK] in every step, the gap never enters the bound: the bound part of the score
    of the Bayes denoiser's world is that of the one shown word."""
    from pipeline.generation.gap_length import gap_length_scores
    from tests.support.toy import CLS, SEP

    schedule = toy_schedule("linear", 6)
    flat = np.log(np.full(4, 0.25))
    scores = gap_length_scores(BayesDenoiser(schedule), schedule, SPECIAL, CLS, SEP, [5], [], [1], flat, num_steps=6)
    assert math.isfinite(scores[1]) and scores[1] > -math.log(0.25)
    with pytest.raises(ValueError, match="shown words"):
        gap_length_scores(BayesDenoiser(schedule), schedule, SPECIAL, CLS, SEP, [], [], [1], flat)
