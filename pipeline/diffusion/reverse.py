"""The maths of one reverse step that the host samplers (`pipeline.diffusion.samplers`) and the
device-resident ones (`pipeline.diffusion.resident`) share: float64 inverse-CDF draws, nucleus
truncation, ReMDM's remasking chances, and the confidence sampler's scores and reveal counts.
Plain tensor functions with no loop and no device policy, so both paths compute the same numbers."""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.diffusion.schedules import Schedule


def top_p_mask(logits: Tensor, top_p: float) -> Tensor:
    """Nucleus truncation of logits [N, K]: keep the most likely entries up to and including the
    one whose cumulative probability crosses top_p (ties ordered by column). [N, K]"""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    p_sorted = torch.softmax(sorted_logits, -1)
    drop_sorted = p_sorted.cumsum(-1) - p_sorted >= top_p  # keep the token that crosses p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def draw_categorical(weights: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised weights [N, K] with float64 uniforms [N]; the CDF is
    accumulated in float64, left to right, so zero weights between two entries change nothing.
    The column drawn. [N]"""
    cdf = weights.double().cumsum(-1)
    target = uniforms * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return index.clamp_max(weights.shape[-1] - 1)


def remdm_probabilities(schedule: Schedule, t: Tensor, s: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """ReMDM-cap's step t -> s: (a'(v), sigma(v)), each [V] or [1] float64.

    sigma = min(eta, (1 - alpha_s) / alpha_t) is the chance a generated v is sent back to [MASK];
    a' = (alpha_s - (1 - sigma) alpha_t) / (1 - alpha_t) = a + sigma alpha_t / (1 - alpha_t) the
    chance a [MASK] is revealed as v, with a the plain chain's reveal chance. The cap keeps
    a' <= 1; together they keep q(position masked at s) = 1 - alpha_s. Computed from the masked
    chances 1 - alpha (`Schedule.masked_vocab`) and the schedule's own stable a, so a' stays
    exact where alpha_t rounds to 1."""
    a_t = schedule.alpha_vocab(t)[0]
    m_t = schedule.masked_vocab(t)[0]
    m_s = schedule.masked_vocab(s)[0]
    cap = torch.where(a_t > 0, m_s / torch.where(a_t > 0, a_t, 1.0), torch.ones_like(a_t))
    sigma = cap.clamp(max=eta).clamp_min(0.0)
    plain = schedule.reveal_probability(t, s)[0]
    safe = m_t > 0
    reveal = torch.where(safe, plain + sigma * a_t / torch.where(safe, m_t, 1.0), torch.ones_like(a_t))
    return reveal.clamp(0.0, 1.0), sigma


CONFIDENCE_SCORES = ("prob", "margin", "entropy")


def confidence(probs: Tensor, drawn: Tensor, score: str) -> Tensor:
    """How sure the model is at each position, higher = surer: the drawn token's probability,
    the gap between the two most likely tokens, or minus the entropy. probs [M, K] (dense rows,
    or the kept entries: the other ids have probability 0), drawn [M] columns of probs -> [M]"""
    if score == "prob":
        return probs.gather(1, drawn[:, None]).squeeze(1).double()
    if score == "margin":
        top2 = probs.topk(min(2, probs.shape[-1]), dim=-1).values.double()  # [M, 2] ([M, 1] when top_k = 1)
        second = top2[:, 1] if top2.shape[-1] == 2 else torch.zeros_like(top2[:, 0])
        return top2[:, 0] - second
    if score == "entropy":
        p = probs.double()
        return (p * p.clamp_min(1e-300).log()).sum(-1)  # -H(p)
    raise ValueError(f"unknown confidence score {score!r}; choose one of {', '.join(CONFIDENCE_SCORES)}")


def reveal_counts(masked_per_row: Tensor, expected_reveals: Tensor, owed: Tensor, last_step: bool) -> Tensor:
    """How many positions each row reveals this step: the schedule's expected number, rounded
    with the remainder carried over (`owed`, [B] float64, updated in place), so a step that
    expects 0.3 reveals and the next that expects 0.3 do not both round to 0.

    masked_per_row [B], expected_reveals [B] (sum over the row's masked positions of the chance
    the chain would reveal each) -> [B]. The last step reveals everything left."""
    if last_step:
        owed.zero_()
        return masked_per_row.clone()
    owed += expected_reveals
    counts = torch.minimum(torch.floor(owed + 0.5).long().clamp_min(0), masked_per_row)
    owed -= counts.double()
    return counts
