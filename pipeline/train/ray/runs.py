"""Runs on disk: the record of the last run of a layout, and the checkpoints under a run folder.

The record is what `resume=True` (and the ablation) finds the last run by; checkpoints are named
`checkpoint_<step>` the way Ray Train names them, so Ray's and local mode's look alike.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, read_json, write_json_atomic

RUN_RECORD = "last_run.json"
CHECKPOINT_PREFIX = "checkpoint_"
KEEP_CHECKPOINTS = 2


def new_run_name(prefix: str = "train") -> str:
    """`<prefix>-<yyyymmdd-HHMMSS>-<6 hex>`: sortable, and unique (Ray resumes a reused name)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _record_paths(layout: Layout) -> list[Path]:
    # outputs/train is a DVC output (removed by `dvc repro`, replaced whole by the train stage);
    # the copy next to the Ray results survives both.
    return [layout.train_out / RUN_RECORD, layout.ray_results / RUN_RECORD]


def record_run(layout: Layout, run_name: str, storage_path: Path, num_workers: int) -> dict:
    """Write the run record (both copies) before training starts, so a stopped run can resume."""
    record = {
        "run_name": run_name,
        "storage_path": str(storage_path),
        "num_workers": num_workers,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for path in _record_paths(layout):
        write_json_atomic(record, path)
    return record


def last_run(layout: Layout) -> dict | None:
    """The record of the last `run_training` of this layout (outputs/train, else ray_results)."""
    for path in _record_paths(layout):
        if path.is_file():
            return read_json(path)
    return None


def checkpoint_step(directory: Path) -> int | None:
    """The optimizer step a checkpoint was taken at; None when it has no readable progress."""
    from pipeline.train.checkpoint import META_FILE  # torch: only when a checkpoint is read

    try:
        return int(json.loads((Path(directory) / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step` (the same on Ray and in local mode)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step under a run folder (Ray's or local mode's)."""
    from pipeline.train.checkpoint import MODEL_FILE, STATE_FILE

    best: tuple[int, Path] | None = None
    if not Path(run_dir).is_dir():
        return None
    for child in Path(run_dir).iterdir():
        if not child.is_dir() or not child.name.startswith(CHECKPOINT_PREFIX):
            continue
        step = checkpoint_step(child)
        if step is None or not (child / MODEL_FILE).is_file() or not (child / STATE_FILE).is_file():
            continue
        if best is None or step > best[0]:
            best = (step, child)
    return best[1] if best else None


def persist_checkpoint(source: Path, run_dir: Path, step: int, keep: int = KEEP_CHECKPOINTS) -> Path:
    """Copy a checkpoint into the run folder atomically and keep the newest `keep`: what Ray
    Train does for its workers, done by hand where Ray persists nothing (local mode, Tune trials
    in their own process)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    target = run_dir / checkpoint_name(step)
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
    kept = sorted(
        (c for c in run_dir.iterdir() if c.is_dir() and c.name.startswith(CHECKPOINT_PREFIX)),
        key=lambda c: checkpoint_step(c) or -1,
    )
    for old in kept[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return target
