"""Stop signals as exceptions: a killed stage unwinds instead of vanishing.

SIGTERM's default action ends Python at once: no `finally`, no `__exit__`, so MLflow runs stay
RUNNING and temporary output directories stay behind. Inside `terminate_on_signals()` SIGTERM,
SIGINT and SIGHUP raise `Terminated` (a KeyboardInterrupt) in the main thread instead, so every
context manager unwinds: `start_stage_run` ends its run KILLED, `atomic_directory` removes its
temporary directory. The handlers that were there before are put back on exit.

    with terminate_on_signals() as stop:
        ...                     # a SIGTERM here raises Terminated(SIGTERM)
    stop.signame                # "SIGTERM" (None when no signal came); stop.exit_code: 143

`keep_handlers()` wraps code that installs handlers of its own (`ray.init()`), so that ours stay.
`held()` marks a critical section (swapping an output into place, ending a run): a signal that
arrives inside it is raised when it ends. While the process is already stopping, the next stop
signal is ignored (cleanup runs on) and the one after ends the process at once.

Only the main thread installs handlers (elsewhere these are no-ops); a signal that was ignored
(SIG_IGN: `nohup`, a background job's SIGINT) stays ignored. Importing this module changes nothing.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")


class Terminated(KeyboardInterrupt):
    """A stop signal arrived while `terminate_on_signals` was active."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = int(signum)

    @property
    def signame(self) -> str:
        return _name(self.signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return f"stopped by {self.signame}"


class _State:
    """Process-wide: handlers run in the main thread only, whatever guard installed them."""

    def __init__(self) -> None:
        self.depth = 0  # guards entered and not yet left
        self.hold = 0  # held() sections entered and not yet left
        self.signum: int | None = None  # the signal that is stopping the process
        self.pending = False  # it arrived inside held() and is still to be raised
        self.repeats = 0  # stop signals after the first one


_state = _State()


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _signums() -> list[int]:
    return [getattr(signal, name) for name in STOP_SIGNALS if hasattr(signal, name)]


def _handle(signum: int, frame: FrameType | None) -> None:
    del frame
    if _state.signum is not None:  # already stopping: let the cleanup finish, unless told twice
        _state.repeats += 1
        if _state.repeats >= 2:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        print(
            f"{_name(signum)} again: still cleaning up; send it once more to stop at once", file=sys.stderr, flush=True
        )
        return
    _state.signum = signum
    if _state.hold:
        _state.pending = True
        return
    raise Terminated(signum)


class SignalScope:
    """What `terminate_on_signals` yields: which signal stopped the block, once it has."""

    signum: int | None = None

    @property
    def signame(self) -> str | None:
        return None if self.signum is None else _name(self.signum)

    @property
    def exit_code(self) -> int:
        """128 + the signal (130 for SIGINT, 143 for SIGTERM); 130 for a plain KeyboardInterrupt."""
        return 128 + (self.signum if self.signum is not None else signal.SIGINT)


def received() -> int | None:
    """The stop signal being handled now (inside `terminate_on_signals`), else None."""
    return _state.signum


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[SignalScope]:
    """SIGTERM / SIGINT / SIGHUP raise `Terminated` inside the block (main thread only)."""
    scope = SignalScope()
    if not _main_thread():
        yield scope
        return
    previous: dict[int, Any] = {}
    for signum in _signums():
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        try:
            signal.signal(signum, _handle)
        except (ValueError, OSError):  # pragma: no cover - an embedded interpreter
            continue
        previous[signum] = current
    _state.depth += 1
    try:
        yield scope
    finally:
        scope.signum = _state.signum
        _state.depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        if _state.depth == 0:
            _state.signum, _state.pending, _state.repeats = None, False, 0


@contextlib.contextmanager
def held() -> Iterator[None]:
    """A critical section: a stop signal that arrives inside is raised as `Terminated` at its end."""
    if not _main_thread():
        yield
        return
    _state.hold += 1
    try:
        yield
    finally:
        _state.hold -= 1
        if _state.hold == 0 and _state.pending:
            _state.pending = False
            raise Terminated(_state.signum if _state.signum is not None else signal.SIGTERM)


@contextlib.contextmanager
def keep_handlers() -> Iterator[None]:
    """Around code that installs stop-signal handlers of its own (`ray.init()` puts
    `sys.exit(15)` on SIGTERM in the driver): the handlers `terminate_on_signals` installed are
    put back when it returns. Signals it does not handle are left as that code set them."""
    if not _main_thread():
        yield
        return
    ours = [signum for signum in _signums() if signal.getsignal(signum) is _handle]
    try:
        yield
    finally:
        for signum in ours:
            if signal.getsignal(signum) is not _handle:
                signal.signal(signum, _handle)
