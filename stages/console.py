"""The CLI's terminal plumbing: input errors as one line and exit code 1, stop signals as a
clean exit, and progress bars on stderr (stdout stays clean for `generate` and `params`)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any

import typer

# Errors that are the user's input, not a bug: one line, exit code 1.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# By name, so that the CLI never imports Ray or yaml's internals to classify: PlacementError (the
# cluster cannot hold the workers), TrainingError (a training run failed; its cause is in the
# message), YAML syntax errors in a params file.
USER_ERROR_NAMES = {"PlacementError", "TrainingError", "YAMLError"}


def one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _is_user_error(err: BaseException) -> bool:
    if isinstance(err, USER_ERRORS):
        return True
    return any(cls.__name__ in USER_ERROR_NAMES for cls in type(err).__mro__)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn input errors (params, corpus, model, schedule, missing files, placement) into
    `error: <message>` + exit 1; anything else is a bug and keeps its traceback.

    Also the command's stop boundary: SIGTERM / SIGINT / SIGHUP unwind it (`pipeline.signals`),
    so MLflow runs end KILLED and no half-written output stays; then one line `stopped by
    SIGTERM` on stderr and exit code 128 + the signal (143, 130, 129)."""
    from pipeline.signals import terminate_on_signals

    stop = None
    try:
        with terminate_on_signals() as stop:
            yield
    except KeyboardInterrupt:  # Terminated, or Ray's KeyboardInterrupt standing in for it
        typer.echo(f"stopped by {stop.signame if stop and stop.signame else 'SIGINT'}", err=True)
        raise typer.Exit(stop.exit_code if stop else 130) from None
    except (typer.Exit, typer.Abort):
        raise
    except Exception as err:
        if not _is_user_error(err) or os.environ.get("DBERT_DEBUG"):
            raise
        typer.echo(f"error: {one_line(err)}", err=True)
        raise typer.Exit(1) from None


def quiet_hf() -> None:
    """No tqdm bars from transformers (loading and saving weights) under our own bars."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()


ENV_PROGRESS = "DBERT_PROGRESS"  # "log": plain progress lines on stderr when it is not a terminal


class RichProgress:
    """`progress(task, advance, total)` drawn as rich bars on stderr. When stderr is not a terminal
    the bars are silent, unless `$DBERT_PROGRESS=log` (set by `dbert ablation --background` and
    `make schedules*`): then a timestamped line per 10% of each task, with its rate and time
    left, so a run's log file says how far it got."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=not console.is_terminal,
        )
        self._tasks: dict[str, Any] = {}
        self._log: dict[str, list[float]] | None = None  # per task: see _log_line
        if not console.is_terminal and os.environ.get(ENV_PROGRESS) == "log":
            self._log = {}

    def __enter__(self) -> RichProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def __call__(self, task: str, advance: int = 1, total: int | None = None) -> None:
        if task not in self._tasks:
            self._tasks[task] = self._progress.add_task(str(task), total=total)
        elif total is not None:
            self._progress.update(self._tasks[task], total=total)
        self._progress.advance(self._tasks[task], advance)
        if self._log is not None:
            self._log_line(self._log, task, advance, total)

    @staticmethod
    def _log_line(log: dict[str, list[float]], task: str, advance: int, total: int | None) -> None:
        import sys
        import time

        now = time.monotonic()
        # done, total, when the first call came, done after it (a resumed run starts past 0; the
        # rate counts from there, so the first call has none), next tenth
        done, known, start, base, tenth = log.setdefault(task, [0.0, 0.0, now, float(advance), 1.0])
        done += advance
        known = float(total) if total is not None else known
        if known > 0 and done >= tenth * known / 10:
            rate = (now - start) / (done - base) if done > base else None
            speed = f"{rate:.3g} s each" if rate is not None else "rate after the next update"
            left = f", {time.strftime('%H:%M:%S', time.gmtime(rate * max(known - done, 0)))} left" if rate else ""
            print(
                f"[{time.strftime('%H:%M:%S')}] {task}: {done:.0f}/{known:.0f} ({done / known:.0%}), {speed}{left}",
                file=sys.stderr,
                flush=True,
            )
            tenth = math.floor(10 * done / known) + 1.0
        log[task] = [done, known, start, base, tenth]
