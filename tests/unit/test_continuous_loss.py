"""The continuous-time (MDLM) training loss: its 1/s weight, its token-dependent middle term, and
its agreement with the discrete bound in the limit of small steps. The `mdlm_loglinear_tad` rows
are trained with it, so each of these fails when its part of the loss is broken."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.diffusion.forward import at_positions, content_mask, q_sample, stratified_continuous_times
from pipeline.diffusion.loss import continuous_position_loss, diffusion_loss, position_kl, subs_log_probs
from pipeline.diffusion.schedules import LogLinearSchedule, PowerSchedule, build_schedule
from tests.support.toy import MASK, SPECIAL, VOCAB, centred_information

X0 = torch.tensor([[1, 4, 5, 6, 6, 5, 2], [1, 5, 4, 6, 2, 0, 0], [1, 6, 6, 6, 6, 4, 2], [1, 4, 4, 5, 6, 6, 2]])


class ContinuousPowerSchedule(PowerSchedule):
    """The power schedule trained in continuous time (MD4's state-dependent recipe): the one way
    the loss's token-dependent middle term is reached."""

    continuous = True
    eps = 1e-3


def _logit_model(seed: int):
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def model(x_t, attn, s, positions):  # logits depend on the left neighbour: a real x_t-dependence
        return at_positions(table[torch.roll(x_t, 1, dims=1)], positions)

    return model


def _replayed(schedule, model, seed: int):
    """The draws `diffusion_loss` makes with this seed, replayed: (t [B], masked [B, L], log p [N, V])."""
    attn = X0 != 0
    gen = torch.Generator().manual_seed(seed)
    t = stratified_continuous_times(X0.shape[0], schedule.num_timesteps, schedule.eps, gen)
    x_t, masked = q_sample(X0, t, schedule, content_mask(X0, SPECIAL, attn), MASK, gen)
    log_probs = subs_log_probs(model(x_t, attn, t / schedule.num_timesteps, masked), SPECIAL.forbidden_outputs)
    return t, masked, log_probs


def test_the_mdlm_loss_is_the_one_over_s_weighted_masked_cross_entropy():
    """log-linear alpha(s) = 1 - s: w = -alpha' / (1 - alpha) = 1 / s per masked token, over the
    batch's content tokens (MDLM eq. 10)."""
    T = 2048
    schedule = build_schedule("loglinear", T)
    assert isinstance(schedule, LogLinearSchedule) and schedule.continuous
    model = _logit_model(seed=5)
    out = diffusion_loss(model, X0, X0 != 0, schedule, SPECIAL, torch.Generator().manual_seed(1))
    t, masked, log_probs = _replayed(schedule, model, seed=1)
    ce = -log_probs.gather(1, X0[masked][:, None]).squeeze(1)
    s = (t / T)[masked.nonzero(as_tuple=True)[0]]
    expected = (ce / s).sum() / content_mask(X0, SPECIAL, X0 != 0).sum()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss takes its weights in fp32
    assert out.bound_sum.item() == pytest.approx((ce / s).sum().item(), rel=1e-6)  # the loss takes its weights in fp32
    assert not math.isclose(out.bound_sum.item(), ce.sum().item(), rel_tol=1e-3)  # 1/s > 1: the weight is not 1


def test_a_token_dependent_continuous_loss_keeps_its_middle_term():
    """alpha(s, v) = 1 - s^w(v): w_s(v) = w(v) / s, and the integrand per masked x0 is
    -w(x0) log p(x0) + sum_v p(v) w(v) - w(x0) (PAPER §4); without the middle terms it is no bound."""
    T, gamma = 2048, 2.0
    h = centred_information()
    schedule = ContinuousPowerSchedule(T, h, gamma)
    model = _logit_model(seed=8)
    out = diffusion_loss(model, X0, X0 != 0, schedule, SPECIAL, torch.Generator().manual_seed(3))
    t, masked, log_probs = _replayed(schedule, model, seed=3)
    rows = masked.nonzero(as_tuple=True)[0]
    weight = torch.exp(-gamma * h)[None, :] / (t / T)[rows][:, None]  # [N, V] = w(v) / s
    x0 = X0[masked]
    w_x0 = weight.gather(1, x0[:, None]).squeeze(1)
    lp_x0 = log_probs.gather(1, x0[:, None]).squeeze(1)
    middle = (log_probs.exp() * weight).sum(-1) - w_x0
    expected = (-w_x0 * lp_x0 + middle).sum()
    assert out.bound_sum.item() == pytest.approx(expected.item(), rel=1e-6)  # the loss takes its weights in fp32
    assert abs(middle.sum().item()) > 1e-3 * abs(expected.item())  # the middle terms matter here


@pytest.mark.parametrize("s", [0.05, 0.4, 0.9])
def test_the_continuous_integrand_is_the_discrete_kl_per_unit_time_in_the_small_step_limit(s):
    """For any schedule, KL(q(x_{s-d} | x_s, x0) || p(x_{s-d} | x_s)) / d -> the continuous
    integrand as d -> 0, with w(v) = -alpha'(s, v) / (1 - alpha(s, v)): the discrete bound and the
    continuous loss are one quantity. Checked on a token-dependent schedule (power, gamma 1.5),
    so the middle term is in play."""
    T = 1000
    schedule = build_schedule("power", T, information=centred_information(), power_gamma=1.5)
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    log_probs = subs_log_probs(logits, SPECIAL.forbidden_outputs)
    x0 = torch.tensor([4, 5, 6, 4, 5, 6])
    t = torch.tensor([s * T], dtype=torch.float64)
    weight = -schedule.dalpha_vocab(t) / schedule.masked_vocab(t)  # [1, V]
    continuous = continuous_position_loss(log_probs, x0, weight.expand(6, VOCAB))
    d = 1e-5
    reveal = schedule.reveal_probability(t, t - d * T)  # [1, V]
    discrete = position_kl(log_probs, x0, reveal.expand(6, VOCAB)) / d
    assert torch.allclose(discrete, continuous, rtol=1e-4), (discrete, continuous)
    assert not math.isclose(continuous[0].item(), (-weight[0, 4] * log_probs[0, 4]).item(), rel_tol=1e-3)
