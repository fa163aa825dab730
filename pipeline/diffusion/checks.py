"""What the schedule stage proves and shows about a schedule: an exhaustive monotonicity check
(every vocabulary id at every step, not a sample), the report `train` later compares against,
and alpha_t(v) curves for a few tokens.

The loss and the bound are exact only for alpha_0 = 1, alpha_T = 0 and alpha non-increasing in
t, so a schedule that fails here must never reach training (`require_monotone` raises).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pipeline.diffusion.schedules import Schedule, ScheduleError, max_spindle_lambda
from pipeline.vocab import ProgressCallback

TOKENS_PER_SIDE = 2  # curves for the 2 most and the 2 least informative tokens
CURVE_POINTS = 256  # at most this many intervals in the CSV/PNG grid
CHECK_CHUNK = 64  # time steps per block of the exhaustive check ([64, V] float64)
TOLERANCE = 1e-12
PROBE_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)  # t/T where the report quotes alpha
LINEAR = "linear (1 - t/T)"


def _round(x: float) -> float:
    return float(f"{x:.6g}")  # short, stable numbers in JSON: reruns stay byte-identical


def curve_grid(num_timesteps: int, points: int = CURVE_POINTS) -> list[int]:
    """Ascending integer steps 0..T: every step when T <= points, else `points` near-equal gaps."""
    if num_timesteps <= points:
        return list(range(num_timesteps + 1))
    return sorted({round(j * num_timesteps / points) for j in range(points + 1)})


def check_monotone(schedule: Schedule, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """alpha_0 = 1, alpha_T = 0 and alpha_{t-1}(v) >= alpha_t(v) for every id v and step t;
    the worst violation found (step, id) and the endpoint errors."""
    T = schedule.num_timesteps
    worst_rise, worst_t, worst_id = -math.inf, 0, 0
    previous: Tensor | None = None
    first: Tensor | None = None
    last: Tensor | None = None
    for start in range(0, T + 1, CHECK_CHUNK):
        t = torch.arange(start, min(start + CHECK_CHUNK, T + 1), dtype=torch.float64)
        alpha = schedule.alpha_vocab(t)  # [chunk, V] or [chunk, 1]
        if first is None:
            first = alpha[0]
        block = alpha if previous is None else torch.cat([previous[None], alpha])  # [chunk(+1), V]
        if block.shape[0] > 1:
            rise = block[1:] - block[:-1]  # alpha_t - alpha_{t-1}: must be <= 0
            value = float(rise.max())
            if value > worst_rise:
                row, col = divmod(int(rise.argmax()), rise.shape[1])
                worst_rise = value
                worst_t = int(t[0]) + row + (0 if previous is not None else 1)
                worst_id = col
        previous = last = alpha[-1]
        if progress is not None:
            progress("checking alpha", int(t.numel()), T + 1)
    assert first is not None and last is not None  # the loop runs at least once (T >= 1)
    start_error = float((first - 1.0).abs().max())
    end_error = float(last.abs().max())
    return {
        "monotone": bool(worst_rise <= TOLERANCE),
        "endpoints_ok": bool(start_error <= 1e-9 and end_error <= 1e-9),
        "max_alpha_increase": _round(max(worst_rise, 0.0)),
        "worst_step": worst_t,
        "worst_id": worst_id,
        "alpha_0_max_error": _round(start_error),
        "alpha_T_max_error": _round(end_error),
        "checked_steps": T + 1,
        "checked_ids": int(first.numel()),
    }


def require_monotone(schedule: Schedule, progress: ProgressCallback | None = None) -> dict[str, Any]:
    """`check_monotone`, raising ScheduleError (naming the step and id) when the schedule fails."""
    check = check_monotone(schedule, progress)
    if not (check["monotone"] and check["endpoints_ok"]):
        raise ScheduleError(
            f"schedule {schedule.describe()} fails its check: alpha rises by {check['max_alpha_increase']} at "
            f"step {check['worst_step']} for id {check['worst_id']}, endpoint errors "
            f"{check['alpha_0_max_error']} / {check['alpha_T_max_error']}"
        )
    return check


def require_passed(report: dict[str, Any], schedule: Schedule) -> None:
    """A schedule.json (`schedule_report`) must describe `schedule` and record a passed check;
    else ScheduleError (train never trains on a schedule nobody checked)."""
    wanted = schedule.describe()
    if report.get("schedule") != wanted:
        raise ScheduleError(
            f"data/schedule/schedule.json describes {report.get('schedule')} but the params give "
            f"{wanted}; run `dbert schedule` first"
        )
    check = report.get("monotonicity", {})
    if not (check.get("monotone") and check.get("endpoints_ok")):
        raise ScheduleError(f"the schedule {wanted} failed its monotonicity check; see data/schedule/schedule.json")


def probe_tokens(summary: dict[str, Any], h: np.ndarray) -> list[dict[str, Any]]:
    """The least and most informative tokens of the token_stats summary, with their h(v)."""
    rows = []
    for role in ("least_informative", "most_informative"):
        for row in summary.get(role, [])[:TOKENS_PER_SIDE]:
            rows.append(
                {"role": role, "id": int(row["id"]), "token": str(row["token"]), "h": _round(float(h[row["id"]]))}
            )
    return rows


def alpha_columns(schedule: Schedule, steps: list[int], ids: list[int]) -> np.ndarray:
    """alpha at (step, token id): [len(steps), len(ids)] float64, one column if token-agnostic."""
    table = schedule.alpha_vocab(torch.tensor(steps, dtype=torch.float64))  # [G, V] or [G, 1]
    if table.shape[-1] == 1:
        return table.numpy()
    return table[:, ids].numpy()


@dataclass(frozen=True)
class AlphaCurves:
    """alpha_t on a grid of steps: the linear reference and one curve per token (or one for a
    token-agnostic schedule)."""

    t: list[int]
    linear: list[float]
    curves: dict[str, list[float]]  # name -> alpha at each t

    def csv_header(self) -> list[str]:
        return ["t", "linear", *self.curves]

    def csv_rows(self) -> list[list[Any]]:
        columns = list(self.curves.values())
        return [[t, f"{self.linear[j]:.6f}", *(f"{c[j]:.6f}" for c in columns)] for j, t in enumerate(self.t)]

    def series(self) -> dict[str, list[float]]:
        """For `pipeline.viz.line_plot`: the linear reference first."""
        return {LINEAR: self.linear, **self.curves}


def alpha_curves(schedule: Schedule, tokens: list[dict[str, Any]]) -> AlphaCurves:
    T = schedule.num_timesteps
    grid = curve_grid(T)
    alphas = alpha_columns(schedule, grid, [row["id"] for row in tokens])  # [G, tokens] or [G, 1]
    if _per_token(schedule, tokens, alphas.shape[1]):
        names = [f"{schedule.name}[{row['token']}]" for row in tokens]
    else:
        names = [schedule.name]
    return AlphaCurves(
        t=grid, linear=[1.0 - t / T for t in grid], curves={name: list(alphas[:, i]) for i, name in enumerate(names)}
    )


def _per_token(schedule: Schedule, tokens: list[dict[str, Any]], columns: int) -> bool:
    """One curve per probe token (a token-dependent schedule), else one curve for every id."""
    return columns == len(tokens) and schedule.token_dependent


def schedule_report(schedule: Schedule, check: dict[str, Any], tokens: list[dict[str, Any]]) -> dict[str, Any]:
    """schedule.json: the description `train` compares with its params, the monotonicity limit
    1/(T sin(pi/T)) next to the schedule's own lambda * max|h|, the check, and alpha at a few t
    for the probe tokens."""
    T = schedule.num_timesteps
    probe_t = sorted({round(T * f) for f in PROBE_FRACTIONS})
    probe = alpha_columns(schedule, probe_t, [row["id"] for row in tokens])
    per_token = _per_token(schedule, tokens, probe.shape[1])
    tokens = [
        {**row, "alpha": {str(t): _round(float(a)) for t, a in zip(probe_t, probe[:, i if per_token else 0])}}
        for i, row in enumerate(tokens)
    ]
    spread = schedule.token_spread()
    return {
        "schedule": schedule.describe(),
        "token_dependent": bool(schedule.token_dependent),
        "continuous": bool(schedule.continuous),
        "leaky": bool(schedule.leaky),
        "monotonicity": {
            # Only the spindle has a cap: the others are monotone for every value of their parameter.
            **(
                {
                    "limit": _round(max_spindle_lambda(T)) if T > 1 else None,
                    "limit_formula": "lambda * max|h(v)| <= 1 / (T sin(pi / T))",
                    "lambda_times_max_h": None if spread is None else _round(spread),
                }
                if schedule.name in ("spindle", "spindle_paper")
                else {"limit": None, "token_spread": None if spread is None else _round(spread)}
            ),
            **check,
        },
        "alpha_at": {"t": probe_t, "linear": [_round(1.0 - t / T) for t in probe_t], "tokens": tokens},
    }
