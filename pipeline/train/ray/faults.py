"""Test-only fault injection: make rank 0 of a training run die (or pause) at a chosen step, once.

Why it exists: the resume tests (tests/integration/test_ray_train.py) must see a real worker die mid-run and
Ray Train restart it from its last checkpoint, and nothing else makes a worker die on cue. Set
`DBERT_FAIL_AT_STEP=<step>` (and, to fire only once across restarts, `DBERT_FAIL_MARKER=<file>`)
in the driver's environment: the driver turns them into a `FaultPlan` (`plan_from_env`) that
travels in the worker config, because a Ray cluster started earlier never sees them. The worker
calls `maybe_fail` after every optimizer step; without a plan it returns at once.

`DBERT_PAUSE_AT_STEP=<step>` (with `DBERT_PAUSE_MARKER=<file>`) instead holds rank 0 still at
that step, after its last checkpoint is registered, for `DBERT_PAUSE_S` seconds (default 120),
and creates `<file>.paused` when it starts waiting: the multi-node test removes a whole Ray node
then, mid-run, whatever the machine's speed.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_FAIL_AT_STEP = "DBERT_FAIL_AT_STEP"
ENV_FAIL_MARKER = "DBERT_FAIL_MARKER"
ENV_PAUSE_AT_STEP = "DBERT_PAUSE_AT_STEP"
ENV_PAUSE_MARKER = "DBERT_PAUSE_MARKER"
ENV_PAUSE_S = "DBERT_PAUSE_S"
PAUSED_SUFFIX = ".paused"
MARKER_NAME = ".injected_failure"  # under the run folder, when DBERT_FAIL_MARKER is not set

_log = logging.getLogger(__name__)


class InjectedFailure(RuntimeError):
    """The planned failure in local mode, where killing the process would kill the driver."""


@dataclass(frozen=True)
class FaultPlan:
    """Where and how a run fails: rank 0 at `fail_at_step` (or pauses at `pause_at_step`), unless
    `marker` already exists."""

    fail_at_step: int | None
    marker: Path  # created when the failure (or pause) fires, so a restarted worker goes on
    run_dir: Path  # the run folder, where the Train controller records its checkpoints
    local_mode: bool  # raise InjectedFailure instead of killing the process
    pause_at_step: int | None = None
    pause_s: float = 120.0


def fault_env() -> dict[str, str]:
    """The fault-injection variables set in this process (a Tune driver hands them to its trials,
    which run in processes that never saw them)."""
    names = (ENV_FAIL_AT_STEP, ENV_FAIL_MARKER, ENV_PAUSE_AT_STEP, ENV_PAUSE_MARKER, ENV_PAUSE_S)
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def plan_from_env(run_dir: Path, local_mode: bool, env: Mapping[str, str] | None = None) -> FaultPlan | None:
    """The plan `$DBERT_FAIL_AT_STEP` / `$DBERT_PAUSE_AT_STEP` (and their markers) ask for, read
    from `env` (default: this process's environment); None when unset. Without a marker the
    plan's marker sits in `run_dir`, so each run (each Tune trial) fires once."""
    env = os.environ if env is None else env
    fail_at = env.get(ENV_FAIL_AT_STEP)
    pause_at = env.get(ENV_PAUSE_AT_STEP)
    if pause_at:
        marker = env.get(ENV_PAUSE_MARKER) or str(Path(run_dir) / MARKER_NAME)
        return FaultPlan(
            fail_at_step=None,
            marker=Path(marker),
            run_dir=Path(run_dir),
            local_mode=local_mode,
            pause_at_step=int(pause_at),
            pause_s=float(env.get(ENV_PAUSE_S, "120")),
        )
    if not fail_at:
        return None
    marker = env.get(ENV_FAIL_MARKER) or str(Path(run_dir) / MARKER_NAME)
    return FaultPlan(fail_at_step=int(fail_at), marker=Path(marker), run_dir=Path(run_dir), local_mode=local_mode)


def maybe_fail(plan: FaultPlan | None, step: int, *, rank: int, last_checkpoint: str | None) -> None:
    """Fire `plan` if this is rank 0 at its step and it has not fired yet: raise InjectedFailure in
    local mode, else kill this process (as if the node went away) once the controller holds
    `last_checkpoint`, the name of the last checkpoint this rank handed on."""
    if plan is None or rank != 0 or step not in (plan.fail_at_step, plan.pause_at_step):
        return
    if plan.marker.exists():
        return
    if step == plan.pause_at_step:
        _pause(plan, step, last_checkpoint)
        return
    plan.marker.parent.mkdir(parents=True, exist_ok=True)
    plan.marker.touch()
    if plan.local_mode:
        raise InjectedFailure(f"{ENV_FAIL_AT_STEP}={plan.fail_at_step}: injected failure at step {step}")
    if last_checkpoint is not None:
        await_checkpoint_registered(plan.run_dir, last_checkpoint)
    _log.warning("%s=%s: killing training worker rank 0 at step %d", ENV_FAIL_AT_STEP, plan.fail_at_step, step)
    os._exit(1)


def _pause(plan: FaultPlan, step: int, last_checkpoint: str | None) -> None:
    plan.marker.parent.mkdir(parents=True, exist_ok=True)
    plan.marker.touch()
    if last_checkpoint is not None and not plan.local_mode:
        await_checkpoint_registered(plan.run_dir, last_checkpoint)
    _log.warning("%s=%d: rank 0 holds still for %gs", ENV_PAUSE_AT_STEP, step, plan.pause_s)
    Path(str(plan.marker) + PAUSED_SUFFIX).touch()
    time.sleep(plan.pause_s)


def await_checkpoint_registered(run_dir: Path, name: str, timeout_s: float = 60.0) -> bool:
    """Wait until the Train controller has registered checkpoint `name` of this run; False after
    `timeout_s` (the kill then goes ahead anyway).

    `ray.train.report` returns once the report is queued in the worker; the controller takes it
    with its next `poll_status` call, and Ray 2.60 drops it from the queue before the reply is on
    its way (its "two phase commit" TODO). A worker that dies in between loses that report: its
    checkpoint is never registered and the restart begins from an older one, or from scratch.
    The controller writes `checkpoint_manager_snapshot.json` into the run folder right after it
    registers a checkpoint, so the kill waits until that file names the checkpoint.
    """
    try:
        from ray.train.v2._internal.constants import (
            CHECKPOINT_MANAGER_SNAPSHOT_FILENAME as snapshot_name,
        )
    except ImportError:
        snapshot_name = "checkpoint_manager_snapshot.json"
    snapshot = Path(run_dir) / snapshot_name
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = snapshot.read_text()
            json.loads(text)  # not a half-written file
            if f'"{name}"' in text:
                return True
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            _log.warning("%s never appeared in %s; killing the worker anyway", name, snapshot)
            return False
        time.sleep(0.05)
