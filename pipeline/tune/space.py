"""What Tune searches: the grid from params (time design, and lr, the spindle lambda and the
power schedule's gamma when params list them), what every trial changes besides, and one
trial's params."""

from __future__ import annotations

from typing import Any

from pipeline.config import Params, params_from_dict
from pipeline.limits import max_spindle_lambda

METRIC = "val_bound"  # what ASHA and the proposal rank trials by
MODE = "min"
TIME_ATTR = "step"


class TuneConfigError(ValueError):
    """A search space that cannot be run as asked; the message names the key."""


def search_values(params: Params) -> dict[str, list]:
    """`dotted.key -> values` searched (before wrapping in `tune.grid_search`)."""
    tn = params.tune
    if not tn.time_designs:
        raise TuneConfigError("tune.time_designs is empty: name at least one time design to tune")
    values: dict[str, list] = {"model.time_design": list(dict.fromkeys(tn.time_designs))}
    if tn.lrs:
        values["train.lr"] = [float(v) for v in dict.fromkeys(tn.lrs)]
    if tn.spindle_lambdas:
        steps = params.diffusion.num_timesteps
        limit = max_spindle_lambda(steps)
        too_big = [v for v in tn.spindle_lambdas if v > limit]
        if too_big:
            raise TuneConfigError(
                f"tune.spindle_lambdas: {', '.join(f'{v:g}' for v in too_big)} above {limit:.4f}, the largest "
                f"lambda that keeps alpha_t monotone for diffusion.num_timesteps={steps}"
            )
        values["diffusion.spindle_lambda"] = [float(v) for v in dict.fromkeys(tn.spindle_lambdas)]
    if tn.power_gammas:
        if params.diffusion.schedule != "power":
            raise TuneConfigError(
                f"tune.power_gammas is set but diffusion.schedule is {params.diffusion.schedule!r}: gamma only "
                "acts on the power schedule (set diffusion.schedule: power)"
            )
        values["diffusion.power_gamma"] = [float(v) for v in dict.fromkeys(tn.power_gammas)]
    return values


def search_space(params: Params) -> dict:
    """The Tune param_space: one `tune.grid_search` per searched key (dotted names)."""
    from ray import tune

    return {key: tune.grid_search(values) for key, values in search_values(params).items()}


def fixed_overrides(params: Params) -> dict[str, Any]:
    """What every trial changes besides the searched keys: the tune budget replaces train.steps,
    one checkpoint at the end (so every report carries val_bound), and an evaluation at least
    every grace period (so ASHA's first rung sees a bound)."""
    steps = params.tune.steps
    return {
        "train.steps": steps,
        "train.checkpoint_every": steps,
        "train.eval_every": max(1, min(params.train.eval_every, params.tune.grace_period, steps)),
    }


def trial_params(params: Params | dict, config: dict[str, Any]) -> Params:
    """Base params + the fixed tune overrides + one trial's `dotted.key -> value` config."""
    raw = params.model_dump() if isinstance(params, Params) else _copy(params)
    base = params if isinstance(params, Params) else params_from_dict(_copy(params))
    for key, value in {**fixed_overrides(base), **config}.items():
        group, _, name = key.partition(".")
        if group not in raw or not name:
            raise TuneConfigError(f"trial config key {key!r} is not a params key")
        raw[group][name] = value
    return params_from_dict(raw)


def _copy(raw: dict) -> dict:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
