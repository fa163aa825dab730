"""What the workers train on, sent through Ray's object store instead of driver-local paths.

A worker on another node has none of the driver's files: not `data/prepared`, not
`data/token_stats`, not a model folder given as `model.name_or_path`. The driver reads them once
and `ray.put`s them; each worker `ray.get`s them from its node's object store. Why the object
store and not Ray Data shards per rank: every rank draws its batches from one global,
length-bucketed order that a resume must replay exactly (`TrainPosition` = epoch and batch),
so each rank needs the whole (small, int32, unpadded) token array, and the object store keeps one
read-only copy per node that all its workers map without copying; `benchmarks/bench_inputs.py`
measures it at LM1B-full size (numbers in README "Scaling out").

In local mode (`train.num_workers=0`) the same objects are passed as they are, without Ray.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Params, with_values

MODEL_CACHE = "dbert-shipped-models"  # below the worker's temp dir: one folder per model digest


def shippable_model_dir(name_or_path: str) -> Path | None:
    """The local folder a worker cannot be assumed to have: `model.name_or_path` when it is an
    existing directory (the bundled default model is installed with the pipeline on every node,
    a Hub id is downloaded by each node, `random` needs no files)."""
    from pipeline.model.loading import DEFAULT_MODEL, RANDOM_MODEL

    if name_or_path in (DEFAULT_MODEL, RANDOM_MODEL):
        return None
    path = Path(name_or_path).expanduser()
    return path.resolve() if path.is_dir() else None


def read_model_files(directory: Path) -> dict[str, bytes]:
    """Every file below a model folder, by relative POSIX path."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def files_digest(files: dict[str, bytes]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:16]


def write_model_files(files: dict[str, bytes], digest: str, cache: Path | None = None) -> Path:
    """Materialise shipped model files on this node, once per digest (atomic rename)."""
    cache = cache or Path(tempfile.gettempdir()) / MODEL_CACHE
    target = cache / digest
    if target.is_dir():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=cache))
    for name, data in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / name).write_bytes(data)
    try:
        os.rename(tmp, target)
    except OSError:  # another worker on this node won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target


@dataclass(frozen=True)
class TrainInputs:
    """The prepared splits, the token statistics and (when needed) the model folder's files:
    plain objects, or Ray ObjectRefs after `ship()`."""

    splits: Any  # {"train": TokenizedSplit, "validation": TokenizedSplit}, or its ObjectRef
    stats: Any  # TokenStatistics, or its ObjectRef
    model_files: Any = None  # {relative path: bytes}, or its ObjectRef; None: nothing to ship
    model_digest: str | None = None
    shipped: bool = field(default=False)

    @classmethod
    def read(cls, prepared: Path, token_stats: Path, name_or_path: str) -> TrainInputs:
        """Read the inputs on the driver (memory-mapping nothing: they are about to be shipped)."""
        from pipeline.data.stats import TokenStatistics
        from pipeline.data.tokenize import TokenizedSplit

        splits = {name: TokenizedSplit.load(Path(prepared) / name) for name in ("train", "validation")}
        model_dir = shippable_model_dir(name_or_path)
        files = read_model_files(model_dir) if model_dir is not None else None
        return cls(
            splits=splits,
            stats=TokenStatistics.load(token_stats),
            model_files=files,
            model_digest=files_digest(files) if files is not None else None,
        )

    def ship(self) -> TrainInputs:
        """The same inputs as ObjectRefs in the cluster's object store (needs `ray.init`)."""
        import ray

        if self.shipped:
            return self
        return TrainInputs(
            splits=ray.put(self.splits),
            stats=ray.put(self.stats),
            model_files=ray.put(self.model_files) if self.model_files is not None else None,
            model_digest=self.model_digest,
            shipped=True,
        )

    def _value(self, item: Any) -> Any:
        if not self.shipped or item is None:
            return item
        import ray

        return ray.get(item)

    def materialize(self, params: Params):
        """(TrainData, params) on this worker: the objects fetched from the store, a shipped model
        written to this node's temp dir and `model.name_or_path` pointed at it."""
        from pipeline.model.loading import load_tokenizer
        from pipeline.train.loop import TrainData

        if self.model_files is not None and self.model_digest is not None:
            local = write_model_files(self._value(self.model_files), self.model_digest)
            params = with_values(params, {"model.name_or_path": str(local)})
        splits = self._value(self.splits)
        tokenizer = load_tokenizer(params.model.name_or_path)
        return TrainData(splits["train"], splits["validation"], self._value(self.stats), tokenizer), params
