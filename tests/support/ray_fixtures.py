"""Fixtures shared by the Ray tests: one small Ray cluster per session, tiny real inputs.

Import the fixtures into a test module (`from tests.support.ray_fixtures import ray_cluster, ...`).
The inputs are built with the real pipeline: ~200 LM1B-sample lines tokenised with the default
tokenizer, saved as prepared splits, plus their token statistics; the model is a tiny random BERT.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from pipeline.artifacts import Layout
from pipeline.config import Params, load_params
from tests.support import tiny

TINY_OVERRIDES = [*tiny.TINY_MODEL, *tiny.TINY_TRAIN, "train.max_failures=2"]
TRAIN_LINES = 160
VALIDATION_LINES = 40


def tiny_params(*overrides: str) -> Params:
    """Defaults + the tiny model/data overrides + `overrides` (later wins)."""
    return load_params(None, [*TINY_OVERRIDES, *overrides])


def init_local_ray() -> None:
    """A 2-CPU local Ray cluster (the dashboard on 127.0.0.1 serves the state API that Ray
    Train's controller polls)."""
    import ray

    ray.init(
        num_cpus=2,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        _temp_dir=os.environ.get("RAY_TMPDIR") or "/tmp/ray",
        logging_level=logging.WARNING,
        log_to_driver=True,
    )


@pytest.fixture
def ray_cluster(request):
    """The session's 2-CPU local Ray cluster: started on first use and kept until the session
    ends (started again when a multi-node test replaced it); a cluster someone else started is
    used as it is."""
    import ray

    if not ray.is_initialized():
        init_local_ray()
        request.config.add_cleanup(lambda: ray.shutdown() if ray.is_initialized() else None)
    return ray


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, lm1b_dir) -> Path:
    """`<root>/data/{prepared/{train,validation},token_stats}` from real LM1B-sample lines."""
    from pipeline.data.stats import TokenStatistics
    from pipeline.data.tokenize import tokenize_lines
    from pipeline.diffusion.forward import SpecialIds
    from pipeline.model.loading import load_tokenizer

    shard = sorted(Path(lm1b_dir).glob("news.en.heldout-*"))[0]
    lines: list[str] = []
    with open(shard, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.strip())
            if len(lines) >= TRAIN_LINES + VALIDATION_LINES:
                break
    tokenizer = load_tokenizer("random")
    max_seq_len = tiny_params().data.max_seq_len
    layout = Layout(tmp_path_factory.mktemp("tiny-data"))
    train = tokenize_lines(lines[:TRAIN_LINES], tokenizer, max_seq_len)
    validation = tokenize_lines(lines[TRAIN_LINES:], tokenizer, max_seq_len)
    train.save(layout.prepared / "train")
    validation.save(layout.prepared / "validation")
    excluded = SpecialIds.from_tokenizer(tokenizer).forbidden_outputs
    TokenStatistics.from_split(train, int(tokenizer.vocab_size), excluded).save(layout.token_stats)
    return layout.root / "data"


@pytest.fixture
def layout(tmp_path, tiny_data) -> Layout:
    """A fresh project root per test whose data/ is the session's tiny inputs."""
    root = tmp_path / "project"
    root.mkdir()
    shutil.copytree(tiny_data, root / "data")
    return Layout(root)


def checkpoint_model(params: Params, layout: Layout, directory: Path):
    """The model a checkpoint holds, rebuilt the way the driver does."""
    from pipeline.assembly.model import model_from_params
    from pipeline.assembly.schedule import schedule_for
    from pipeline.data.stats import TokenStatistics
    from pipeline.train.checkpoint import load_checkpoint

    model = model_from_params(params, schedule_for(params, TokenStatistics.load(layout.token_stats)))
    load_checkpoint(directory, model)
    return model
