"""What every stage shares: where the project is, one MLflow run per stage, progress callbacks,
the inputs a stage requires, and the code a stage depends on.

A stage is `run(params, root, **options) -> dict`. `root` is the checkout the stage reads from and
writes to (the repository root under `dvc repro`, the copy under `dvc exp run --temp`, a
temporary directory in tests). The *project* root - where the corpus mirror is resolved and the
MLflow database lives - is the main repository, also from an experiment copy
(`pipeline.project.project_root`).
"""

from __future__ import annotations

import ast
import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.vocab import ProgressCallback

CODE_ROOT = Path(__file__).resolve().parents[1]  # the checkout whose code is running
# Plumbing that never changes what a stage writes: params are tracked as params, MLflow is not an
# output, the CLI and these helpers only parse arguments, draw bars and rename directories, and
# pipeline.signals only turns stop signals into exceptions.
NOT_CODE_DEPS = frozenset({"pipeline.config", "pipeline.tracking", "pipeline.signals", "stages.common", "stages.cli"})


def same_path(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def tracking_root(root: Path) -> Path | None:
    """`root` argument for `start_stage_run`.

    None when the stage runs in the checkout it writes to (the normal case): MLflow then finds
    the main repository's store itself, also from a `dvc exp run --temp` copy, and takes lineage
    (commit, dependency md5s) from the checkout. An explicit other root is its own project.
    """
    return None if same_path(root, Path.cwd()) else Path(root).resolve()


def select_params(params: Params, keys: Sequence[str]) -> dict[str, Any]:
    """`group.key` -> value for the groups (`"data"`) and keys (`"data.max_seq_len"`) named."""
    flat = params.flat()
    out: dict[str, Any] = {}
    for key in keys:
        if "." in key:
            out[key] = flat[key]
        else:
            out.update({k: v for k, v in flat.items() if k.startswith(key + ".")})
    return out


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: Params,
    root: Path,
    keys: Sequence[str],
    deps: Sequence[str | Path],
    tags: dict[str, Any] | None = None,
    tracking_uri: str | None = None,
    **options: Any,
) -> Iterator[Any]:
    """One MLflow run for the stage, logging exactly the params it reads (`keys`) and tagged with
    the md5s of its dependencies (`deps`, relative to `root`). `tracking_uri` names the store
    when it is not the one `root` implies (an ablation row's stages log to the project's store);
    `options` go to `start_stage_run` (run_name, resume_run_id)."""
    from pipeline.tracking.runs import start_stage_run

    with start_stage_run(
        stage,
        select_params(params, keys),
        experiment=params.tracking.experiment,
        deps=[Path(d) for d in deps],  # relative to root (== cwd when tracking_root is None)
        root=tracking_root(root),
        tags=tags,
        uri=tracking_uri,
        **options,
    ) as run:
        yield run


def tick(progress: ProgressCallback | None, task: str, total: int | None) -> Callable[[int], None] | None:
    """A one-argument `advance(n)` for library functions that take `progress(n)`."""
    if progress is None:
        return None
    return lambda n: progress(task, int(n), total)


def require(path: Path, what: str, stage: str) -> Path:
    """A missing input is a FileNotFoundError naming the file and the stage that makes it."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{what} not found: {path} (run `dbert {stage}` first)")
    return Path(path)


def _module_file(name: str) -> Path | None:
    base = CODE_ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None) if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of `tree` except those under `if TYPE_CHECKING:` (annotations change no output)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(child for child in ast.iter_child_nodes(node) if not _is_type_checking_block(child))


def _plumbing(module: str) -> bool:
    """In NOT_CODE_DEPS, or a submodule of a package there (pipeline.tracking.*)."""
    return any(module == name or module.startswith(name + ".") for name in NOT_CODE_DEPS)


def _source_of(module: str) -> Path:
    path = _module_file(module)
    if path is None:
        raise ModuleNotFoundError(f"{module} is not a module of this checkout")
    return path


def _local_imports(path: Path) -> set[str]:
    """Project modules (pipeline.*, stages.*) that a file imports at run time, lazy imports included."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in ("pipeline", "stages") and _module_file(n) is not None}


def _only_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text(encoding="utf-8")).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


@functools.cache
def code_deps(module: str) -> tuple[str, ...]:
    """The source files a stage's output depends on: the static import closure of `module`
    (every import, also inside functions) over pipeline/ and stages/, without empty package
    `__init__.py` files and without the plumbing in NOT_CODE_DEPS. Posix paths relative to the
    checkout, sorted; dvc.yaml lists exactly these (a test checks it)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        if not _plumbing(name):
            todo.extend(_local_imports(_source_of(name)))
    files = []
    for name in sorted(n for n in seen if not _plumbing(n)):
        path = _source_of(name)
        if path.name == "__init__.py" and _only_docstring(path):
            continue
        files.append(path.relative_to(CODE_ROOT).as_posix())
    return tuple(sorted(files))


def code_paths(module: str) -> list[Path]:
    """`code_deps(module)` as absolute paths (for lineage tags when the root is elsewhere)."""
    return [CODE_ROOT / path for path in code_deps(module)]
