"""Sharing the pipeline's outputs through a DVC remote: what the first machine reproduced, a second
machine pulls (`dvc push` / `dvc pull` against a local-directory remote, real dvc and git), and
then has nothing to reproduce and can generate from the pulled model."""

from __future__ import annotations

import functools
import hashlib
import json
import operator
import shutil
from pathlib import Path

import pytest
import yaml

from tests.support.dvc_fixtures import REPO, git, reproduced_repo, run

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("clean_env")]

UP_TO_DATE = "Data and pipelines are up to date"
# What a second machine needs to skip every stage and to run `dbert generate`.
NEEDED = (
    "data/prepared/meta.json",
    "data/prepared/train/ids.npy",
    "data/prepared/test.txt",
    "data/token_stats/counts.npy",
    "data/token_stats/lengths.npy",
    "data/schedule/schedule.json",
    "models/final/model.safetensors",
    "models/final/diffusion_schedule.json",
)


def cached_outs(stages: dict) -> dict[str, list[str]]:
    """stage -> its outs, metrics and plots that DVC caches (and so pushes)."""
    found: dict[str, list[str]] = {}
    for name, stage in stages.items():
        for kind in ("outs", "metrics", "plots"):
            for item in stage.get(kind, []):
                path, options = next(iter(item.items())) if isinstance(item, dict) else (item, {})
                if (options or {}).get("cache", True) and not (options or {}).get("persist", False):
                    found.setdefault(name, []).append(path)
    return found


def test_every_output_a_second_machine_needs_is_cached_so_push_and_pull_carry_it():
    """`cache: false` (metrics, plots, the evaluation report) are small and committed to git;
    `persist` would keep an output out of a rerun's cleanup. Neither may hit the data and model."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    cached = cached_outs(stages)
    assert cached == {
        "prepare": ["data/prepared"],
        "token_stats": ["data/token_stats"],
        "schedule": ["data/schedule"],
        "train": ["models/final"],
    }
    assert all(
        path.startswith(tuple(f"{p}/" for p in functools.reduce(operator.iadd, cached.values(), []))) for path in NEEDED
    )


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_second_clone_pulls_every_output_and_reproduces_nothing(reproduced_repo, tmp_path):
    shared = reproduced_repo.repo
    remote, first, second = tmp_path / "remote", tmp_path / "first", tmp_path / "second"

    # The machine that ran the pipeline: the "repro" commit and its DVC cache, outputs checked out.
    git(tmp_path, "clone", "-q", str(shared), str(first))
    shutil.copytree(shared / ".dvc" / "cache", first / ".dvc" / "cache")
    run(first, "dvc", "checkout")
    assert UP_TO_DATE in run(first, "dvc", "status").stdout

    # It configures the remote once, for everyone (committed), and pushes.
    run(first, "dvc", "remote", "add", "-d", "storage", str(remote))
    git(first, "commit", "-qam", "DVC remote: storage")
    pushed = run(first, "dvc", "push")
    assert "pushed" in pushed.stdout + pushed.stderr
    assert "in sync" in run(first, "dvc", "status", "--cloud").stdout
    again = run(first, "dvc", "push")
    assert "Everything is up to date" in again.stdout + again.stderr

    # A second machine: a git clone has the code, params, dvc.lock and the committed metrics ...
    git(tmp_path, "clone", "-q", str(first), str(second))
    assert "storage" in run(second, "dvc", "remote", "list").stdout
    assert not (second / "models" / "final").exists()
    missing = json.loads(run(second, "dvc", "status", "--json").stdout or "{}")
    assert set(missing) == {"prepare", "token_stats", "schedule", "train", "evaluate", "samplers"}

    # ... and `dvc pull` brings the rest: nothing to reproduce.
    run(second, "dvc", "pull")
    assert UP_TO_DATE in run(second, "dvc", "status").stdout
    dry = run(second, "dvc", "repro", "--dry")
    assert "Running stage" not in dry.stdout + dry.stderr, dry.stdout
    for path in NEEDED:
        assert md5(second / path) == md5(first / path), path
    assert not (second / "mlflow.db").exists()  # nothing ran

    # The pulled model generates (the clone's own code, as its `dbert` would run it).
    out = second / "samples.txt"
    done = run(
        second, "python", "-m", "stages.cli", "generate", "-n", "2", "--steps", "4", "--seed", "0", "-o", str(out)
    )
    assert "wrote 2 sentences" in done.stderr
    assert len(out.read_text().splitlines()) == 2
    assert UP_TO_DATE in run(second, "dvc", "status").stdout
