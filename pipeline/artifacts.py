"""Where each stage writes its outputs, and loaders for what later stages read.

One layout for the DVC stages, the CLI and the tests (which point it at a temporary root).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Layout:
    root: Path

    @property
    def prepared(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def token_stats(self) -> Path:
        return self.root / "data" / "token_stats"

    @property
    def schedule(self) -> Path:
        return self.root / "data" / "schedule"

    @property
    def model(self) -> Path:
        return self.root / "models" / "final"

    @property
    def train_out(self) -> Path:
        return self.root / "outputs" / "train"

    @property
    def eval_out(self) -> Path:
        return self.root / "outputs" / "evaluate"

    @property
    def samplers_out(self) -> Path:
        return self.root / "outputs" / "samplers"

    @property
    def tune_out(self) -> Path:
        return self.root / "outputs" / "tune"

    @property
    def ablation_out(self) -> Path:
        return self.root / "outputs" / "ablation"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def ray_results(self) -> Path:
        return self.root / "ray_results"


@contextmanager
def atomic_directory(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Write a stage output into a temporary sibling and move it into place only on success,
    so a failed or killed stage never leaves a half-written output behind. The swap itself runs
    under `pipeline.signals.held()`: a stop signal never lands between removing the old output
    and renaming the new one into place."""
    from pipeline.signals import held

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp: Path | None = None
    try:
        with held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        yield tmp
        with held():
            _swap_into_place(tmp, target)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing target is renamed aside first and removed after."""
    if not (target.exists() or target.is_symlink()):
        new.rename(target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    old = aside / target.name
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside)


def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays unwrapped, non-finite floats -> None, paths -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


def dumps_json(obj) -> str:
    """Canonical JSON text (sorted keys, 2-space indent, trailing newline)."""
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def write_json(obj, path: str | os.PathLike[str]) -> None:
    """Write canonical JSON: the bytes depend on the content only (DVC reruns nothing for nothing)."""
    Path(path).write_text(dumps_json(obj), encoding="utf-8")


def write_file_atomic(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write a single file via a temporary sibling + rename (never half-written)."""
    from pipeline.signals import held

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with held():  # a stop signal right after mkstemp must not leave the temporary file behind
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
            handle = os.fdopen(fd, "wb")
        with handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; an output is a normal file
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return path


def write_json_atomic(obj, path: str | os.PathLike[str]) -> Path:
    """`write_json`, never half-written (records that a crash must not corrupt)."""
    return write_file_atomic(path, dumps_json(obj))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A header line, then one line per row, "\n" line ends; cells as `csv` writes them, so
    callers format numbers themselves (the bytes are the output DVC hashes)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv_atomic(path: str | os.PathLike[str], header: Sequence[str], rows: Iterable[Sequence[Any]]) -> Path:
    """`csv_text` written via `write_file_atomic` (never half-written)."""
    return write_file_atomic(path, csv_text(header, rows))


def read_json(path: str | os.PathLike[str]):
    return json.loads(Path(path).read_text(encoding="utf-8"))
