"""Runs in storage: the record of the last run of a layout, and the checkpoints under a run folder.

The record (on the driver's disk) is what `resume=True` (and the ablation) finds the last run by;
checkpoints are named `checkpoint_<step>` the way Ray Train names them, so Ray's and local mode's
look alike, and live wherever `train.storage` says (`storage`).
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from pathlib import Path

from pipeline.artifacts import Layout, atomic_directory, read_json, write_file_atomic, write_json_atomic
from pipeline.train.ray import storage

RUN_RECORD = "last_run.json"
CHECKPOINT_PREFIX = "checkpoint_"
KEEP_CHECKPOINTS = 2
HISTORY_FILE = "history.jsonl"  # rank 0's reports, one JSON object a line, across resumes (local runs)


def new_run_name(prefix: str = "train") -> str:
    """`<prefix>-<yyyymmdd-HHMMSS>-<6 hex>`: sortable, and unique (Ray resumes a reused name)."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _record_paths(layout: Layout) -> list[Path]:
    # outputs/train is a DVC output (removed by `dvc repro`, replaced whole by the train stage);
    # the copy next to the Ray results survives both.
    return [layout.train_out / RUN_RECORD, layout.ray_results / RUN_RECORD]


def record_run(layout: Layout, run_name: str, storage: str | Path, num_workers: int) -> dict:
    """Write the run record (both copies) before training starts, so a stopped run can resume."""
    record = {
        "run_name": run_name,
        "storage_path": str(storage),
        "num_workers": num_workers,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    for path in _record_paths(layout):
        write_json_atomic(record, path)
    return record


def recorded_storage(record: dict) -> str | Path:
    """The storage location a run record names (a URI stays a str, a path becomes a Path)."""
    value = record["storage_path"]
    return value if storage.is_uri(value) else Path(value)


def last_run(layout: Layout) -> dict | None:
    """The record of the last `run_training` of this layout (outputs/train, else ray_results)."""
    for path in _record_paths(layout):
        if path.is_file():
            return read_json(path)
    return None


def resumable(layout: Layout) -> bool:
    """Whether `resume=True` would continue something: the last recorded run has a complete
    checkpoint (a run stopped before its first one has nothing to continue from)."""
    record = last_run(layout)
    if record is None:
        return False
    return latest_checkpoint(storage.join(recorded_storage(record), record["run_name"])) is not None


def checkpoint_step(directory: str | Path) -> int | None:
    """The optimizer step a checkpoint was taken at; None when it has no readable progress."""
    from pipeline.train.checkpoint import META_FILE  # torch: only when a checkpoint is read

    text = storage.read_text(storage.join(directory, META_FILE))
    try:
        return int(json.loads(text)["step"]) if text is not None else None
    except (ValueError, KeyError, TypeError):
        return None


def checkpoint_name(step: int) -> str:
    """The folder name of the checkpoint at `step` (the same on Ray and in local mode)."""
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def _checkpoints(run_dir: str | Path) -> list[tuple[int, str | Path]]:
    """(step, location) of the complete checkpoints under a run folder, oldest first."""
    from pipeline.train.checkpoint import MODEL_FILE, STATE_FILE

    found = []
    for name in storage.list_dirs(run_dir):
        if not name.startswith(CHECKPOINT_PREFIX):
            continue
        location = storage.join(run_dir, name)
        step = checkpoint_step(location)
        if step is None or not all(storage.exists(storage.join(location, f)) for f in (MODEL_FILE, STATE_FILE)):
            continue
        found.append((step, location))
    return sorted(found, key=lambda item: item[0])


def latest_checkpoint(run_dir: str | Path) -> str | Path | None:
    """The complete checkpoint with the highest step under a run folder (Ray's or local mode's),
    on the driver's disk or any storage `train.storage` names."""
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def persist_checkpoint(source: Path, run_dir: str | Path, step: int, keep: int = KEEP_CHECKPOINTS) -> str | Path:
    """Copy a checkpoint into the run folder and keep the newest `keep`: what Ray Train does for
    its workers, done by hand where Ray persists nothing (local mode, Tune trials in their own
    process). Atomic on a local disk; on other stores the progress file goes last, and a copy
    without it is not a checkpoint (`latest_checkpoint` skips it)."""
    from pipeline.train.checkpoint import META_FILE

    target = storage.join(run_dir, checkpoint_name(step))
    if not storage.is_uri(run_dir):
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        with atomic_directory(Path(target)) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
    else:  # any URI, file:// too: one code path for every store
        storage.upload_dir(source, target, last=META_FILE)
    for _, old in _checkpoints(run_dir)[:-keep] if keep > 0 else []:
        storage.delete_dir(old)
    return target


def earlier_history(run_dir: Path, up_to_step: int) -> list[dict]:
    """The reports a run made before it was stopped, up to the checkpoint it resumes from, and the
    history file cut back to them (reports after that checkpoint are made again). A resumed
    training's history (and a row's validation curve) then starts at step 1, not at the resume."""
    path = run_dir / HISTORY_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut off when the process was killed
            continue
        if int(entry.get("step", 0)) <= up_to_step:
            entries.append(entry)
    write_file_atomic(path, "".join(json.dumps(e) + "\n" for e in entries))
    return entries


def append_history(run_dir: Path, entry: dict) -> None:
    """One report more in the run's history file."""
    with open(run_dir / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry, default=str) + "\n")
