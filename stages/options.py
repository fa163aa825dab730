"""The options every `dbert` command shares, and how an experiment file and the command line
combine into overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages.console import user_errors

ParamsOption = Annotated[
    Path | None,
    typer.Option("--params", metavar="PATH", help="Params file (default: <root>/params.yaml).", dir_okay=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-S",
        metavar="KEY=VALUE",
        help="Override a param, e.g. train.lr=3e-4 (the syntax of `dvc exp run -S`); repeatable.",
    ),
]
ExperimentOption = Annotated[
    Path | None,
    typer.Option(
        "--experiment",
        "-e",
        metavar="FILE",
        dir_okay=False,
        help="An experiment file (experiments/*.yaml): params.yaml-shaped overrides, applied before any --set.",
    ),
]
RootOption = Annotated[
    Path | None,
    typer.Option(
        "--root",
        metavar="DIR",
        file_okay=False,
        help="Project checkout to read from and write to (default: the nearest directory at or above "
        "the current one with dvc.yaml or params.yaml).",
    ),
]


def with_experiment(experiment: Path | None, overrides: list[str] | None) -> list[str]:
    """The experiment file's overrides, then the command line's `--set`s (a bad file: one-line error)."""
    if experiment is None:
        return list(overrides or [])
    from pipeline.overrides import experiment_overrides

    with user_errors():
        return [*experiment_overrides(experiment), *(overrides or [])]


def command_line() -> str:
    """`dbert <the arguments this process got>`: what a report says it was written by."""
    import shlex
    import sys

    return shlex.join(["dbert", *sys.argv[1:]])
