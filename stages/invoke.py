"""How a `dbert` command runs a stage: find the project root, resolve params (file, `--set`,
option values through the schema), run the stage inside the CLI's error and signal boundary with
progress bars, print its summary; and each command's --help, derived from the stage module."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import typer

from pipeline.config import Params, load_params, with_values
from stages.console import RichProgress, quiet_hf, user_errors


def default_root(start: Path | None = None) -> Path:
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file() or (candidate / "params.yaml").is_file():
            return candidate
    return here


def resolve(params_path: Path | None, overrides: list[str] | None, root: Path | None) -> tuple[Params, Path]:
    root = Path(root).expanduser().resolve() if root is not None else default_root()
    path = Path(params_path).expanduser() if params_path is not None else root / "params.yaml"
    return load_params(path, list(overrides or [])), root


def stage_help(module: ModuleType, summary: str, note: str = "") -> str:
    """A command's --help: `summary`, then what the stage reads and writes, taken from the stage
    module's PARAMS / INPUTS / OUTPUTS (the lists its MLflow run logs and dvc.yaml checks against),
    then `note`."""
    params = ", ".join(key if "." in key else f"{key}.*" for key in module.PARAMS)
    reads = "; ".join(part for part in (params and f"params {params}", ", ".join(module.INPUTS)) if part)
    writes = ", ".join(module.OUTPUTS) or "no files"
    return "\n\n".join(part for part in (summary, f"Reads {reads or 'nothing'}.", f"Writes {writes}.", note) if part)


def echo_summary(summary: dict, keys: tuple[str, ...]) -> None:
    for key in keys:
        if key in summary and summary[key] is not None:
            typer.echo(f"{key}: {summary[key]}")


def run_stage(
    module: ModuleType,
    params_path: Path | None,
    overrides: list[str] | None,
    root: Path | None,
    *,
    echo: tuple[str, ...] = (),
    values: Mapping[str, Any] | None = None,
    quiet_transformers: bool = False,
    bars: bool = True,
    **options: Any,
) -> dict:
    """What every stage command does: resolve params (the file, --set, then `values` through the
    schema) and the root, run `module.run(params, root, progress=..., **options)` inside the
    one-line-error and stop-signal boundary with progress bars on stderr, print the `echo` keys of
    its summary; the summary."""
    with user_errors():
        p, r = resolve(params_path, overrides, root)
        if values:
            p = with_values(p, values)  # ParamsError naming the key, like a bad --set
        if quiet_transformers:
            quiet_hf()
        with RichProgress() if bars else contextlib.nullcontext() as bar:
            summary = module.run(p, r, progress=bar, **options)
    echo_summary(summary, echo)
    return summary
