"""The tiny DVC project the DVC tests share: a temporary git repository with this checkout's code,
dvc.yaml and tiny params (real LM1B-sample lines, a tiny random BERT, real MLflow store), after
one real `dvc repro` of the whole pipeline, committed.

Import the fixture into a test module (`from tests.support.dvc_fixtures import reproduced_repo`). pytest
makes one fixture per importing module, so the repository is built and reproduced once per
session by `reproduce` (memoised on the session's base temp directory). A test may change the
workspace (`dvc exp run`); tests that need the reproduced state take it from git (the "repro"
commit) and the DVC cache, which only grows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params
from tests.support import tiny

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
TINY = [
    *tiny.TINY,
    "data.mirror_dir=../shared/data/lm1b",  # the default layout: relative to the main repository
    "data.max_sentences=120",
    "diffusion.num_timesteps=64",
    "train.steps=3",
    "train.eval_every=3",
    "train.checkpoint_every=3",
    "evaluate.num_sequences=8",
    "evaluate.bound_steps=2",
    "evaluate.num_samples=2",
    "evaluate.sample_steps=4",
    "evaluate.num_references=20",
]
GITIGNORE = "mlflow.db\nmlartifacts/\nmlruns/\nray_results/\n/checkpoints/\n__pycache__/\n"


def run(repo: Path, *args: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "DBERT_", "DVC_EXP", "GIT_")) and k != "VIRTUAL_ENV"
    }
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # what `make repro` does
    env["MLFLOW_DISABLE_TELEMETRY"] = "1"
    done = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return run(repo, "git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args)


def make_repo(base: Path, lm1b_dir: Path) -> Path:
    """`base/repo`: git + `dvc init`, this checkout's pipeline/, stages/, dvc.yaml, tiny params
    (one commit); the corpus at `base/shared/data/lm1b`, where `data.mirror_dir` finds it."""
    (base / "shared" / "data").mkdir(parents=True)
    (base / "shared" / "data" / "lm1b").symlink_to(lm1b_dir)
    repo = base / "repo"
    repo.mkdir()
    for folder in ("pipeline", "stages"):
        shutil.copytree(REPO / folder, repo / folder, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    params = load_params(REPO / "params.yaml", TINY).model_dump(mode="json")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text(GITIGNORE)
    git(repo, "init", "-q")
    run(repo, "dvc", "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "tiny pipeline")
    return repo


@dataclass(frozen=True)
class Reproduced:
    """The repository and the output of its first `dvc repro` (committed as "repro")."""

    repo: Path
    first: subprocess.CompletedProcess


_REPRODUCED: dict[Path, Reproduced | AssertionError] = {}


def reproduce(tmp_path_factory: pytest.TempPathFactory, lm1b_dir: Path) -> Reproduced:
    """Build the repository and run `dvc repro` once per session (a failure is not retried);
    commit everything it wrote."""
    key = tmp_path_factory.getbasetemp()
    if key not in _REPRODUCED:
        try:
            repo = make_repo(tmp_path_factory.mktemp("dvc"), lm1b_dir)
            first = run(repo, "dvc", "repro")
            git(repo, "add", "-A")
            git(repo, "commit", "-qm", "repro")
            _REPRODUCED[key] = Reproduced(repo, first)
        except AssertionError as err:
            _REPRODUCED[key] = err
    found = _REPRODUCED[key]
    if isinstance(found, AssertionError):
        raise found
    return found


@pytest.fixture(scope="session")
def reproduced_repo(tmp_path_factory, lm1b_dir) -> Reproduced:
    return reproduce(tmp_path_factory, lm1b_dir)
