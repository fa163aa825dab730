"""Noise schedules of the absorbing-state forward process (PAPER §2-§3).

A schedule answers one question, vectorised over a batch: the probability alpha_t(v) that a
token with vocabulary id v is still unmasked at step t. Time is given in steps t in [0, T]
(floats allowed: the continuous-time loss samples t/T in [eps, 1]); s = t / T is the fraction.

Every schedule has alpha_0 = 1, alpha_T = 0 and alpha non-increasing in t for every id, which is
what makes the posterior and the bound of `loss.py` exact. The masked chance 1 - alpha_t(v) is
computed directly where a schedule can (`masked_vocab`), not as 1 - alpha: near t = 0 alpha
rounds to 1 and the reveal chances of the reverse chain would come out as 0/0. Token-dependent schedules (spindle)
return one alpha per vocabulary id, shape [B, V]; the others return [B, 1], broadcastable.

Devices: results live on the device of the context's ids when a context is given, else on t's
device. The float64 per-id tables (h, w) stay on the CPU and are copied once per device.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import Tensor

from pipeline.limits import max_spindle_lambda as max_spindle_lambda  # the bound the spindle obeys
from pipeline.vocab import SCHEDULES


class ScheduleError(ValueError):
    """A schedule that cannot be built as asked (unknown name, non-monotone alpha, ...)."""


class Schedule(ABC):
    """alpha_t for every vocabulary id; subclasses implement `_alpha(s, context)` on fractions."""

    name: str = "base"
    token_dependent: bool = False
    continuous: bool = False  # trained with the continuous-time loss (MDLM)
    leaky: bool = False  # alpha reads the true sentence, so the bound is not a likelihood bound

    def __init__(self, num_timesteps: int) -> None:
        if num_timesteps < 1:
            raise ScheduleError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)

    # -- public API -------------------------------------------------------------------------
    def alpha_vocab(self, t: Tensor, context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """alpha_t(v): t [B] in steps -> [B, V] (token-dependent) or [B, 1], float64.

        `context` = (ids [B, L], content_mask [B, L]) of the sequences being noised; only the
        authors' per-sentence spindle variant reads it. The result is on the context's device
        (t is moved there), else on t's device.
        """
        s = self._fraction(t, context)  # [B]
        return self._alpha(s, context).clamp(0.0, 1.0)

    def alpha(self, t: Tensor, ids: Tensor, content_mask: Tensor | None = None) -> Tensor:
        """alpha_t at each position: t [B], ids [B, L] -> [B, L] float64."""
        mask = content_mask if content_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        table = self.alpha_vocab(t, (ids, mask))  # [B, V] or [B, 1]
        if table.shape[-1] == 1:
            return table.expand(ids.shape[0], ids.shape[1])
        return table.gather(1, ids)

    def masked_vocab(self, t: Tensor, context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """1 - alpha_t(v), the chance a token v is [MASK] at step t, without the cancellation of
        1 - alpha near t = 0. Same shape and device as `alpha_vocab`, float64."""
        s = self._fraction(t, context)
        return self._masked(s, context).clamp(0.0, 1.0)

    def dalpha_vocab(self, t: Tensor, context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """d alpha / d s (s = t / T), same shape and device as `alpha_vocab`; for the continuous loss."""
        s = self._fraction(t, context)
        return self._dalpha(s, context)

    def reveal_probability(self, t: Tensor, s: Tensor, context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """a(v) = (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v)) = (m_t(v) - m_s(v)) / m_t(v) with
        m = 1 - alpha (`masked_vocab`): chance a masked v is revealed when stepping from t to
        s < t. [B, V] or [B, 1], float64. Where m_t(v) = 0 no token v can be masked, so a = 1
        there (keeps 0/0 out of the bound)."""
        return self._reveal(self._fraction(t, context), self._fraction(s, context), context).clamp(0.0, 1.0)

    # -- helpers ------------------------------------------------------------------------------
    def _fraction(self, t: Tensor, context: tuple[Tensor, Tensor] | None = None) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        if context is not None:
            t = t.to(context[0].device)
        return (t.reshape(-1) / self.num_timesteps).clamp(0.0, 1.0)

    def _table(self, name: str, device: torch.device) -> Tensor:
        """The per-id table `self.<name>` on `device`, copied there once and cached."""
        table: Tensor = getattr(self, name)
        if table.device == device:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        hit = cache.get((name, device))
        if hit is None or hit[0] is not table:  # also when the table was replaced
            hit = cache[(name, device)] = (table, table.to(device))
        copy: Tensor = hit[1]
        return copy

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_device_tables", None)  # device copies are a cache: never pickle GPU tensors
        return state

    @abstractmethod
    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor: ...

    @abstractmethod
    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor: ...

    def _masked(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        """1 - alpha on fractions; schedules with a closed form for it override this."""
        return 1.0 - self._alpha(s, context)

    def _reveal(self, s_t: Tensor, s_s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        """a on fractions s_s < s_t: (m_t - m_s) / m_t, 1 where m_t = 0."""
        m_t = self._masked(s_t, context).clamp(0.0, 1.0)
        m_s = self._masked(s_s, context).clamp(0.0, 1.0)
        safe = m_t > 0
        return torch.where(safe, (m_t - m_s) / torch.where(safe, m_t, 1.0), torch.ones_like(m_t))

    def describe(self) -> dict[str, Any]:
        return {"schedule": self.name, "num_timesteps": self.num_timesteps}

    def token_spread(self) -> float | None:
        """lambda * max_v |per-token deviation|, the quantity `max_spindle_lambda` bounds; None
        for schedules that treat every id alike."""
        return None


class LinearSchedule(Schedule):
    """D3PM's (T - t + 1)^-1 schedule: beta_t = 1/(T-t+1), hence alpha_t = 1 - t/T."""

    name = "linear"

    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        return (1.0 - s)[:, None]

    def _masked(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        return s[:, None]

    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        return -torch.ones_like(s)[:, None]


class LogLinearSchedule(LinearSchedule):
    """MDLM/SEDD continuous time: alpha(s) = 1 - s, trained with t ~ U[eps, 1] and weight 1/s."""

    name = "loglinear"
    continuous = True

    def __init__(self, num_timesteps: int, eps: float = 1e-3) -> None:
        super().__init__(num_timesteps)
        self.eps = float(eps)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "eps": self.eps}


class CosineSchedule(Schedule):
    """I-DDPM cosine: alpha(s) = f(s) / f(0), f(s) = cos(pi/2 * (s + c) / (1 + c))^2, c = 0.008."""

    name = "cosine"
    offset = 0.008

    def _f(self, s: Tensor) -> Tensor:
        return torch.cos(0.5 * math.pi * (s + self.offset) / (1 + self.offset)) ** 2

    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        return (self._f(s) / self._f(torch.zeros_like(s)))[:, None]

    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        c = self.offset
        arg = 0.5 * math.pi * (s + c) / (1 + c)
        df = -2 * torch.cos(arg) * torch.sin(arg) * 0.5 * math.pi / (1 + c)
        return (df / self._f(torch.zeros_like(s)))[:, None]


class SpindleSchedule(Schedule):
    """Token-aware spindle, a function of the vocabulary id only (our exact version, PAPER §3):

    alpha_t(v) = 1 - s - lambda * sin(pi s) * h(v),  h(v) = centred information in [-1, 1].
    Informative ids (h > 0) are masked earlier in the forward process, so generated last.
    """

    name = "spindle"
    token_dependent = True

    def __init__(self, num_timesteps: int, information: Tensor, spindle_lambda: float = 0.3) -> None:
        super().__init__(num_timesteps)
        h = torch.as_tensor(information, dtype=torch.float64).reshape(-1)
        if not (math.isfinite(spindle_lambda) and spindle_lambda >= 0):
            raise ScheduleError(f"spindle_lambda must be finite and >= 0, got {spindle_lambda}")
        if not torch.isfinite(h).all():
            raise ScheduleError("spindle: the centred information h(v) has non-finite entries")
        limit = max_spindle_lambda(num_timesteps)
        worst = float(spindle_lambda) * float(h.abs().max()) if h.numel() else 0.0
        if worst > limit + 1e-12:
            raise ScheduleError(
                f"spindle_lambda={spindle_lambda} makes alpha_t non-monotone for T={num_timesteps}: "
                f"lambda * max|h| = {worst:.4f} > {limit:.4f} = 1/(T sin(pi/T)); lower the lambda"
            )
        self.h = h  # [V]
        self.spindle_lambda = float(spindle_lambda)

    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        h = self._table("h", s.device)
        return 1.0 - s[:, None] - self.spindle_lambda * torch.sin(math.pi * s)[:, None] * h[None, :]

    def _masked(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        h = self._table("h", s.device)
        return s[:, None] + self.spindle_lambda * torch.sin(math.pi * s)[:, None] * h[None, :]

    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        h = self._table("h", s.device)
        return -1.0 - self.spindle_lambda * math.pi * torch.cos(math.pi * s)[:, None] * h[None, :]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "spindle_lambda": self.spindle_lambda}

    def token_spread(self) -> float:
        return self.spindle_lambda * float(self.h.abs().max()) if self.h.numel() else 0.0


class PowerSchedule(Schedule):
    """Token-aware power schedule, exact for every gamma (MD4's state-dependent family):

    alpha_t(v) = 1 - s^w(v),  w(v) = exp(-gamma * h(v)),  h(v) = centred information in [-1, 1].
    Informative ids (h > 0) get w < 1, so s^w > s: masked earlier in the forward process and
    generated last, as the spindle intends, but with no cap on the strength: alpha is monotone in
    s for every w > 0, so any gamma >= 0 is a valid schedule. gamma = 0 is linear.
    """

    name = "power"
    token_dependent = True

    def __init__(self, num_timesteps: int, information: Tensor, gamma: float = 1.0) -> None:
        super().__init__(num_timesteps)
        h = torch.as_tensor(information, dtype=torch.float64).reshape(-1)
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ScheduleError(f"power_gamma must be finite and >= 0, got {gamma}")
        if not torch.isfinite(h).all():
            raise ScheduleError("power: the centred information h(v) has non-finite entries")
        self.h = h  # [V]
        self.w = torch.exp(-float(gamma) * h)  # [V] exponents, all > 0
        self.gamma = float(gamma)

    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        w = self._table("w", s.device)
        return 1.0 - s[:, None] ** w[None, :]  # 0^w = 0: alpha_0 = 1 for every id

    def _masked(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        w = self._table("w", s.device)
        return s[:, None] ** w[None, :]

    def _reveal(self, s_t: Tensor, s_s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        """a(v) = 1 - (s_s / s_t)^w(v) = -expm1(w(v) log1p((s_s - s_t) / s_t)): exact where
        alpha_t rounds to 1 (large gamma, small t), e.g. gamma 3, T 2048, step 100 -> 99, h = -1:
        0.183, where (alpha_s - alpha_t) / (1 - alpha_t) gives 1. 1 at s_t = 0 (nothing masked)."""
        w = self._table("w", s_t.device)
        safe = s_t > 0
        step = torch.log1p((s_s - s_t) / torch.where(safe, s_t, 1.0))  # log(s_s / s_t) <= 0, -inf at s_s = 0
        return torch.where(safe[:, None], -torch.expm1(w[None, :] * step[:, None]), torch.ones_like(w)[None, :])

    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        w = self._table("w", s.device)
        return -w[None, :] * s[:, None].clamp_min(1e-12) ** (w[None, :] - 1.0)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "power_gamma": self.gamma}

    def token_spread(self) -> float:
        """Largest |alpha(v) - (1 - s)| at s = 1/2 over the ids (spindle's spread is comparable)."""
        if not self.h.numel():
            return 0.0
        return float((0.5**self.w - 0.5).abs().max())


class SpindlePaperSchedule(Schedule):
    """The authors' per-sentence spindle (ablation only; its bound is LEAKY, PAPER §3).

    alpha_t(i) = clip(1 - s + lambda sin(pi s) (w(x_i) - mean_j w(x_j)), 0, 1) with
    w(v) = log(count(v)+1) / max_u log(count(u)+1) and the mean over the sentence's real tokens.
    Centring on the true sentence leaks x0 into the bound. Without a sentence (sampling), the
    mean is replaced by the corpus mean of w, its expectation.
    """

    name = "spindle_paper"
    token_dependent = True
    leaky = True

    def __init__(self, num_timesteps: int, counts: Tensor, spindle_lambda: float = 0.3) -> None:
        super().__init__(num_timesteps)
        counts = torch.as_tensor(counts, dtype=torch.float64).reshape(-1)
        logc = torch.log(counts + 1.0)
        self.w = logc / logc.max().clamp_min(1e-12)  # [V] in [0, 1]
        total = counts.sum()
        self.corpus_mean = float((counts * self.w).sum() / total) if total > 0 else 0.0
        limit = max_spindle_lambda(num_timesteps)
        if spindle_lambda > limit + 1e-12:
            raise ScheduleError(
                f"spindle_lambda={spindle_lambda} makes alpha_t non-monotone for T={num_timesteps}: "
                f"it must be <= {limit:.4f}"
            )
        self.spindle_lambda = float(spindle_lambda)

    def _centre(self, context: tuple[Tensor, Tensor] | None, batch: int, device: torch.device) -> Tensor:
        if context is None:
            return torch.full((batch, 1), self.corpus_mean, dtype=torch.float64, device=device)
        ids, mask = context
        w_tok = self._table("w", ids.device)[ids] * mask  # [B, L]
        n = mask.sum(1, keepdim=True).clamp_min(1)
        return w_tok.sum(1, keepdim=True) / n  # [B, 1]

    def _alpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        centred = self._table("w", s.device)[None, :] - self._centre(context, s.shape[0], s.device)  # [B, V]
        return 1.0 - s[:, None] + self.spindle_lambda * torch.sin(math.pi * s)[:, None] * centred

    def _masked(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        centred = self._table("w", s.device)[None, :] - self._centre(context, s.shape[0], s.device)
        return s[:, None] - self.spindle_lambda * torch.sin(math.pi * s)[:, None] * centred

    def _dalpha(self, s: Tensor, context: tuple[Tensor, Tensor] | None) -> Tensor:
        centred = self._table("w", s.device)[None, :] - self._centre(context, s.shape[0], s.device)
        return -1.0 + self.spindle_lambda * math.pi * torch.cos(math.pi * s)[:, None] * centred

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "spindle_lambda": self.spindle_lambda, "leaky": True}

    def token_spread(self) -> float:
        return self.spindle_lambda * float((self.w - self.corpus_mean).abs().max())


def build_schedule(
    name: str,
    num_timesteps: int,
    *,
    information: Tensor | None = None,
    counts: Tensor | None = None,
    spindle_lambda: float = 0.3,
    eps: float = 1e-3,
    power_gamma: float = 1.0,
) -> Schedule:
    """Schedule by name; spindle and power need the centred information h(v), spindle_paper the counts."""
    if name == "linear":
        return LinearSchedule(num_timesteps)
    if name == "cosine":
        return CosineSchedule(num_timesteps)
    if name == "loglinear":
        return LogLinearSchedule(num_timesteps, eps)
    if name == "spindle":
        if information is None:
            raise ScheduleError("spindle needs token statistics (the centred information h(v))")
        return SpindleSchedule(num_timesteps, information, spindle_lambda)
    if name == "power":
        if information is None:
            raise ScheduleError("power needs token statistics (the centred information h(v))")
        return PowerSchedule(num_timesteps, information, power_gamma)
    if name == "spindle_paper":
        if counts is None:
            raise ScheduleError("spindle_paper needs token statistics (the token counts)")
        return SpindlePaperSchedule(num_timesteps, counts, spindle_lambda)
    raise ScheduleError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")


def time_grid(num_timesteps: int, step_size: int = 1) -> list[int]:
    """Descending grid T, T-k, ..., 0 for a reverse chain with step skipping k (last gap may be short)."""
    if step_size < 1:
        raise ScheduleError(f"step size must be >= 1, got {step_size}")
    grid = list(range(num_timesteps, 0, -step_size))
    return [*grid, 0]


def grid_for_steps(num_timesteps: int, num_steps: int) -> list[int]:
    """Descending grid of `num_steps` (near-)equal steps from T to 0."""
    if num_steps < 1:
        raise ScheduleError(f"number of steps must be >= 1, got {num_steps}")
    num_steps = min(num_steps, num_timesteps)
    return sorted({round(j * num_timesteps / num_steps) for j in range(num_steps + 1)}, reverse=True)
