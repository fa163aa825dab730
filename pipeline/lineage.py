"""Lineage: what ties a result to its code and inputs.

DVC-compatible md5s of files and directories (the same values `dvc.lock` records, so a run's
tags can be compared with the lock file) and the tags every MLflow stage run carries: the git
commit, the stage, DVC experiment names, one md5 per dependency, host and user.

`stages/prepare.py` writes `file_md5` values into a DVC output, so this module is one of that
stage's code dependencies: changing the hashing reruns `prepare`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import posixpath
import socket
from pathlib import Path

from pipeline.project import checkout, git_commit

_IGNORED_DIR_NAMES = frozenset({".git", ".hg", ".dvc"})  # what DVC skips inside a directory


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dir_md5(path: Path) -> str:
    """DVC 3's directory hash: md5 of the sorted JSON list of {md5, relpath}, plus `.dir`."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIR_NAMES]
        for name in filenames:
            full = Path(dirpath) / name
            if full.is_file():
                rel = full.relative_to(path).as_posix()
                entries.append({"md5": file_md5(full), "relpath": rel})
    entries.sort(key=lambda e: e["relpath"])
    blob = json.dumps(entries, sort_keys=True).encode("utf-8")
    return hashlib.md5(blob).hexdigest() + ".dir"


def path_md5(path: Path | str) -> str:
    """md5 of a file, DVC-style `<md5>.dir` of a directory, `"missing"` if absent."""
    p = Path(path)
    if p.is_file():
        return file_md5(p)
    if p.is_dir():
        return _dir_md5(p)
    return "missing"


def _display_path(path: Path, root: Path | None) -> str:
    p = Path(path).expanduser()
    if root is None:
        return posixpath.normpath(p.as_posix())
    absolute = Path(os.path.abspath(p if p.is_absolute() else root / p))
    for candidate in (absolute, absolute.resolve()):
        try:
            return candidate.relative_to(root).as_posix()
        except ValueError:
            continue
    return absolute.as_posix()


def dependency_md5s(paths: list[Path] | list[str], root: Path | str | None = None) -> dict[str, str]:
    """`{path: md5}` for each path (file md5, DVC-style `.dir` md5, or `"missing"`).

    Relative paths are taken relative to `root` when given (else to cwd); keys are posix paths
    relative to `root` when the path lies inside it, else the path as given.
    """
    base = Path(root).expanduser().resolve() if root is not None else None
    out: dict[str, str] = {}
    for path in paths:
        p = Path(path).expanduser()
        real = p if p.is_absolute() or base is None else base / p
        out[_display_path(p, base)] = path_md5(real)
    return out


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry in some containers
        return os.environ.get("USER") or os.environ.get("USERNAME") or "unknown"


def lineage_tags(
    stage: str, deps: list[Path] | list[str] | None = None, root: Path | str | None = None
) -> dict[str, str]:
    """Tags that tie a run to its code and inputs.

    `git_commit` (omitted outside git), `stage`, `dvc_exp_name` / `dvc_exp_baseline_rev` when
    DVC sets them, `dep_md5.<path>` per dependency, `host`, `user`.

    With `root`, the commit is `root`'s and relative deps are relative to it. Without, both come
    from the checkout the stage runs in (the current directory's git work tree): inside a
    `dvc exp run --temp/--queue` copy that is the copy, whose HEAD is the experiment's baseline
    and whose files are the ones the stage reads, not the main repository's.
    """
    base = checkout(root)
    tags: dict[str, str] = {}
    commit = git_commit(base)
    if commit:
        tags["git_commit"] = commit
    tags["stage"] = stage
    for env, tag in (("DVC_EXP_NAME", "dvc_exp_name"), ("DVC_EXP_BASELINE_REV", "dvc_exp_baseline_rev")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    paths = [Path(d).expanduser() for d in deps or []]
    if root is None:  # relative to where the stage runs
        paths = [p if p.is_absolute() else Path.cwd() / p for p in paths]
    for rel, md5 in dependency_md5s(paths, root=base).items():
        tags[f"dep_md5.{rel}"] = md5  # made a valid MLflow key where it is logged
    tags["host"] = socket.gethostname()
    tags["user"] = _user()
    return tags
