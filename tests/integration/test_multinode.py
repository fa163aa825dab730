"""Scale-out on a real multi-node Ray cluster on this machine (`ray.cluster_utils.Cluster`: a
head and worker nodes, each its own raylet and object store): one training worker per node with
checkpoints in the configured storage, a node removed mid-run and a new one added (the run
resumes from its last checkpoint and ends at train.steps with its data position), Tune trials on
different nodes, the inputs reaching workers through the object store, and storage a node cannot
see refused before training starts (a node in its own mount namespace).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.train.ray import faults
from pipeline.train.ray.driver import run_training
from pipeline.train.ray.runs import checkpoint_step, last_run
from pipeline.train.ray.storage import StorageError
from pipeline.train.ray.worker import weights_checksum
from tests.integration.test_mlflow_server import mlflow_server
from tests.integration.test_tune import check_tune_outputs
from tests.support.ray_fixtures import checkpoint_model, layout, tiny_data, tiny_params

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE_CPUS = 2  # per worker node
OBJECT_STORE = 150 * 1024**2


@pytest.fixture(scope="module")
def cluster():
    """A head (1 CPU: Tune trial drivers, Train controllers) and two worker nodes of 2 CPUs each."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the single-node session cluster of other modules: replaced here
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 1,
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "object_store_memory": OBJECT_STORE,
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _alive_node_ids() -> set[str]:
    import ray

    return {n["NodeID"] for n in ray.nodes() if n["Alive"]}


def _train_worker_nodes(run_name: str | None = None) -> list[str]:
    """Node ids of the Ray Train worker actors that are alive now."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], limit=100)
    return [a.node_id for a in actors]


def test_a_node_removed_mid_run_resumes_on_the_remaining_and_a_new_node_and_ends_at_the_step_budget_in_sync(
    cluster, layout, tmp_path, monkeypatch
):
    storage = tmp_path / "shared-storage"  # one filesystem for all nodes of this machine
    marker = tmp_path / "pause-marker"
    monkeypatch.setenv(faults.ENV_PAUSE_AT_STEP, "6")
    monkeypatch.setenv(faults.ENV_PAUSE_MARKER, str(marker))
    monkeypatch.setenv(faults.ENV_PAUSE_S, "120")
    params = tiny_params(
        "train.num_workers=2",
        "train.cpus_per_worker=1",
        "train.placement_strategy=SPREAD",
        "train.steps=14",
        "train.checkpoint_every=4",
        "train.eval_every=4",
        f"train.storage={storage}",
        "train.max_failures=2",
    )
    head = cluster.head_node
    timeline: list[tuple[float, str]] = []
    start = time.monotonic()

    def note(what: str) -> None:
        timeline.append((round(time.monotonic() - start, 1), what))

    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = run_training(params, layout, progress=lambda m: note(f"report step {m['step']}"))
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    paused = Path(str(marker) + faults.PAUSED_SUFFIX)
    deadline = time.monotonic() + 240
    while not paused.exists():
        assert thread.is_alive(), f"training ended before the pause: {outcome}"
        assert time.monotonic() < deadline, "rank 0 never reached the pause at step 6"
        time.sleep(0.2)
    note("rank 0 paused at step 6 (checkpoint 4 registered)")
    worker_nodes = set(_train_worker_nodes())
    assert len(worker_nodes) == 2, f"SPREAD placed both workers on one node: {worker_nodes}"
    victim = next(n for n in cluster.worker_nodes if n.node_id in worker_nodes and n is not head)
    before = len(_alive_node_ids())
    cluster.remove_node(victim, allow_graceful=False)
    note(f"removed node {victim.node_id[:8]}")
    new_node = cluster.add_node(num_cpus=NODE_CPUS, object_store_memory=OBJECT_STORE)
    note(f"added node {new_node.node_id[:8]}")
    thread.join(timeout=300)
    assert not thread.is_alive(), "training did not finish within 300 s of the node removal"
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    note(f"finished: final checkpoint step {checkpoint_step(result.checkpoint_dir)}")
    timeline_file = tmp_path / "timeline.json"
    timeline_file.write_text(json.dumps(timeline, indent=1))
    print("multi-node timeline:", json.dumps(timeline))

    assert len(_alive_node_ids()) == before  # one node gone, one new
    steps = [int(h["step"]) for h in result.history]
    assert steps[-1] == 14 and checkpoint_step(result.checkpoint_dir) == 14
    resumed = [h for h in result.history if h["resumed_via"] == "ray"]
    assert resumed and {h["resumed_from_step"] for h in resumed} == {4}, "the restart did not begin at checkpoint 4"
    assert [int(h["step"]) for h in resumed] == [8, 12, 14]  # steps 5-8 redone from checkpoint 4, none skipped
    assert last_run(layout)["storage_path"] == str(storage)
    assert any(p.name.startswith("checkpoint_") for p in (storage / result.run_name).iterdir())

    from pipeline.train.checkpoint import META_FILE

    progress = json.loads((result.checkpoint_dir / META_FILE).read_text())
    # 160 training lines / (8 x 2 workers) = 10 batches an epoch: 14 steps end 4 batches into epoch 1
    assert (progress["epoch"], progress["batch_in_epoch"]) == (1, 4)

    # DDP over gloo across the nodes: the ranks (seeded differently) end with the same weights,
    # and the checkpoint rank 0 wrote holds those very weights
    by_rank = result.history[-1]["weights_sha256_by_rank"]
    assert len(by_rank) == 2 and by_rank[0] == by_rank[1]
    assert weights_checksum(checkpoint_model(params, layout, result.checkpoint_dir)) == by_rank[0]


def test_two_tune_trials_train_on_different_nodes_log_through_an_mlflow_server_and_propose_the_best(
    cluster, layout, mlflow_server, monkeypatch
):
    from ray.util.state import list_actors

    from pipeline.tracking import runs
    from pipeline.tune.driver import run_tune

    monkeypatch.setenv("DBERT_PROJECT_ROOT", str(layout.root))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)  # driver, trials and rank 0 alike
    # each trial's rank 0 holds still 15 s at step 2, so the two trials overlap however slow this
    # machine is; a 1.5-CPU worker fits once on a 2-CPU node, so overlapping workers need two nodes
    monkeypatch.setenv(faults.ENV_PAUSE_AT_STEP, "2")
    monkeypatch.setenv(faults.ENV_PAUSE_S, "15")
    before = {a.actor_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)}
    params = tiny_params(
        "train.num_workers=1",
        "train.cpus_per_worker=1.5",
        "tune.time_designs=[none,embedding]",
        "tune.steps=4",
        "tune.grace_period=4",
        "tune.max_concurrent=2",
        f"train.storage={layout.root / 'shared-storage'}",
    )
    with runs.start_stage_run("tune", params, root=layout.root, uri=mlflow_server.url) as parent:
        outcome = run_tune(params, layout, parent_run_id=parent.info.run_id)
    assert len(outcome.table) == 2 and all(r.get("best_val_bound") is not None for r in outcome.table)
    workers = [
        a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000) if a.actor_id not in before
    ]
    assert len({a.node_id for a in workers}) == 2, [(a.actor_id[:8], a.node_id[:8]) for a in workers]

    client = mlflow_server.client()
    trials = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(trials) == 2 and {t.data.tags["trial.model.time_design"] for t in trials} == {"none", "embedding"}
    for trial in trials:  # each trial's rank 0 logged its own history, on another node, through HTTP
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "val_bound")]
        assert steps and steps[-1] == 4, (trial.info.run_name, steps)
    assert client.get_run(parent.info.run_id).data.metrics["best_val_bound"] == pytest.approx(
        outcome.best["best_val_bound"]
    )
    check_tune_outputs(outcome, layout, client, parent, designs={"none", "embedding"}, steps=4)


def test_storage_one_node_cannot_see_is_refused_before_training_starts(cluster, layout, tmp_path):
    """A third worker node in its own mount namespace, with a tmpfs over the storage folder: it
    sees an empty folder of its own, like a node-local disk on a real cluster."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1)")
    storage = tmp_path / "node-local-storage"
    storage.mkdir()
    ray_bin = Path(sys.executable).parent / "ray"  # the CLI of the Ray this test imports
    ray_cmd = str(ray_bin) if ray_bin.is_file() else shutil.which("ray") or "ray"
    script = (
        f"mount -t tmpfs none {storage} && exec {ray_cmd} start --address={cluster.address} "
        f"--num-cpus=1 --object-store-memory={OBJECT_STORE} --block"
    )
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m not permitted here: {probe.stderr.decode().strip()}")
    before = _alive_node_ids()
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(_alive_node_ids()) <= len(before):
            assert node.poll() is None, "the namespaced ray node exited"
            assert time.monotonic() < deadline, "the namespaced ray node never joined"
            time.sleep(0.5)
        params = tiny_params("train.num_workers=2", "train.cpus_per_worker=1", f"train.storage={storage}")
        with pytest.raises(StorageError, match=r"1 of the Ray cluster's \d+ nodes cannot see it") as caught:
            run_training(params, layout)
        assert "train.storage=" in str(caught.value) and "s3://" in str(caught.value)
        assert last_run(layout) is None  # refused before anything was recorded
        assert not any(p.name.startswith("train-") for p in storage.iterdir())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while len(_alive_node_ids()) > len(before) and time.monotonic() < deadline:
            time.sleep(0.5)


def test_a_model_folder_only_the_driver_has_reaches_a_worker_on_another_node(cluster, layout, tmp_path):
    """`model.name_or_path` a local folder: shipped through the object store, deleted here, and
    still loaded by a task pinned to a worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.assembly.model import model_from_params
    from pipeline.assembly.schedule import schedule_for
    from pipeline.model.loading import load_tokenizer, random_bert_config
    from pipeline.train.ray.inputs import TrainInputs
    from pipeline.train.ray.worker import weights_checksum

    folder = tmp_path / "my-bert"
    tokenizer = load_tokenizer("random")
    tokenizer.save_pretrained(folder)
    from transformers import BertForMaskedLM

    BertForMaskedLM(random_bert_config(tokenizer.vocab_size, 32, 2, 2, 64)).save_pretrained(folder)
    params = tiny_params(f"model.name_or_path={folder}")
    inputs = TrainInputs.read(layout.prepared, layout.token_stats, str(folder))
    schedule = schedule_for(params, inputs.stats)
    want = weights_checksum(model_from_params(params, schedule))
    shipped = inputs.ship()
    shutil.rmtree(folder)  # the driver's copy is gone: only the object store has it now

    @ray.remote(num_cpus=0)
    def load_on_node(inputs, params):
        from pipeline.assembly.model import model_from_params
        from pipeline.assembly.schedule import schedule_for
        from pipeline.train.ray.worker import weights_checksum

        data, local_params = inputs.materialize(params)
        model = model_from_params(local_params, schedule_for(local_params, data.stats))
        return (
            local_params.model.name_or_path,
            weights_checksum(model),
            len(data.train),
            ray.get_runtime_context().get_node_id(),
        )

    node = next(n for n in cluster.worker_nodes if n is not cluster.head_node)
    path, got, sequences, ran_on = ray.get(
        load_on_node.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False)).remote(
            shipped, params
        )
    )
    assert ran_on == node.node_id and path != str(folder) and "dbert-shipped-models" in path
    assert got == want and sequences == len(inputs.splits["train"])


def test_a_cluster_that_grows_in_time_is_accepted_and_one_that_does_not_is_refused(cluster):
    import ray

    from pipeline.train.ray.cluster import PlacementError, check_placement

    need = int(ray.cluster_resources()["CPU"]) + 1  # one worker more than the cluster holds
    with pytest.raises(PlacementError, match=r"did not grow to hold them within train.placement_timeout_s=2s"):
        check_placement(need, 1.0, False, wait_s=2)
    outcome: dict = {}

    def wait() -> None:
        try:
            check_placement(need, 1.0, False, wait_s=90)  # returns once the new node is up
            outcome["done"] = time.monotonic()
        except Exception as err:
            outcome["error"] = err

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(2.0)
    assert waiter.is_alive(), outcome  # still waiting for capacity
    grown = time.monotonic()
    node = cluster.add_node(num_cpus=1, object_store_memory=OBJECT_STORE)  # what an autoscaler does
    try:
        waiter.join(timeout=100)
        assert "error" not in outcome, outcome.get("error")
        assert outcome["done"] >= grown
    finally:
        cluster.remove_node(node)
