"""A tiny exactly-solvable diffusion world shared by the contract tests.

Vocabulary: 0 [PAD], 1 [CLS], 2 [SEP], 3 [MASK], content ids 4, 5, 6. Sequences are
[CLS] x1 x2 [SEP]; the data distribution over the 9 content pairs is fixed and skewed, so the
spindle schedule has something to work with.
"""

from __future__ import annotations

import itertools
import math

import torch

from pipeline.diffusion.forward import SpecialIds
from pipeline.diffusion.schedules import build_schedule, max_spindle_lambda

PAD, CLS, SEP, MASK = 0, 1, 2, 3
CONTENT = (4, 5, 6)
VOCAB = 7
SPECIAL = SpecialIds(mask=MASK, pad=PAD, never_masked=(PAD, CLS, SEP))
PAIRS = list(itertools.product(CONTENT, repeat=2))
_WEIGHTS = torch.tensor([6.0, 3.0, 1.0, 2.0, 4.0, 1.0, 1.0, 1.0, 2.0], dtype=torch.float64)
DATA_PROBS = _WEIGHTS / _WEIGHTS.sum()  # p(x1, x2) over PAIRS


def unigram_counts() -> torch.Tensor:
    counts = torch.zeros(VOCAB, dtype=torch.float64)
    for (a, b), p in zip(PAIRS, DATA_PROBS):
        counts[a] += 1000 * p
        counts[b] += 1000 * p
    return counts.round()


def centred_information() -> torch.Tensor:
    counts = unigram_counts()
    p = counts[list(CONTENT)] / counts.sum()
    info = -torch.log(p)
    entropy = float((p * info).sum())
    h = torch.zeros(VOCAB, dtype=torch.float64)
    h[list(CONTENT)] = (info - entropy) / (info - entropy).abs().max()
    return h


def toy_schedule(name: str, T: int, spindle_lambda: float | None = None):
    lam = min(max_spindle_lambda(T), 1.0) if spindle_lambda is None else spindle_lambda
    return build_schedule(
        name,
        T,
        information=centred_information(),
        counts=unigram_counts(),
        spindle_lambda=min(lam, 0.3) if name == "spindle_paper" else lam,
    )


def sequence(pair) -> torch.Tensor:
    return torch.tensor([CLS, pair[0], pair[1], SEP])


def as_mask(positions: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The Denoiser contract's `positions` (a bool mask, or flat indices into B * L) as a bool mask [B, L]."""
    if positions.dtype == torch.bool:
        return positions
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool, device=positions.device)
    return mask.index_fill_(0, positions, True).view(shape[0], shape[1])


class BayesDenoiser:
    """The t-aware Bayes-optimal denoiser of the toy world: per masked position, the posterior
    marginal of x0 given x_t at step t, p(x0 | x_t) ∝ p_data(x0) q(x_t | x0)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule
        self.calls = 0
        self._memo: dict[tuple, torch.Tensor] = {}  # (row, s) -> logits: the toy has few distinct rows

    def __call__(self, x_t, attention_mask, s, positions):
        self.calls += 1
        positions = as_mask(positions, x_t.shape)
        out = []
        for row in range(x_t.shape[0]):
            key = (tuple(x_t[row].tolist()), float(s[row]))
            if key not in self._memo:
                self._memo[key] = self._posterior_logits(x_t[row], float(s[row]))
            out.append(self._memo[key][positions[row]])
        return torch.cat(out).float()

    def _posterior_logits(self, x_row, s: float) -> torch.Tensor:
        T = self.schedule.num_timesteps
        t = torch.tensor([s * T], dtype=torch.float64)
        post = torch.zeros(2, VOCAB, dtype=torch.float64)
        for pair, p in zip(PAIRS, DATA_PROBS):
            x0 = sequence(pair)[None, :]
            alpha = self.schedule.alpha(t, x0)[0]  # [4]
            like = 1.0
            for i in (1, 2):
                if x_row[i] == MASK:
                    like *= float(1 - alpha[i])
                elif x_row[i] == x0[0, i]:
                    like *= float(alpha[i])
                else:
                    like = 0.0
            post[0, pair[0]] += p * like
            post[1, pair[1]] += p * like
        logits = torch.full((x_row.shape[0], VOCAB), -30.0, dtype=torch.float64)
        for i in (1, 2):
            logits[i] = torch.log(post[i - 1].clamp_min(1e-300))
        return logits


class ConstantDenoiser:
    """Time-agnostic: the same distribution at every masked position, whatever x_t is."""

    def __init__(self, probs: torch.Tensor) -> None:
        self.logits = torch.log(probs.clamp_min(1e-30)).float()
        self.calls = 0

    def __call__(self, x_t, attention_mask, s, positions):
        self.calls += 1
        return self.logits.expand(int(as_mask(positions, x_t.shape).sum()), -1).clone()


def log(x: float) -> float:
    return math.log(x) if x > 0 else float("-inf")
