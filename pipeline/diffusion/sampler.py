"""One interface for every sampler: `sampler(name, schedule, ...)` checks and binds a sampler's
options once and returns a `Sampler`, which draws for unconditional `lengths` or fills the [MASK]
slots of a `canvas`, the same way whichever sampler it is. The generation front, the evaluation and
the contract test (`tests/unit/test_sampler_contract.py`) go through it.

    draw = sampler("remdm", schedule, steps=128, top_k=30, remdm_eta=0.04)
    out = draw(model.denoise, special, cls_id, sep_id, lengths=[12, 20], seed=0)   # SampleOutput
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor

from pipeline.diffusion.confidence_unmasking import confidence_sample
from pipeline.diffusion.forward import Denoiser, SpecialIds
from pipeline.diffusion.gibbs import gibbs_sample
from pipeline.diffusion.host_chain import SampleOutput
from pipeline.diffusion.reverse import CONFIDENCE_SCORES
from pipeline.diffusion.samplers import ancestral_sample
from pipeline.diffusion.schedules import Schedule, grid_for_steps
from pipeline.vocab import SAMPLERS


def check_truncation(top_k: int, top_p: float, temperature: float) -> None:
    """Refuse truncation settings no sampler can honour, naming the argument."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0: no top-k), got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1: no nucleus truncation), got {top_p!r}")
    if not (isinstance(temperature, int | float) and math.isfinite(temperature) and temperature > 0.0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


@dataclass(frozen=True)
class Sampler:
    """A sampler with its options bound. `exact`: it draws from the model's own reverse chain, the
    chain a bound speaks for (the ancestral sampler, cached or not); ReMDM, confidence-ordered
    unmasking and Gibbs sampling are other processes."""

    name: str
    exact: bool
    options: dict[str, Any]  # what it was built with, for reports
    _draw: Callable[..., SampleOutput] = field(repr=False)  # (denoiser, lengths, special, cls_id, sep_id, **call)

    def __call__(
        self,
        denoiser: Denoiser,
        special: SpecialIds,
        cls_id: int,
        sep_id: int,
        *,
        lengths: Sequence[int] | Tensor | None = None,
        canvas: tuple[Tensor, Tensor] | None = None,
        seed: int = 0,
        device: torch.device | str = "cpu",
        progress: Callable[[int], None] | None = None,
    ) -> SampleOutput:
        """Tokens [B, L] ([CLS] content [SEP] padding) for `lengths`, or `canvas` (ids, attention)
        with only its [MASK] positions written. Same seed and device, same tokens."""
        return self._draw(
            denoiser, lengths, special, cls_id, sep_id, canvas=canvas, seed=seed, device=device, progress=progress
        )


def sampler(
    name: str,
    schedule: Schedule,
    *,
    steps: int | None = None,
    grid: Sequence[int] | None = None,
    cache: bool = False,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    remdm_eta: float = 0.04,
    confidence_score: str = "prob",
    gibbs_sweeps: int = 2,
    resident: bool | None = None,
) -> Sampler:
    """The sampler `name` (one of `pipeline.vocab.SAMPLERS`) on `schedule`'s grid of `steps` steps
    (or an explicit descending `grid`, T ... 0), every option checked now, before any model call."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    check_truncation(top_k, top_p, temperature)
    truncation: dict[str, Any] = {"top_k": top_k, "top_p": top_p, "temperature": temperature}
    if name == "gibbs":
        if isinstance(gibbs_sweeps, bool) or not isinstance(gibbs_sweeps, int) or gibbs_sweeps < 1:
            raise ValueError(f"gibbs_sweeps must be an integer >= 1, got {gibbs_sweeps!r}")
        draw = partial(gibbs_sample, sweeps=gibbs_sweeps, resident=resident, **truncation)
        return Sampler(name, False, {"sweeps": gibbs_sweeps, **truncation}, draw)
    if grid is None:
        grid = grid_for_steps(schedule.num_timesteps, 128 if steps is None else steps)
    chain: dict[str, Any] = {"grid": list(grid), "cache": cache, "resident": resident, **truncation}
    if name == "confidence":
        if confidence_score not in CONFIDENCE_SCORES:
            raise ValueError(
                f"unknown confidence score {confidence_score!r}; choose one of {', '.join(CONFIDENCE_SCORES)}"
            )
        draw = partial(_chain, confidence_sample, schedule, score=confidence_score, **chain)
        return Sampler(name, False, {"score": confidence_score, "steps": len(grid) - 1, **truncation}, draw)
    eta = remdm_eta if name == "remdm" else 0.0
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"the remasking budget remdm_eta must lie in [0, 1], got {remdm_eta}")
    draw = partial(_chain, ancestral_sample, schedule, remask=eta, **chain)
    options = {"steps": len(grid) - 1, "cache": cache, **({"eta": eta} if name == "remdm" else {}), **truncation}
    return Sampler(name, name == "ancestral", options, draw)


def _chain(
    function: Callable[..., SampleOutput],
    schedule: Schedule,
    denoiser: Denoiser,
    lengths: Sequence[int] | Tensor | None,
    special: SpecialIds,
    cls_id: int,
    sep_id: int,
    **options: object,
) -> SampleOutput:
    """The reverse-chain samplers take the schedule after the denoiser."""
    out: SampleOutput = function(denoiser, schedule, lengths, special, cls_id, sep_id, **options)
    return out
