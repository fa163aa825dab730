"""schedule: build the noise schedule the params describe, check it, and draw alpha_t(v).

Reads  params `diffusion.schedule`, `diffusion.num_timesteps`, `diffusion.spindle_lambda`,
       `diffusion.power_gamma`, `diffusion.loglinear_eps`; data/token_stats/counts.npy and summary.json.
Writes data/schedule/schedule.json (the schedule's description, the monotonicity limit
       1/(T sin(pi/T)) and the result of an exhaustive check: alpha_0 = 1, alpha_T = 0 and
       alpha_t(v) non-increasing in t for *every* vocabulary id at *every* step; alpha at a few t
       for the most / least informative tokens), data/schedule/alpha_curves.csv (t, the linear
       alpha, alpha of those tokens) and data/schedule/alpha_curves.png.

A schedule that fails the check stops here with a ScheduleError and writes nothing; `train`
depends on schedule.json, so it never trains on a broken schedule.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, read_json, write_csv_atomic, write_json
from pipeline.config import Params
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "schedule"
PARAMS = (
    "diffusion.schedule",
    "diffusion.num_timesteps",
    "diffusion.spindle_lambda",
    "diffusion.power_gamma",
    "diffusion.loglinear_eps",
)
INPUTS = ("data/token_stats/counts.npy", "data/token_stats/summary.json")
OUTPUTS = ("data/schedule/schedule.json", "data/schedule/alpha_curves.csv", "data/schedule/alpha_curves.png")


def run(
    params: Params, root: Path, *, progress: ProgressCallback | None = None, tracking_uri: str | None = None
) -> dict:
    from pipeline.assembly.schedule import schedule_from_params
    from pipeline.data.stats import TokenStatistics
    from pipeline.diffusion.checks import LINEAR, alpha_curves, probe_tokens, require_monotone, schedule_report
    from pipeline.tracking.log import log_artifact, log_metrics
    from pipeline.viz import line_plot

    layout = Layout(Path(root))
    stats = TokenStatistics.load(require(layout.token_stats, "token statistics", "token-stats"))
    summary = read_json(layout.token_stats / "summary.json")
    h = stats.centred_information()
    schedule = schedule_from_params(params.diffusion, information=h, counts=stats.counts)
    T = schedule.num_timesteps
    with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), *INPUTS], tracking_uri=tracking_uri):
        check = require_monotone(schedule, progress)  # ScheduleError: nothing is written
        tokens = probe_tokens(summary, h)
        report = schedule_report(schedule, check, tokens)
        curves = alpha_curves(schedule, tokens)
        with atomic_directory(layout.schedule) as tmp:
            write_json(report, tmp / "schedule.json")
            write_csv_atomic(tmp / "alpha_curves.csv", curves.csv_header(), curves.csv_rows())
            line_plot(
                tmp / "alpha_curves.png",
                curves.t,
                curves.series(),
                styles={LINEAR: "k--"},
                xlabel="t",
                ylabel="alpha_t(v)",
                title=f"{schedule.name} schedule, T={T}" + (" (leaky bound)" if report["leaky"] else ""),
            )
            log_metrics(
                {"max_alpha_increase": check["max_alpha_increase"], "lambda_times_max_h": schedule.token_spread()}
            )  # None (token-agnostic) is skipped
            for name in OUTPUTS:
                log_artifact(tmp / Path(name).name)
    return {
        "stage": STAGE,
        "output": str(layout.schedule),
        "schedule": schedule.name,
        "num_timesteps": T,
        "monotone": check["monotone"],
        "limit": report["monotonicity"]["limit"],
        "lambda_times_max_h": report["monotonicity"].get("lambda_times_max_h"),
        "token_spread": report["monotonicity"].get("token_spread"),
    }
