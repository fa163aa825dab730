"""`dbert ablation`: PAPER §8's rows (or an experiment file's), in the foreground, detached, or as
a report of the rows finished so far."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Annotated

import typer

from stages import ablation
from stages.console import ENV_PROGRESS, user_errors
from stages.invoke import resolve, run_stage, stage_help
from stages.options import ExperimentOption, ParamsOption, RootOption, SetOption, command_line, with_experiment

HELP = stage_help(
    ablation,
    "PAPER §8's rows (D3PM, DiffusionBERT linear/spindle x time designs, BERT-Mouth, the leaky "
    "spindle_paper, a packed row), one budget each (ablation.train_steps), and one report.",
    "Each row is the base params plus its overrides; run `dvc repro token_stats` first. One MLflow parent run "
    "with a child per row. Run it again to resume: finished rows are reused and an interrupted one continues "
    "from its checkpoint.",
)


def ablation_command(
    params: ParamsOption = None,
    set_: SetOption = None,
    root: RootOption = None,
    rows: Annotated[
        list[str] | None,
        typer.Option("--row", metavar="NAME", help="Run only this row (repeatable; default: ablation.rows)."),
    ] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete outputs/ablation first instead of resuming.")] = False,
    background: Annotated[
        bool,
        typer.Option(
            "--background",
            help="Detach: run in a new session, log to <ablation.out>/run.log (outputs/ablation/), print the pid.",
        ),
    ] = False,
    report_only: Annotated[
        bool,
        typer.Option(
            "--report-only",
            help="Train and evaluate nothing: write the report of the rows finished so far (here or under "
            "ablation.publish), e.g. while the rows run elsewhere or after the report code changed.",
        ),
    ] = False,
    experiment: ExperimentOption = None,
) -> None:
    import time

    if report_only and (rows or fresh or background):
        raise typer.BadParameter("--report-only reports the whole plan: drop --row, --fresh and --background")
    if background:
        ablation_in_background(params, set_, root, rows, fresh, experiment)
        return
    set_ = with_experiment(experiment, set_)
    if report_only:
        with user_errors():
            summary = ablation.report_only(*resolve(params, set_, root), command=command_line())
        typer.echo(f"report: {summary['report']}/report.md ({summary['rows']} rows finished)")
        for number, verdict in summary["claims"].items():
            typer.echo(f"claim {number}: {verdict}")
        return

    def on_row(index: int, total: int, key: str, status: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        typer.echo(f"[{stamp}] row {index + 1}/{total} {key}: {status}", err=True)

    summary = run_stage(
        ablation,
        params,
        set_,
        root,
        quiet_transformers=True,
        only=rows,
        fresh=fresh,
        on_row=on_row,
        command=command_line(),
    )
    typer.echo(f"report: {summary['report']}/report.md")
    typer.echo(f"mlflow_run_id: {summary['mlflow_run_id']}")
    for number, verdict in summary["claims"].items():
        typer.echo(f"claim {number}: {verdict}")


def ablation_in_background(
    params: Path | None,
    overrides: list[str] | None,
    root: Path | None,
    rows: list[str] | None,
    fresh: bool,
    experiment: Path | None = None,
) -> None:
    """`dbert ablation` again in a new session, logging to `<ablation.out>/run.log` (two experiments
    with their own `ablation.out` run side by side); bad params or an unknown row fail here, not in
    the detached process."""
    import sys

    from pipeline.ablation.rows import plan

    with user_errors():
        p, r = resolve(params, with_experiment(experiment, overrides), root)
        plan(p, rows)
        out = r / p.ablation.out
        out.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "stages.cli", "ablation", "--root", str(r)]
        command += [f"--params={params}"] if params else []
        command += [f"--experiment={Path(experiment).resolve()}"] if experiment else []
        command += [f"--set={item}" for item in overrides or []] + [f"--row={row}" for row in rows or []]
        command += ["--fresh"] if fresh else []
        with open(out / "run.log", "ab") as log:
            child = subprocess.Popen(
                command,
                cwd=r,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={ENV_PROGRESS: "log", **os.environ},  # the log says how far it got (unless set otherwise)
            )
        (out / "run.pid").write_text(f"{child.pid}\n", encoding="utf-8")
    typer.echo(
        f"ablation running in the background, pid {child.pid}; follow: tail -f {out / 'run.log'}; "
        f"stop: kill {child.pid} (run `dbert ablation` again to resume)"
    )
