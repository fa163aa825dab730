"""pipeline.train.ray on a real 2-CPU Ray cluster (no mocks): local mode, 2-worker DDP over
gloo, a killed worker that resumes, fail-fast placement, and `resume=True`."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.ray import driver, faults
from pipeline.train.ray.cluster import PlacementError, check_placement
from pipeline.train.ray.driver import NothingToResumeError, run_training
from pipeline.train.ray.runs import checkpoint_step, last_run
from pipeline.train.ray.worker import WorkerConfig, train_worker, weights_checksum
from tests.support.ray_fixtures import layout, ray_cluster, tiny_data, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _steps(history: list[dict]) -> list[int]:
    return [int(h["step"]) for h in history]


SLOW_POLL_REPLY_S = 3.0


def _slow_poll_reply_worker(loop_config: dict):
    """`train_worker` on a worker whose reply to the controller's poll that collects a
    checkpoint is late (a descheduled thread on a loaded machine) while training runs on. Ray 2.60
    takes the report off the worker's queue before replying, so a kill in that window loses it:
    the injected failure at step 4 then restarted from scratch unless the hook waits for the
    controller to register the step-2 checkpoint. Only the attempt that will be killed is slowed."""
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        results = get_train_context().execution_context.result_queue
    except (ImportError, AttributeError):  # another Ray: run as is
        results = None
    plan = WorkerConfig.from_loop_config(loop_config).fault_plan
    if results is not None and plan is not None and not plan.marker.exists():
        take = results.get_nowait

        def late_get_nowait():
            report = take()
            if getattr(report, "checkpoint", None) is not None:
                time.sleep(SLOW_POLL_REPLY_S)
            return report

        results.get_nowait = late_get_nowait
    return train_worker(loop_config)


def test_local_mode_training_reaches_the_configured_steps_logs_to_mlflow_and_exports_a_model_that_generates(
    layout, monkeypatch
):
    import mlflow

    from pipeline.generation.sampling import generate
    from pipeline.model.export import load_exported
    from pipeline.tracking import runs, store

    monkeypatch.setenv("DBERT_PROJECT_ROOT", str(layout.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{layout.root / 'mlflow.db'}")
    params = tiny_params("train.steps=4", "train.num_workers=0")
    seen: list[dict] = []
    try:
        with runs.start_stage_run("train", params, root=layout.root) as run:
            outcome = run_training(
                params, layout, export_dir=layout.model, progress=seen.append, mlflow_run_id=run.info.run_id
            )
        client = mlflow.MlflowClient(tracking_uri=store.tracking_uri())
        logged = client.get_metric_history(run.info.run_id, "val_bound")
        assert client.get_run(run.info.run_id).info.status == "FINISHED"  # the worker never ended it
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    assert sorted(m.step for m in logged) == [1, 2, 4]

    assert outcome.run_name.startswith("train-")
    assert _steps(outcome.history) == [1, 2, 4]
    assert _steps(seen) == [1, 2, 4]  # live progress, in order
    assert all(h["val_bound"] > 0 for h in outcome.history)
    assert outcome.precision == "fp32"
    assert checkpoint_step(outcome.checkpoint_dir) == 4
    assert outcome.checkpoint_dir.parent == layout.checkpoints.resolve()
    assert last_run(layout)["run_name"] == outcome.run_name

    model, tokenizer, schedule = load_exported(outcome.export_dir)
    assert schedule.num_timesteps == params.diffusion.num_timesteps
    assert weights_checksum(model) == outcome.history[-1]["weights_sha256"]
    generation = generate(model, tokenizer, schedule, lengths=[6, 6], steps=4, seed=0)
    assert len(generation.texts) == 2
    assert all(text.strip() for text in generation.texts)


def test_a_worker_killed_mid_run_resumes_from_its_checkpoint_and_finishes_at_the_configured_steps(
    ray_cluster, layout, tmp_path, monkeypatch
):
    from ray import cloudpickle

    marker = tmp_path / "failed-once"
    monkeypatch.setenv(faults.ENV_FAIL_AT_STEP, "4")
    monkeypatch.setenv(faults.ENV_FAIL_MARKER, str(marker))
    # the step-2 checkpoint reaches the controller late: the kill must still wait for it
    monkeypatch.setattr(driver, "train_worker", _slow_poll_reply_worker)
    params = tiny_params(
        "train.steps=6",
        "train.eval_every=1",
        "train.checkpoint_every=2",
        "train.num_workers=1",
        "train.cpus_per_worker=1",
        "train.max_failures=1",
    )
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import this module
    try:
        outcome = run_training(params, layout)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])

    assert marker.exists()  # the worker really died once (os._exit at step 4)
    first = [h for h in outcome.history if h["resumed_from_step"] == 0]
    second = [h for h in outcome.history if h["resumed_from_step"] == 2]
    assert first and second and len(first) + len(second) == len(outcome.history)
    assert _steps(first)[:2] == [1, 2] and max(_steps(first)) < 4  # never got past step 3
    assert _steps(second) == [3, 4, 5, 6]  # restarted from the step-2 checkpoint
    assert {h["resumed_via"] for h in second} == {"ray"}  # ray.train.get_checkpoint() after the restart
    assert _steps(outcome.history)[-1] == params.train.steps
    assert checkpoint_step(outcome.checkpoint_dir) == params.train.steps


def test_the_injected_kill_waits_until_the_controller_has_registered_the_checkpoint(tmp_path):
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    assert not faults.await_checkpoint_registered(tmp_path, "checkpoint_0000002", timeout_s=0.2)  # no file
    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000')  # half written
    assert not faults.await_checkpoint_registered(tmp_path, "checkpoint_0000002", timeout_s=0.2)
    snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_0000020"}}))
    assert not faults.await_checkpoint_registered(tmp_path, "checkpoint_0000002", timeout_s=0.2)

    def register_later():
        time.sleep(0.3)
        snapshot.write_text(json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_0000002"}}))

    writer = threading.Thread(target=register_later)
    writer.start()
    start = time.monotonic()
    assert faults.await_checkpoint_registered(tmp_path, "checkpoint_0000002", timeout_s=30)
    assert 0.25 < time.monotonic() - start < 10
    writer.join()


def test_more_workers_than_the_cluster_can_place_fail_fast_with_the_numbers(ray_cluster, layout):
    params = tiny_params("train.num_workers=4", "train.cpus_per_worker=1")
    start = time.monotonic()
    with pytest.raises(PlacementError) as err:
        run_training(params, layout)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert "train.num_workers=4" in message and "train.cpus_per_worker=1" in message
    assert "needs 4 CPUs" in message and "has 2" in message
    assert "\n" not in message
    assert last_run(layout) is None  # nothing started, nothing recorded
    # one worker too big for any node is refused too
    with pytest.raises(PlacementError, match="cpus_per_worker=3"):
        check_placement(1, 3.0, False)
    check_placement(0, 99.0, True)  # local mode needs nothing


def test_resume_continues_the_last_run_without_redoing_its_steps(layout):
    first = run_training(tiny_params("train.steps=4"), layout)
    assert _steps(first.history)[-1] == 4

    second = run_training(tiny_params("train.steps=6"), layout, resume=True)
    assert second.run_name == first.run_name
    # the history holds the first run's reports, then steps 5 and 6 only (nothing from 1-4 again)
    assert second.history[: len(first.history)] == first.history
    new = second.history[len(first.history) :]
    assert _steps(new) == [6] and {h["resumed_from_step"] for h in new} == {4}
    assert checkpoint_step(second.checkpoint_dir) == 6
    assert second.history[-1]["tokens_seen"] > first.history[-1]["tokens_seen"]

    again = run_training(tiny_params("train.steps=6"), layout, resume=True)  # already done: trains nothing
    assert again.history == second.history and checkpoint_step(again.checkpoint_dir) == 6


def test_a_resume_keeps_the_reports_up_to_its_checkpoint_and_drops_the_ones_made_again(tmp_path):
    """A run killed after its step-4 checkpoint reported step 6 (and was cut mid-line): the resumed
    run redoes steps 5-6, so its history keeps steps 2 and 4 and the file is cut back to them."""
    import json

    from pipeline.train.ray.runs import HISTORY_FILE, append_history, earlier_history

    for step in (2, 4, 6):
        append_history(tmp_path, {"step": step, "val_bound": 9.0 - step})
    with open(tmp_path / HISTORY_FILE, "a", encoding="utf-8") as handle:
        handle.write('{"step": 7, "val_bo')  # killed while writing
    assert earlier_history(tmp_path, 4) == [{"step": 2, "val_bound": 7.0}, {"step": 4, "val_bound": 5.0}]
    lines = (tmp_path / HISTORY_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4]
    assert earlier_history(tmp_path / "elsewhere", 4) == []  # a run that never wrote one


def test_resume_without_an_earlier_run_says_there_is_nothing_to_resume(layout):
    with pytest.raises(NothingToResumeError, match="nothing to resume"):
        run_training(tiny_params(), layout, resume=True)
