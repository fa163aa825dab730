"""`train.storage`: where Ray runs and checkpoints live, as a path or a URI (pyarrow), and a
local-mode run that checkpoints to, and resumes from, a URI store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.train.checkpoint import META_FILE, MODEL_FILE, STATE_FILE
from pipeline.train.ray import storage
from pipeline.train.ray.runs import checkpoint_step, latest_checkpoint, persist_checkpoint
from pipeline.train.ray.storage import RunStorage
from tests.support.ray_fixtures import layout, tiny_data, tiny_params


def fake_checkpoint(directory: Path, step: int, *, complete: bool = True) -> Path:
    directory.mkdir(parents=True)
    (directory / MODEL_FILE).write_bytes(b"weights %d" % step)
    (directory / STATE_FILE).write_bytes(b"state %d" % step)
    if complete:
        (directory / META_FILE).write_text(json.dumps({"step": step}))
    return directory


def test_storage_resolves_the_default_a_relative_path_and_a_uri(tmp_path):
    default = RunStorage.resolve(None, tmp_path)
    assert default.location == (tmp_path / "ray_results").resolve() and not default.explicit
    relative = RunStorage.resolve("runs/here", tmp_path)
    assert relative.location == (tmp_path / "runs/here").resolve() and relative.explicit
    uri = RunStorage.resolve("s3://bucket/runs/", tmp_path)
    assert uri.location == "s3://bucket/runs" and uri.explicit
    assert uri.child("train-1", "checkpoint_0000002") == "s3://bucket/runs/train-1/checkpoint_0000002"
    assert storage.local_path("file:///tmp/x%20y") == Path("/tmp/x y") and storage.local_path("s3://b/k") is None


@pytest.mark.parametrize("kind", ["path", "uri"])
def test_checkpoints_persist_rotate_and_the_latest_complete_one_is_found(tmp_path, kind):
    run_dir: str | Path = tmp_path / "store" / "run"
    if kind == "uri":
        run_dir = (tmp_path / "store" / "run").as_uri()  # file://: the same code path as s3:// or gs://
    for step in (2, 4, 6):
        persist_checkpoint(fake_checkpoint(tmp_path / f"src{step}", step), run_dir, step, keep=2)
    kept = sorted(storage.list_dirs(run_dir))
    assert kept == ["checkpoint_0000004", "checkpoint_0000006"]
    assert checkpoint_step(latest_checkpoint(run_dir)) == 6
    # a newer copy that never got its progress file (a stopped upload) is no checkpoint
    partial = fake_checkpoint(tmp_path / "partial", 8, complete=False)
    storage.upload_dir(partial, storage.join(run_dir, "checkpoint_0000008"))
    assert checkpoint_step(latest_checkpoint(run_dir)) == 6
    copy = storage.download_dir(latest_checkpoint(run_dir), tmp_path / "copy")
    assert (copy / MODEL_FILE).read_bytes() == b"weights 6"


def test_a_run_stopped_before_its_first_checkpoint_is_not_resumable(tmp_path):
    """The ablation resumes a row only when there is a checkpoint: a row killed in its first
    minutes (a run recorded, nothing saved) starts again instead of failing "nothing to resume"."""
    from pipeline.artifacts import Layout
    from pipeline.train.ray.runs import record_run, resumable

    row = Layout(tmp_path / "row")
    assert not resumable(row)  # never trained
    store = tmp_path / "row" / "ray_results"
    record_run(row, "train-1", store, num_workers=0)
    (store / "train-1").mkdir(parents=True)
    assert not resumable(row)
    persist_checkpoint(fake_checkpoint(tmp_path / "src", 100), store / "train-1", 100)
    assert resumable(row)


def test_upload_writes_the_named_file_last(tmp_path, monkeypatch):
    import pyarrow.fs as pafs

    order = []
    real = pafs.copy_files
    monkeypatch.setattr(pafs, "copy_files", lambda src, dst, **kw: (order.append(Path(dst).name), real(src, dst, **kw)))
    source = fake_checkpoint(tmp_path / "src", 3)
    storage.upload_dir(source, (tmp_path / "dst").as_uri(), last=META_FILE)
    assert order[-1] == META_FILE and sorted(order) == sorted([MODEL_FILE, STATE_FILE, META_FILE])


@pytest.mark.integration
def test_a_local_mode_run_checkpoints_to_a_uri_store_and_resumes_from_it(layout, tmp_path):
    from pipeline.train.ray.driver import run_training

    store = (tmp_path / "uri-store").as_uri()
    first = run_training(tiny_params("train.steps=2", "train.checkpoint_every=2", f"train.storage={store}"), layout)
    run_dir = storage.join(store, first.run_name)
    assert checkpoint_step(latest_checkpoint(run_dir)) == 2
    again = run_training(
        tiny_params("train.steps=4", "train.checkpoint_every=2", f"train.storage={store}"), layout, resume=True
    )
    assert again.run_name == first.run_name
    new = again.history[len(first.history) :]  # the history carries the first run's reports first
    assert again.history[: len(first.history)] == first.history
    assert [int(h["step"]) for h in new] == [4]  # steps 3-4 only: nothing redone
    assert {h["resumed_from_step"] for h in new} == {2}
    assert checkpoint_step(latest_checkpoint(run_dir)) == 4
