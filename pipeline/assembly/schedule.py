"""The noise schedule params describe: built here and nowhere else from a `Params`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pipeline.diffusion.schedules import Schedule, build_schedule

if TYPE_CHECKING:  # pragma: no cover
    from numpy.typing import ArrayLike

    from pipeline.config import DiffusionParams, Params
    from pipeline.data.stats import TokenStatistics


def schedule_from_params(
    diffusion: DiffusionParams, information: ArrayLike | None = None, counts: ArrayLike | None = None
) -> Schedule:
    """The schedule `diffusion` (a `DiffusionParams`, or any object with its fields) describes;
    spindle and power need the centred information h(v), spindle_paper the token counts."""
    return build_schedule(
        diffusion.schedule,
        diffusion.num_timesteps,
        information=None if information is None else torch.as_tensor(information),
        counts=None if counts is None else torch.as_tensor(counts),
        spindle_lambda=diffusion.spindle_lambda,
        eps=diffusion.loglinear_eps,
        power_gamma=diffusion.power_gamma,
    )


def schedule_for(params: Params, stats: TokenStatistics) -> Schedule:
    """The schedule of `params` over the corpus whose token statistics are `stats`."""
    return schedule_from_params(params.diffusion, information=stats.centred_information(), counts=stats.counts)
