"""Tracking is never on the critical path of a result: the first failure to log to MLflow in a
process (a tracking server gone, a store that cannot be written) becomes one warning, and the
process logs nothing more, so a stage goes on and writes its outputs instead of waiting on
retries for every report or losing its work to a traceback."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

_FAILED: list[str] = []  # the first logging failure of this process, once there was one


def tracking_failed() -> str | None:
    """Why logging to MLflow failed in this process (then nothing more is logged), or None."""
    return _FAILED[0] if _FAILED else None


def best_effort(fn: F) -> F:
    """Run `fn` unless logging already failed in this process; its first failure becomes one
    warning and None (a stop signal still propagates)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _FAILED:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            _record(err)
            warnings.warn(
                f"MLflow tracking failed ({_FAILED[0]}); the stage goes on and writes its outputs, "
                "but logs nothing more to MLflow",
                stacklevel=2,
            )
            return None

    return wrapper  # type: ignore[return-value]


def _record(err: BaseException) -> None:
    _FAILED.append(" ".join(f"{type(err).__name__}: {err}".split())[:300])


def reset() -> None:
    """A stage run that opened on its store starts with tracking working again."""
    _FAILED.clear()


def note_failure(what: str, err: BaseException) -> None:
    """Record a tracking failure outside `best_effort` (ending a run, logging a model): one
    warning, once per process."""
    if _FAILED:
        return
    _record(err)
    warnings.warn(f"MLflow tracking failed while {what} ({_FAILED[0]}); logging nothing more to MLflow", stacklevel=3)
