"""schedule: build the noise schedule the params describe, check it, and draw alpha_t(v).

Reads  params `diffusion.schedule`, `diffusion.num_timesteps`, `diffusion.spindle_lambda`,
       `diffusion.loglinear_eps`; data/token_stats/counts.npy and summary.json.
Writes data/schedule/schedule.json (the schedule's description, the monotonicity limit
       1/(T sin(pi/T)) and the result of an exhaustive check: alpha_0 = 1, alpha_T = 0 and
       alpha_t(v) non-increasing in t for *every* vocabulary id at *every* step; alpha at a few t
       for the most / least informative tokens), data/schedule/alpha_curves.csv (t, the linear
       alpha, alpha of those tokens) and data/schedule/alpha_curves.png.

A schedule that fails the check stops here with a ScheduleError and writes nothing; `train`
depends on schedule.json, so it never trains on a broken schedule.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from pipeline.artifacts import Layout, atomic_directory, read_json, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "schedule"
PARAMS = ("diffusion.schedule", "diffusion.num_timesteps", "diffusion.spindle_lambda", "diffusion.loglinear_eps")
INPUTS = ("data/token_stats/counts.npy", "data/token_stats/summary.json")
TOKENS_PER_SIDE = 2  # curves for the 2 most and the 2 least informative tokens
CURVE_POINTS = 256  # at most this many intervals in the CSV/PNG grid
CHECK_CHUNK = 64  # time steps per block of the exhaustive check ([64, V] float64)
TOLERANCE = 1e-12


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def curve_grid(num_timesteps: int, points: int = CURVE_POINTS) -> list[int]:
    """Ascending integer steps 0..T: every step when T <= points, else `points` near-equal gaps."""
    if num_timesteps <= points:
        return list(range(num_timesteps + 1))
    return sorted({round(j * num_timesteps / points) for j in range(points + 1)})


def check_monotone(schedule, progress: ProgressCallback | None = None) -> dict:
    """alpha_0 = 1, alpha_T = 0 and alpha_{t-1}(v) >= alpha_t(v) for every id v and step t."""
    import torch

    T = schedule.num_timesteps
    worst_rise, worst_t, worst_id = -math.inf, 0, 0
    previous = None
    first = last = None
    for start in range(0, T + 1, CHECK_CHUNK):
        t = torch.arange(start, min(start + CHECK_CHUNK, T + 1), dtype=torch.float64)
        alpha = schedule.alpha_vocab(t)  # [chunk, V] or [chunk, 1]
        if first is None:
            first = alpha[0]
        block = alpha if previous is None else torch.cat([previous[None], alpha])
        if block.shape[0] > 1:
            rise = block[1:] - block[:-1]  # alpha_t - alpha_{t-1}: must be <= 0
            value = float(rise.max())
            if value > worst_rise:
                flat = int(rise.argmax())
                row, col = divmod(flat, rise.shape[1])
                worst_rise = value
                worst_t = int(t[0]) + row + (0 if previous is not None else 1)
                worst_id = col
        previous = alpha[-1]
        last = alpha[-1]
        if progress is not None:
            progress("checking alpha", int(t.numel()), T + 1)
    start_error = float((first - 1.0).abs().max())
    end_error = float(last.abs().max())
    monotone = worst_rise <= TOLERANCE
    return {
        "monotone": bool(monotone),
        "endpoints_ok": bool(start_error <= 1e-9 and end_error <= 1e-9),
        "max_alpha_increase": _round(max(worst_rise, 0.0)),
        "worst_step": worst_t,
        "worst_id": worst_id,
        "alpha_0_max_error": _round(start_error),
        "alpha_T_max_error": _round(end_error),
        "checked_steps": T + 1,
        "checked_ids": int(first.numel()),
    }


def _spread(schedule) -> float | None:
    """lambda * max |per-token deviation| (the quantity the limit bounds), for token-aware schedules."""
    if hasattr(schedule, "h"):
        return schedule.spindle_lambda * float(schedule.h.abs().max()) if schedule.h.numel() else 0.0
    if hasattr(schedule, "w"):
        return schedule.spindle_lambda * float((schedule.w - schedule.corpus_mean).abs().max())
    return None


def _tokens(summary: dict, h: np.ndarray) -> list[dict]:
    rows = []
    for role in ("least_informative", "most_informative"):
        for row in summary.get(role, [])[:TOKENS_PER_SIDE]:
            rows.append({"role": role, "id": int(row["id"]), "token": str(row["token"]),
                         "h": _round(float(h[row["id"]]))})
    return rows


def _alpha_columns(schedule, grid: list[int], ids: list[int]) -> np.ndarray:
    """alpha at (grid t, token id): [len(grid), len(ids)] float64 (one column if token-agnostic)."""
    import torch

    table = schedule.alpha_vocab(torch.tensor(grid, dtype=torch.float64))  # [G, V] or [G, 1]
    if table.shape[-1] == 1:
        return table.numpy()
    return table[:, ids].numpy()


def run(params: Params, root: Path, *, progress: ProgressCallback | None = None) -> dict:
    from pipeline.data.stats import TokenStatistics
    from pipeline.diffusion.schedules import (
        ScheduleError,
        max_spindle_lambda,
        schedule_from_params,
    )
    from pipeline.tracking import log_artifact, log_metrics
    from pipeline.viz import line_plot

    layout = Layout(Path(root))
    stats = TokenStatistics.load(require(layout.token_stats, "token statistics", "token-stats"))
    summary = read_json(layout.token_stats / "summary.json")
    h = stats.centred_information()
    schedule = schedule_from_params(params.diffusion, information=h, counts=stats.counts)
    T = schedule.num_timesteps
    with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), *INPUTS]) as _run:
        check = check_monotone(schedule, progress)
        if not (check["monotone"] and check["endpoints_ok"]):
            raise ScheduleError(
                f"schedule {schedule.describe()} fails its check: alpha rises by {check['max_alpha_increase']} at "
                f"step {check['worst_step']} for id {check['worst_id']}, endpoint errors "
                f"{check['alpha_0_max_error']} / {check['alpha_T_max_error']}"
            )
        tokens = _tokens(summary, h)
        ids = [row["id"] for row in tokens]
        grid = curve_grid(T)
        alphas = _alpha_columns(schedule, grid, ids)
        token_aware = alphas.shape[1] == len(ids) and schedule.token_dependent
        names = [f"{schedule.name}[{row['token']}]" for row in tokens] if token_aware else [schedule.name]
        linear = [1.0 - t / T for t in grid]
        probe_t = sorted({round(T * f) for f in (0.0, 0.25, 0.5, 0.75, 1.0)})
        probe = _alpha_columns(schedule, probe_t, ids)
        for i, row in enumerate(tokens):
            column = probe[:, i] if token_aware else probe[:, 0]
            row["alpha"] = {str(t): _round(float(a)) for t, a in zip(probe_t, column)}
        spread = _spread(schedule)
        report = {
            "schedule": schedule.describe(),
            "token_dependent": bool(schedule.token_dependent),
            "continuous": bool(schedule.continuous),
            "leaky": bool(getattr(schedule, "leaky", False)),
            "monotonicity": {
                "limit": _round(max_spindle_lambda(T)) if T > 1 else None,
                "limit_formula": "lambda * max|h(v)| <= 1 / (T sin(pi / T))",
                "lambda_times_max_h": None if spread is None else _round(spread),
                **check,
            },
            "alpha_at": {"t": probe_t, "linear": [_round(1.0 - t / T) for t in probe_t], "tokens": tokens},
        }
        with atomic_directory(layout.schedule) as tmp:
            write_json(report, tmp / "schedule.json")
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            writer.writerow(["t", "linear", *names])
            for j, t in enumerate(grid):
                writer.writerow([t, f"{linear[j]:.6f}", *(f"{a:.6f}" for a in alphas[j, : len(names)])])
            (tmp / "alpha_curves.csv").write_text(buffer.getvalue(), encoding="utf-8")
            series = {"linear (1 - t/T)": linear}
            series.update({name: list(alphas[:, i]) for i, name in enumerate(names)})
            styles = {"linear (1 - t/T)": "k--"}
            line_plot(tmp / "alpha_curves.png", grid, series, styles=styles, xlabel="t", ylabel="alpha_t(v)",
                      title=f"{schedule.name} schedule, T={T}" + (" (leaky bound)" if report["leaky"] else ""))
            log_metrics({"max_alpha_increase": check["max_alpha_increase"],
                         **({"lambda_times_max_h": spread} if spread is not None else {})})
            for name in ("schedule.json", "alpha_curves.csv", "alpha_curves.png"):
                log_artifact(tmp / name)
    return {"stage": STAGE, "output": str(layout.schedule), "schedule": schedule.name, "num_timesteps": T,
            "monotone": check["monotone"], "limit": report["monotonicity"]["limit"],
            "lambda_times_max_h": report["monotonicity"]["lambda_times_max_h"]}
