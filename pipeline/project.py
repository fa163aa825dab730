"""Where the project lives: the main repository's work tree, also from a DVC experiment copy.

Every stage resolves the corpus mirror and the MLflow store against the *project* root: the main
repository, also when a stage runs inside the copy that `dvc exp run --temp/--queue` makes under
`<repo>/.dvc/tmp/exps/...` (override with `DBERT_PROJECT_ROOT`). Lineage, by contrast, is taken
from the checkout a stage runs in (`checkout`), whose HEAD is the experiment's baseline.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ENV_PROJECT_ROOT = "DBERT_PROJECT_ROOT"
_EXPS_PARTS = (".dvc", "tmp", "exps")


def _main_repo_of_exp_copy(path: Path) -> Path | None:
    """`<repo>/.dvc/tmp/exps/<anything>` -> `<repo>`; None when `path` is not inside such a copy."""
    parts = path.parts
    for i in range(len(parts) - len(_EXPS_PARTS), 0, -1):  # innermost match wins
        if parts[i : i + len(_EXPS_PARTS)] == _EXPS_PARTS:
            return Path(*parts[:i])
    return None


def _git(args: list[str], cwd: Path) -> str | None:
    """stdout of `git <args>` in cwd, or None when git fails or is missing."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and text else None


def git_toplevel(path: Path) -> Path | None:
    """The git work tree that holds `path`; None outside git."""
    top = _git(["rev-parse", "--show-toplevel"], path)
    return Path(top).resolve() if top else None


def project_root(start: Path | None = None) -> Path:
    """The main repository's work tree (absolute).

    Order: `$DBERT_PROJECT_ROOT`; the repository that holds `.dvc/tmp/exps` when `start` (default:
    the current directory) lies in a `dvc exp run --temp/--queue` copy; the git top level of
    `start`; `start` itself.
    """
    env = os.environ.get(ENV_PROJECT_ROOT)
    if env:
        return Path(env).expanduser().resolve()
    here = Path(start if start is not None else Path.cwd()).expanduser().resolve()
    main = _main_repo_of_exp_copy(here)
    if main is not None:
        return main
    if not here.is_dir():
        here = here.parent
    top = git_toplevel(here) if here.is_dir() else None
    return top if top is not None else here


def resolve_root(root: Path | str | None) -> Path:
    """`root` made absolute, else the project root."""
    return Path(root).expanduser().resolve() if root is not None else project_root()


def git_commit(root: Path | str | None = None) -> str | None:
    """Full HEAD commit of the repository at `root` (default: cwd); None outside git."""
    where = Path(root).expanduser() if root is not None else Path.cwd()
    if not where.is_dir():
        return None
    return _git(["rev-parse", "--verify", "--quiet", "HEAD"], where)


def checkout(root: Path | str | None) -> Path:
    """`root`, else the git work tree of the current directory (a DVC exp copy is its own)."""
    if root is not None:
        return Path(root).expanduser().resolve()
    here = Path.cwd().resolve()
    return git_toplevel(here) or here
