"""Where Ray Train and Tune keep run folders and checkpoints (`train.storage`).

Three kinds of location, one code path (pyarrow's filesystems, which Ray Train itself uses):
a folder on the driver's disk (the default, `<project>/ray_results`), a shared-filesystem path
(NFS, a mounted bucket: the same path on every node), or a URI pyarrow understands (`s3://`,
`gs://`, `hdfs://`, `file://`...). Once the cluster has more than one node every node must reach
the storage (Ray Train uploads each rank-0 checkpoint there and hands it back on a restart on any
node); `check_reachable` proves that for paths before training starts, by asking every node
whether it sees a marker file the driver wrote.

Functions below take a location as `str | Path` (a URI is a str with `scheme://`); importing
this module imports neither Ray nor pyarrow.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
PROBE_PREFIX = ".dbert-storage-probe-"


class StorageError(ValueError):
    """The configured storage cannot serve this cluster; the message says which nodes and what to set."""


def is_uri(location: str | Path) -> bool:
    return isinstance(location, str) and bool(_URI.match(location))


def join(location: str | Path, *names: str) -> str | Path:
    """A location below `location` (a Path stays a Path, a URI stays a str)."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *names])
    return Path(location).joinpath(*names)


def local_path(location: str | Path) -> Path | None:
    """The location on this machine's filesystem: a plain path or a `file://` URI; else None."""
    if not is_uri(location):
        return Path(location)
    if str(location).startswith("file://"):
        from urllib.parse import unquote, urlparse

        return Path(unquote(urlparse(str(location)).path))
    return None


def filesystem(location: str | Path) -> tuple[Any, str]:
    """(pyarrow FileSystem, path inside it) for a location."""
    import pyarrow.fs as pafs

    path = local_path(location)
    if path is not None:
        return pafs.LocalFileSystem(), str(path)
    return pafs.FileSystem.from_uri(str(location))


def exists(location: str | Path) -> bool:
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_dirs(location: str | Path) -> list[str]:
    """Names of the folders directly below `location` ([] when it does not exist)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_text(location: str | Path) -> str | None:
    """The text of a file; None when it does not exist or cannot be read."""
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as handle:
            return handle.read().decode("utf-8")
    except (OSError, FileNotFoundError):
        return None


def upload_dir(source: Path, target: str | Path, *, last: str | None = None) -> None:
    """Copy a local folder to `target`; the file named `last` (if any) is written after the rest,
    so a reader that requires it never sees a partial copy on stores without atomic renames."""
    import pyarrow.fs as pafs

    fs, path = filesystem(target)
    fs.create_dir(path, recursive=True)
    local = pafs.LocalFileSystem()
    files = sorted(p for p in Path(source).rglob("*") if p.is_file())
    for file in sorted(files, key=lambda p: p.name == last):
        relative = file.relative_to(source).as_posix()
        destination = f"{path.rstrip('/')}/{relative}"
        fs.create_dir(destination.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(file), destination, source_filesystem=local, destination_filesystem=fs)


def download_dir(source: str | Path, target: Path) -> Path:
    """Copy a stored folder to a local folder (created)."""
    import pyarrow.fs as pafs

    fs, path = filesystem(source)
    target.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def delete_dir(location: str | Path) -> None:
    fs, path = filesystem(location)
    with contextlib.suppress(OSError, FileNotFoundError):
        fs.delete_dir(path)


@dataclass(frozen=True)
class RunStorage:
    """`train.storage` resolved: where this project's Ray runs live.

    `explicit` is False for the default folder on the driver's disk, which only a one-node
    cluster (or a project folder on a shared filesystem) can use.
    """

    location: str | Path  # an absolute Path, or a URI
    explicit: bool = False

    @classmethod
    def resolve(cls, value: str | None, root: Path) -> RunStorage:
        """None/empty: `<root>/ray_results`; a relative path: below `root`; a URI: as given."""
        if not value:
            return cls((Path(root) / "ray_results").resolve(), explicit=False)
        if is_uri(value):
            return cls(value.rstrip("/"), explicit=True)
        path = Path(value).expanduser()
        return cls((path if path.is_absolute() else Path(root) / path).resolve(), explicit=True)

    def child(self, *names: str) -> str | Path:
        return join(self.location, *names)

    def __str__(self) -> str:
        return str(self.location)


def alive_nodes() -> list[dict]:
    """The cluster's live nodes (ray.nodes() entries)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_reachable(storage: RunStorage, nodes: list[dict] | None = None, timeout_s: float = 60.0) -> None:
    """Raise StorageError unless every node of a multi-node cluster reaches `storage`.

    One node: anything works. A non-file URI (s3://, gs://, ...) is a network store every node
    can address; credentials are the nodes' own business. A path (or `file://`) is probed: the
    driver writes a marker file there and a zero-CPU task pinned to each node looks for it.
    """
    nodes = alive_nodes() if nodes is None else nodes
    if len(nodes) <= 1:
        return
    path = local_path(storage.location)
    if path is None:
        return
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    path.mkdir(parents=True, exist_ok=True)
    marker = path / f"{PROBE_PREFIX}{secrets.token_hex(6)}"
    marker.write_text("written by the driver\n", encoding="utf-8")
    try:

        @ray.remote(num_cpus=0)
        def sees(file: str) -> bool:
            return Path(file).is_file()

        probes = [
            sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                str(marker)
            )
            for n in nodes
        ]
        seen = ray.get(probes, timeout=timeout_s)
    finally:
        marker.unlink(missing_ok=True)
    blind = [f"{n.get('NodeManagerAddress', '?')} node {n['NodeID'][:8]}" for n, ok in zip(nodes, seen) if not ok]
    if not blind:
        return
    what = (
        f"train.storage={storage.location}"
        if storage.explicit
        else f"train.storage is not set, and the default {storage.location} is on the driver's disk"
    )
    raise StorageError(
        f"{what}: {len(blind)} of the Ray cluster's {len(nodes)} nodes cannot see it "
        f"({', '.join(blind)}). A cluster of more than one node needs storage every node reaches: "
        "set train.storage to a shared-filesystem path mounted on every node or to a URI "
        "(s3://bucket/runs, gs://bucket/runs, ...)"
    )
