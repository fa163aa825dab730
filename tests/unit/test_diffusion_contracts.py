"""Contract tests: every schedule, the loss and the bound, on exactly solvable toy problems."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from pipeline.config import ParamsError, load_params
from pipeline.diffusion.forward import at_positions, content_mask, q_sample, stratified_times
from pipeline.diffusion.loss import (
    diffusion_loss,
    position_kl,
    sequence_bound,
    subs_log_probs,
)
from pipeline.diffusion.schedules import (
    ScheduleError,
    build_schedule,
    grid_for_steps,
    max_spindle_lambda,
    time_grid,
)
from pipeline.vocab import SCHEDULES
from tests.support.toy import (
    CONTENT,
    DATA_PROBS,
    MASK,
    PAIRS,
    SPECIAL,
    VOCAB,
    BayesDenoiser,
    as_mask,
    centred_information,
    sequence,
    toy_schedule,
    unigram_counts,
)

T_VALUES = (1, 6, 100)


def all_content_ids_batch(T: int, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.tensor([[1, 4, 5, 6, 2], [1, 6, 6, 4, 2]])
    return torch.full((2,), float(t), dtype=torch.float64), ids


# ---------------------------------------------------------------- schedule contract
@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", T_VALUES)
class TestEveryScheduleContract:
    def test_alpha_is_one_at_step_zero_and_zero_at_step_T(self, name, T):
        schedule = toy_schedule(name, T)
        for t, expected in ((0, 1.0), (T, 0.0)):
            tt, ids = all_content_ids_batch(T, t)
            alpha = schedule.alpha(tt, ids)
            assert torch.allclose(alpha, torch.full_like(alpha, expected), atol=1e-12)

    def test_alpha_never_increases_with_t_for_any_token(self, name, T):
        schedule = toy_schedule(name, T)
        steps = torch.arange(T + 1, dtype=torch.float64)
        _, ids = all_content_ids_batch(T, 0)
        curves = torch.stack([schedule.alpha(torch.full((2,), float(t)), ids) for t in steps])  # [T+1, 2, L]
        assert (curves[1:] <= curves[:-1] + 1e-12).all()
        assert ((curves >= 0) & (curves <= 1)).all()

    def test_alpha_is_vectorised_over_a_batch_of_times(self, name, T):
        schedule = toy_schedule(name, T)
        ids = torch.tensor([[1, 4, 5, 2]] * 3)
        t = torch.tensor([0.0, T / 2, float(T)], dtype=torch.float64)
        batched = schedule.alpha(t, ids)
        one_by_one = torch.cat([schedule.alpha(t[i : i + 1], ids[i : i + 1]) for i in range(3)])
        assert batched.shape == (3, 4) and torch.equal(batched, one_by_one)

    def test_reveal_probability_is_a_probability_and_one_at_the_last_step(self, name, T):
        schedule = toy_schedule(name, T)
        for t in range(1, T + 1):
            tt = torch.full((1,), float(t), dtype=torch.float64)
            a = schedule.reveal_probability(tt, tt - 1)
            assert ((a >= 0) & (a <= 1)).all()
        a_last = schedule.reveal_probability(torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
        assert torch.allclose(a_last, torch.ones_like(a_last))

    def test_model_posterior_over_tokens_and_mask_sums_to_one(self, name, T):
        schedule = toy_schedule(name, T)
        logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(T))
        probs = subs_log_probs(logits, SPECIAL.forbidden_outputs).exp().double()  # [5, V]
        t = torch.full((1,), float(max(T // 2, 1)), dtype=torch.float64)
        a = schedule.reveal_probability(t, t - 1).expand(5, VOCAB)
        stay = (probs * (1 - a)).sum(-1)
        assert torch.allclose((probs * a).sum(-1) + stay, torch.ones(5, dtype=torch.float64), atol=1e-6)
        assert probs[:, MASK].abs().max() == 0


def test_spindle_lambda_that_breaks_monotonicity_is_refused_with_the_limit_in_the_message():
    limit = max_spindle_lambda(100)
    with pytest.raises(ScheduleError, match="non-monotone"):
        build_schedule("spindle", 100, information=centred_information(), spindle_lambda=limit * 1.01)
    with pytest.raises(ParamsError, match=r"diffusion.spindle_lambda"):
        load_params(None, ["diffusion.spindle_lambda=0.5", "diffusion.num_timesteps=100"])


def test_monotonicity_limit_matches_its_closed_form():
    assert max_spindle_lambda(2) == pytest.approx(0.5)
    assert max_spindle_lambda(10**6) == pytest.approx(1 / math.pi, rel=1e-6)


def test_unknown_schedule_is_refused_by_name():
    with pytest.raises(ScheduleError, match="unknown schedule 'cubic'"):
        build_schedule("cubic", 10)


def test_spindle_with_lambda_zero_equals_linear():
    linear = build_schedule("linear", 50)
    spindle = build_schedule("spindle", 50, information=centred_information(), spindle_lambda=0.0)
    ids = torch.tensor([[1, 4, 5, 6, 2]])
    for t in range(51):
        tt = torch.full((1,), float(t), dtype=torch.float64)
        assert torch.equal(linear.alpha(tt, ids), spindle.alpha(tt, ids))
    x0 = torch.tensor([[1, 4, 5, 6, 6, 2], [1, 5, 4, 6, 2, 0]])
    attn = x0 != 0
    logits_model = _random_logit_model(seed=3)
    lin = diffusion_loss(logits_model, x0, attn, linear, SPECIAL, torch.Generator().manual_seed(7))
    spi = diffusion_loss(logits_model, x0, attn, spindle, SPECIAL, torch.Generator().manual_seed(7))
    assert lin.loss.item() == pytest.approx(spi.loss.item(), rel=1e-6)


def test_spindle_masks_informative_tokens_earlier():
    schedule = toy_schedule("spindle", 100)
    h = centred_information()
    rare, frequent = int(h.argmax()), int(h[list(CONTENT)].argmin()) + CONTENT[0]
    ids = torch.tensor([[rare, frequent]])
    alpha = schedule.alpha(torch.full((1,), 50.0, dtype=torch.float64), ids)[0]
    assert alpha[0] < alpha[1]


def test_step_skipping_grids_run_from_T_to_zero():
    assert time_grid(10, 4) == [10, 6, 2, 0]
    assert grid_for_steps(2048, 128)[:3] == [2048, 2032, 2016] and grid_for_steps(2048, 128)[-1] == 0
    assert len(grid_for_steps(2048, 128)) == 129


# ---------------------------------------------------------------- the KL of PAPER §4
def _brute_force_kl(probs: torch.Tensor, a: torch.Tensor, x0: int) -> float:
    """KL over the V+1 outcomes of x_{t-1} (each token or [MASK]) built as full distributions."""
    q = torch.zeros(VOCAB + 1, dtype=torch.float64)
    q[x0] = a[x0]
    q[-1] = 1 - a[x0]
    p = torch.zeros(VOCAB + 1, dtype=torch.float64)
    p[:VOCAB] = probs * a
    p[-1] = (probs * (1 - a)).sum()
    support = q > 0
    return float((q[support] * (q[support].log() - p[support].log())).sum())


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("step", [(6, 5), (3, 2), (1, 0), (6, 2)])
def test_position_kl_equals_brute_force_kl_over_full_distributions(name, step):
    schedule = toy_schedule(name, 6)
    t, s = (torch.full((1,), float(v), dtype=torch.float64) for v in step)
    context = (torch.tensor([[1, 4, 6, 2]]), torch.tensor([[False, True, True, False]]))
    a = schedule.reveal_probability(t, s, context if schedule.token_dependent else None)[0]
    a = a.expand(VOCAB).double()
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    log_probs = subs_log_probs(logits, SPECIAL.forbidden_outputs)
    x0 = torch.tensor([4, 5, 6])
    table = a[None, :].expand(3, VOCAB) if schedule.token_dependent else a[None, :1].expand(3, 1)
    ours = position_kl(log_probs.double(), x0, table.double())
    for i in range(3):
        expected = _brute_force_kl(log_probs[i].double().exp(), a, int(x0[i]))
        assert ours[i].item() == pytest.approx(expected, abs=1e-9)


def test_linear_schedule_loss_is_one_over_t_weighted_masked_cross_entropy():
    T = 40
    schedule = build_schedule("linear", T)
    x0 = torch.tensor([[1, 4, 5, 6, 6, 5, 2], [1, 5, 4, 6, 2, 0, 0], [1, 6, 6, 6, 6, 4, 2]])
    attn = x0 != 0
    model = _random_logit_model(seed=5)
    out = diffusion_loss(model, x0, attn, schedule, SPECIAL, torch.Generator().manual_seed(1))
    # Replay the same draws to build the expected value independently.
    gen = torch.Generator().manual_seed(1)
    t = stratified_times(3, T, gen)
    x_t, masked = q_sample(x0, t, schedule, content_mask(x0, SPECIAL, attn), MASK, gen)
    log_probs = subs_log_probs(model(x_t, attn, t / T, masked), SPECIAL.forbidden_outputs)
    ce = -log_probs.gather(1, x0[masked][:, None]).squeeze(1)
    weight = (T / t)[masked.nonzero(as_tuple=True)[0]]  # 1 / (t/T)
    expected = (weight * ce).sum() / content_mask(x0, SPECIAL, attn).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_has_a_gradient_and_counts_tokens():
    schedule = toy_schedule("spindle", 20)
    weight = torch.zeros(VOCAB, requires_grad=True)

    def model(x_t, attn, s, positions):
        count = int(positions.sum()) if positions.dtype == torch.bool else positions.numel()
        return weight.expand(count, VOCAB)

    x0 = torch.tensor([[1, 4, 5, 6, 2]] * 8)
    out = diffusion_loss(model, x0, x0 != 0, schedule, SPECIAL, torch.Generator().manual_seed(0), hybrid_lambda=0.01)
    out.loss.backward()
    assert out.num_tokens == 24 and out.num_masked > 0 and weight.grad is not None
    assert torch.isfinite(weight.grad).all()


def _random_logit_model(seed: int):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed))

    def model(x_t, attn, s, positions):  # logits depend on the left neighbour: a real x_t-dependence
        left = torch.roll(x_t, 1, dims=1)
        return at_positions(table[left], positions)

    return model


# ---------------------------------------------------------------- bound >= exact model NLL
def _exact_expected_bound(denoiser, schedule, pair, grid) -> float:
    """sum over chain steps of E_{q(x_t|x0)} [sum_i KL_i], by enumerating every x_t."""
    x0 = sequence(pair)[None, :]
    maskable = content_mask(x0, SPECIAL)
    context = (x0, maskable) if schedule.token_dependent else None
    total = 0.0
    for t_step, s_step in itertools.pairwise(grid):
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        alpha = schedule.alpha(t, x0, maskable)[0]
        reveal = schedule.reveal_probability(t, torch.full_like(t, float(s_step)), context)
        for pattern in itertools.product((False, True), repeat=2):
            masked = torch.tensor([[False, *pattern, False]])
            prob = 1.0
            for i, m in zip((1, 2), pattern):
                prob *= float(1 - alpha[i]) if m else float(alpha[i])
            if prob == 0 or not any(pattern):
                continue
            x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
            logits = denoiser(x_t, x0 != 0, t.float() / schedule.num_timesteps, masked)
            lp = subs_log_probs(logits, SPECIAL.forbidden_outputs).double()
            rows = reveal.expand(int(masked.sum()), -1)
            total += prob * float(position_kl(lp, x0[masked], rows.double()).sum())
    return total


def _exact_model_nll(denoiser, schedule, pair, grid) -> float:
    """-log of the probability that the model's own reverse chain ends at x0 (DP over states)."""
    x0 = sequence(pair)[None, :]
    states = {(True, True): 1.0}  # which content positions are still [MASK]; x_T is all [MASK]
    for t_step, s_step in itertools.pairwise(grid):
        t = torch.full((1,), float(t_step), dtype=torch.float64)
        reveal = schedule.reveal_probability(t, torch.full_like(t, float(s_step)))
        new: dict = {}
        for state, p_state in states.items():
            if not any(state):
                new[state] = new.get(state, 0.0) + p_state
                continue
            masked = torch.tensor([[False, *state, False]])
            x_t = torch.where(masked, torch.full_like(x0, MASK), x0)
            logits = denoiser(x_t, x0 != 0, t.float() / schedule.num_timesteps, masked)
            probs = subs_log_probs(logits, SPECIAL.forbidden_outputs).double().exp()  # [n, V]
            a = reveal.expand(probs.shape[0], VOCAB).double()
            go = (probs * a).gather(1, x0[masked][:, None]).squeeze(1)  # reveal the right token
            stay = (probs * (1 - a)).sum(-1)
            positions = [i for i, m in enumerate(state) if m]
            for choice in itertools.product((False, True), repeat=len(positions)):
                p = p_state
                nxt = list(state)
                for k, revealed in enumerate(choice):
                    p *= float(go[k]) if revealed else float(stay[k])
                    if revealed:
                        nxt[positions[k]] = False
                new[tuple(nxt)] = new.get(tuple(nxt), 0.0) + p
        states = new
    return -math.log(states.get((False, False), 0.0))


@pytest.mark.parametrize("name", ["linear", "cosine", "spindle", "power"])
@pytest.mark.parametrize("num_steps", [6, 3])
def test_bound_is_at_least_the_exact_model_nll_for_every_sequence(name, num_steps):
    schedule = toy_schedule(name, 6)
    denoiser = BayesDenoiser(schedule)
    grid = grid_for_steps(6, num_steps)
    gaps = []
    for pair in PAIRS:
        bound = _exact_expected_bound(denoiser, schedule, pair, grid)
        nll = _exact_model_nll(denoiser, schedule, pair, grid)
        gaps.append(bound - nll)
    assert min(gaps) >= -1e-5, gaps
    assert min(gaps) < 0.05  # a Bayes-optimal denoiser makes the bound nearly tight


def test_average_bound_is_at_least_the_data_entropy():
    schedule = toy_schedule("spindle", 6)
    denoiser = BayesDenoiser(schedule)
    grid = grid_for_steps(6, 6)
    avg = sum(float(p) * _exact_expected_bound(denoiser, schedule, pair, grid) for pair, p in zip(PAIRS, DATA_PROBS))
    entropy = float(-(DATA_PROBS * DATA_PROBS.log()).sum())
    assert avg >= entropy - 1e-5


def test_sequence_bound_is_an_unbiased_estimate_of_the_exact_bound():
    schedule = toy_schedule("spindle", 6)
    denoiser = BayesDenoiser(schedule)
    grid = grid_for_steps(6, 6)
    pair = PAIRS[4]
    x0 = sequence(pair)[None, :].repeat(400, 1)
    estimates = sequence_bound(denoiser, x0, x0 != 0, schedule, SPECIAL, grid, torch.Generator().manual_seed(0))
    exact = _exact_expected_bound(denoiser, schedule, pair, grid)
    stderr = float(estimates.std()) / math.sqrt(len(estimates))
    assert abs(float(estimates.mean()) - exact) < 4 * stderr + 1e-6


def test_sequence_bound_gives_the_same_number_twice_for_the_same_seed():
    schedule = toy_schedule("linear", 6)
    denoiser = BayesDenoiser(schedule)
    x0 = torch.stack([sequence(p) for p in PAIRS])
    runs = [
        sequence_bound(denoiser, x0, x0 != 0, schedule, SPECIAL, grid_for_steps(6, 3), torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_spindle_paper_counts_are_only_used_by_that_schedule():
    schedule = build_schedule("spindle_paper", 10, counts=unigram_counts(), spindle_lambda=0.3)
    assert schedule.leaky and schedule.describe()["leaky"] is True


# ---------------------------------------------------------------- stratified t
def _strata(t: torch.Tensor, T: int, batch: int) -> list[int]:
    return ((t.double() - 1) * batch // T).long().tolist()  # t in (T k / B, T (k+1) / B] -> k


def test_stratified_times_take_every_stratum_once_in_a_random_row_order():
    T, batch = 2048, 64
    gen = torch.Generator().manual_seed(0)
    rows = torch.arange(batch, dtype=torch.float64)
    correlations = []
    for _ in range(40):
        t = stratified_times(batch, T, gen)
        assert sorted(_strata(t, T, batch)) == list(range(batch))  # stratified: one t per stratum
        correlations.append(float(torch.corrcoef(torch.stack([rows, t.double()]))[0, 1]))
    # Batches are length-sorted: row i must not get stratum i (t would track sentence length).
    assert abs(sum(correlations) / len(correlations)) < 0.1, correlations


def test_training_loss_draws_stratified_times_uncorrelated_with_sentence_length():
    T, batch = 600, 24
    schedule = build_schedule("linear", T)
    lengths = torch.arange(batch) % 5 + 1  # content lengths 1..5, then sorted like a bucketed batch
    lengths = lengths.sort().values
    x0 = torch.zeros(batch, 8, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        x0[i, : n + 2] = torch.tensor([1, *([4] * n), 2])  # [CLS] content [SEP]
    seen: list[torch.Tensor] = []

    def model(x_t, attn, s, positions):
        seen.append(s.clone())
        return torch.zeros(int(as_mask(positions, x_t.shape).sum()), VOCAB)

    gen = torch.Generator().manual_seed(3)
    correlations = []
    for _ in range(30):
        diffusion_loss(model, x0, x0 != 0, schedule, SPECIAL, gen)
        t = seen[-1].double() * T
        assert sorted(_strata(t.round(), T, batch)) == list(range(batch))  # every row its own stratum
        correlations.append(float(torch.corrcoef(torch.stack([lengths.double(), t]))[0, 1]))
    assert abs(sum(correlations) / len(correlations)) < 0.15, correlations


def test_power_schedule_is_linear_at_gamma_zero_and_masks_informative_tokens_earlier_without_a_cap():
    from tests.support.toy import centred_information

    h = centred_information()
    linear = build_schedule("linear", 16)
    flat = build_schedule("power", 16, information=h, power_gamma=0.0)
    t = torch.arange(17, dtype=torch.float64)
    assert torch.allclose(flat.alpha_vocab(t), linear.alpha_vocab(t).expand(17, h.numel()))
    strong = build_schedule("power", 16, information=h, power_gamma=3.0)  # far past spindle's 0.318 cap
    alpha = strong.alpha_vocab(t)  # [17, V]
    assert (alpha[1:] <= alpha[:-1] + 1e-12).all()  # monotone for every id
    rare, common = int(h.argmax()), int(h.argmin())
    assert (alpha[1:-1, rare] < alpha[1:-1, common]).all()  # the informative id is masked first
    assert strong.token_spread() > build_schedule("spindle", 16, information=h, spindle_lambda=0.3).token_spread()
    with pytest.raises(ScheduleError, match="power_gamma"):
        build_schedule("power", 16, information=h, power_gamma=-1.0)
