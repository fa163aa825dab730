"""tune (opt-in, not in dvc.yaml's DAG): Ray Tune over the time design, and lr / spindle lambda / power gamma when asked.

Reads  params `tune.*` plus everything training reads (each trial is a short training run);
       data/prepared/, data/token_stats/ (run `dvc repro schedule` first).
Writes outputs/tune/ (the driver's trials.csv, results.json and best_params.yaml, the
       proposal) and one parent MLflow run (with those files) with a nested run per trial. It never edits params.yaml: the proposal
       is printed, and `apply=True` runs `dvc exp run --temp -S key=value ...` with it - an
       experiment in a temporary copy that leaves the workspace (params.yaml included) as it
       is; compare it with `dvc exp show`, adopt it with `dvc exp apply <name>`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.artifacts import Layout
from pipeline.config import Params, with_values
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run

STAGE = "tune"
PARAMS = ("tune", "model", "diffusion", "train", "data.max_seq_len")
INPUTS = ("data/prepared/train", "data/prepared/validation", "data/token_stats/counts.npy")
OUTPUTS = ("outputs/tune/trials.csv", "outputs/tune/results.json", "outputs/tune/best_params.yaml")


def _flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def proposal_overrides(proposal: Mapping[str, Any], params: Params) -> list[str]:
    """`key=value` for each proposed param (nested or dotted mapping), checked against the schema.

    Keys that are not params (a metric, a trial name) are ignored; the result validates as a
    whole, so `dvc exp run -S` never gets a value that the stages would refuse.
    """
    known = params.flat()
    flat = {k: v for k, v in _flatten(proposal).items() if k in known}
    with_values(params, flat)  # ParamsError naming the key when the proposal breaks the schema
    return [f"{key}={_format(value)}" for key, value in sorted(flat.items())]


def _format(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def read_proposal(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ValueError(f"tune proposal {path} is not a mapping of params")
    return data


def apply_command(overrides: list[str]) -> list[str]:
    command = [sys.executable, "-m", "dvc", "exp", "run", "--temp"]
    for item in overrides:
        command += ["-S", item]
    return command


def run_command(command: list[str], cwd: Path) -> int:
    """Run `dvc exp run ...` in the checkout, its output going straight to the terminal."""
    return subprocess.run(command, cwd=cwd, check=False).returncode


def run(
    params: Params,
    root: Path,
    *,
    apply: bool = False,
    on_proposal: Callable[[dict], None] | None = None,
    progress: ProgressCallback | None = None,
) -> dict:
    """Tune, write the proposal, hand the summary to `on_proposal` (the CLI prints it), and with
    `apply=True` run it as `dvc exp run --temp -S ...` in `root`."""
    del progress  # Ray Tune reports trials itself
    layout = Layout(Path(root))
    for path in INPUTS:
        require(layout.root / path, path, "token-stats" if "token_stats" in path else "prepare")
    from pipeline.tracking.log import log_artifact
    from pipeline.tune.driver import run_tune

    with stage_run(STAGE, params, root, PARAMS, [*code_paths(__name__), *INPUTS]) as parent:
        outcome = run_tune(params, layout, parent_run_id=parent.info.run_id)
        proposal_path = Path(outcome.proposal_path)
        proposal = read_proposal(proposal_path)
        overrides = proposal_overrides(proposal, params)
        for name in ("best_params.yaml", "trials.csv", "results.json"):  # what the driver wrote
            if (proposal_path.parent / name).is_file():
                log_artifact(proposal_path.parent / name)
    result = {
        "stage": STAGE,
        "proposal_path": str(proposal_path),
        "proposal_text": proposal_path.read_text(),
        "proposal": proposal,
        "overrides": overrides,
        "command": apply_command(overrides),
        "applied": False,
        "parent_run_id": parent.info.run_id,
    }
    if on_proposal is not None:
        on_proposal(result)
    if apply:
        if not overrides:
            raise ValueError(f"the tune proposal {proposal_path} names no params to apply")
        code = run_command(result["command"], layout.root)
        if code != 0:
            raise ValueError(f"`dvc exp run` with the tune proposal failed (exit code {code})")
        result["applied"] = True
    return result
