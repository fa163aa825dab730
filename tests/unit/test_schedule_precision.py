"""Reveal chances to the last digit: every schedule's masked chance 1 - alpha and reveal chance a(v)
are computed without cancellation, checked against mpmath at 50 digits where alpha rounds to 1
(the power schedule at large gamma, the spindle at its cap near t = 0), and ReMDM's sigma and a'
likewise."""

from __future__ import annotations

import mpmath
import pytest
import torch

from pipeline.diffusion.reverse import remdm_probabilities
from pipeline.diffusion.schedules import PowerSchedule, SpindleSchedule, max_spindle_lambda
from pipeline.vocab import SCHEDULES
from tests.support.toy import toy_schedule

mpmath.mp.dps = 50
H = torch.tensor([-1.0, -0.3, 0.0, 0.5, 1.0], dtype=torch.float64)


def _steps(step: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(t [1], s [1]) float64 tensors of one step t -> s."""
    t, s = step
    return torch.tensor([float(t)], dtype=torch.float64), torch.tensor([float(s)], dtype=torch.float64)


# The masked chances 1 - alpha at 50 digits (mpmath's exponent range holds (1/2048)^403 = 1e-1334).
def _mp_power_masked(s: mpmath.mpf, h: float, gamma: float) -> mpmath.mpf:
    return s ** mpmath.exp(-gamma * mpmath.mpf(h))


def _mp_spindle_masked(s: mpmath.mpf, h: float, lam: float) -> mpmath.mpf:
    return s + mpmath.mpf(lam) * mpmath.sin(mpmath.pi * s) * mpmath.mpf(h)


def _mp_reveal(masked, t: int, s: int, T: int) -> float:
    """(alpha_s - alpha_t) / (1 - alpha_t) = (m_t - m_s) / m_t."""
    m_t, m_s = masked(mpmath.mpf(t) / T), masked(mpmath.mpf(s) / T)
    return float((m_t - m_s) / m_t)


@pytest.mark.parametrize("name", SCHEDULES)
def test_every_schedule_s_masked_chance_is_one_minus_alpha_and_its_reveal_chance_the_posterior(name):
    T = 100
    schedule = toy_schedule(name, T)
    ids = torch.tensor([[1, 4, 5, 6, 2]])
    context = (ids, torch.tensor([[False, True, True, True, False]])) if schedule.token_dependent else None
    t = torch.arange(T + 1, dtype=torch.float64)
    assert torch.allclose(
        schedule.masked_vocab(t, context) + schedule.alpha_vocab(t, context),
        torch.ones(1, dtype=torch.float64),
        atol=1e-12,
    )
    for t_step, s_step in ((100, 99), (50, 40), (7, 6), (1, 0)):
        tt, ss = _steps((t_step, s_step))
        a_t, a_s = schedule.alpha_vocab(tt, context), schedule.alpha_vocab(ss, context)
        naive = (a_s - a_t) / (1 - a_t)  # well conditioned at these steps
        assert torch.allclose(schedule.reveal_probability(tt, ss, context), naive, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.5, 3.0, 6.0])
@pytest.mark.parametrize("step", [(100, 99), (3, 2), (1, 0), (2048, 2047), (1000, 500), (40, 1)])
def test_power_reveal_chance_is_exact_where_alpha_rounds_to_one(gamma, step):
    """gamma 3, T 2048, 100 -> 99, h = -1: alpha_t = 1 - 1e-26 is 1 in float64, so
    (alpha_s - alpha_t) / (1 - alpha_t) comes out as 1; the exact value is 1 - 0.99^e^3 = 0.1828."""
    T = 2048
    schedule = PowerSchedule(T, H, gamma)
    ours = schedule.reveal_probability(*_steps(step))[0]
    for v, h in enumerate(H.tolist()):
        exact = _mp_reveal(lambda s, h=h: _mp_power_masked(s, h, gamma), *step, T)
        assert ours[v].item() == pytest.approx(exact, rel=1e-12, abs=1e-300), (v, h)
    if gamma == 3.0 and step == (100, 99):
        assert ours[0].item() == pytest.approx(0.18279589424, rel=1e-10)


@pytest.mark.parametrize("step", [(1, 0), (2, 1), (5, 4), (1024, 1023), (2048, 2047)])
def test_spindle_reveal_chance_is_exact_at_its_cap_near_t_zero(step):
    """At the monotonicity cap lambda = 1 / (T sin(pi/T)) the most informative id's masked chance
    near t = 0 is s (1 - lambda pi) + ..., about 1e-10 at T = 2048: 1 - alpha keeps ~6 digits of it."""
    T = 2048
    lam = max_spindle_lambda(T)
    schedule = SpindleSchedule(T, H, lam)
    ours = schedule.reveal_probability(*_steps(step))[0]
    for v, h in enumerate(H.tolist()):
        exact = _mp_reveal(lambda s, h=h: _mp_spindle_masked(s, h, lam), *step, T)
        assert ours[v].item() == pytest.approx(exact, rel=1e-8), (v, h)


@pytest.mark.parametrize("eta", [0.05, 1.0])
@pytest.mark.parametrize("step", [(100, 99), (1500, 1400), (2048, 2047)])
def test_remdm_sigma_is_the_cap_and_its_reveal_chance_keeps_the_marginal_exactly(eta, step):
    """ReMDM-cap: sigma = min(eta, (1 - alpha_s) / alpha_t) and a' = (alpha_s - (1 - sigma) alpha_t) /
    (1 - alpha_t), against mpmath on the power schedule at gamma 3 (alpha_t rounds to 1 for h = -1)."""
    T, gamma = 2048, 3.0
    schedule = PowerSchedule(T, H, gamma)
    reveal, sigma = remdm_probabilities(schedule, *_steps(step), eta)
    for v, h in enumerate(H.tolist()):
        m_t = _mp_power_masked(mpmath.mpf(step[0]) / T, h, gamma)
        m_s = _mp_power_masked(mpmath.mpf(step[1]) / T, h, gamma)
        a_t, a_s = 1 - m_t, 1 - m_s
        exact_sigma = min(mpmath.mpf(eta), m_s / a_t) if a_t > 0 else mpmath.mpf(eta)  # t = T: all masked
        exact_reveal = (a_s - (1 - exact_sigma) * a_t) / m_t
        assert sigma[v].item() == pytest.approx(float(exact_sigma), rel=1e-12), (v, h)
        assert reveal[v].item() == pytest.approx(float(exact_reveal), rel=1e-10), (v, h)
        # the point of a': masked at s with chance 1 - alpha_s, as in the forward process
        stay_masked = m_t * (1 - exact_reveal) + a_t * exact_sigma
        assert float(stay_masked) == pytest.approx(float(m_s), rel=1e-12)
