"""The Ray cluster: join or start it, stop what this process started, check that the training
workers fit before Ray waits for them forever, and the Train configs a run is started with."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.train.ray.runs import KEEP_CHECKPOINTS

ENV_TRAIN_LOG_LEVEL = "DBERT_RAY_TRAIN_LOG_LEVEL"  # Ray Train's own logs (default WARNING)
ENV_DASHBOARD = "DBERT_RAY_DASHBOARD"  # "0": start a local cluster without the dashboard

_log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """The Ray cluster cannot place the requested training workers; the message names the numbers."""


def train_log_level() -> str:
    """The level of Ray Train's own logs: `$DBERT_RAY_TRAIN_LOG_LEVEL`, default WARNING (Ray
    Train logs every report at INFO)."""
    return os.environ.get(ENV_TRAIN_LOG_LEVEL, "WARNING")


def init_ray() -> bool:
    """Join `$RAY_ADDRESS` when set, else start a local cluster sized to this machine; True when
    this call connected (the caller may then `ray.shutdown()` it when stopped, see `stop_ray`).

    No-op (False) when Ray is already initialised (a test fixture, a notebook, a Tune trial). The local
    cluster keeps its session files under `$RAY_TMPDIR` (default /tmp/ray: socket paths must be
    short). Its dashboard binds 127.0.0.1 only: Ray Train's controller polls the state API that
    the dashboard process serves (without it, every run logs "State API may be temporarily
    unavailable" every few seconds); `DBERT_RAY_DASHBOARD=0` turns it off anyway.
    """
    import ray

    from pipeline.signals import keep_handlers

    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
    address = os.environ.get("RAY_ADDRESS")
    with keep_handlers():  # ray.init() puts sys.exit(15) on SIGTERM: a stopped stage must end KILLED
        if address:
            ray.init(address=address, **quiet)
            return True
        dashboard = os.environ.get(ENV_DASHBOARD, "1").strip().lower() not in ("0", "false", "no", "off")
        ray.init(
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _temp_dir=os.environ.get("RAY_TMPDIR") or "/tmp/ray",
            **quiet,
        )
    return True


def stop_ray(started: bool) -> None:
    """After Ctrl-C / SIGTERM: shut down the Ray connection this process made (`init_ray` returned
    True), so the actors it owns - Train controllers and workers, Tune trials - stop with it.
    A cluster someone else started (a test fixture, a notebook) stays up."""
    if not started:
        return
    import ray

    try:
        ray.shutdown()
    except Exception as err:  # the process is stopping anyway
        _log.warning("ray.shutdown() failed while stopping: %s", err)


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_placement(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    *,
    reserve_cpus: float = 0.0,
    wait_s: float = 0.0,
) -> None:
    """Raise PlacementError unless the cluster's resources can hold the workers.

    Local mode (`num_workers == 0`) needs nothing. `reserve_cpus` is what a driver inside Ray
    (a Tune trial) holds while its workers run. Each worker must also fit on one node, and the
    workers must pack onto the nodes as a whole. Totals, not what is free right now: a busy
    cluster frees up. A cluster that can grow (an autoscaler behind it, `train.placement_timeout_s`
    > 0, i.e. `wait_s`) is asked for the workers' bundles and given `wait_s` seconds to add nodes;
    with `wait_s == 0` a cluster too small fails at once, since nothing will make it larger.
    """
    if num_workers <= 0:
        return
    import ray

    problem = placement_problem(num_workers, cpus_per_worker, use_gpu, reserve_cpus, ray.cluster_resources(), _nodes())
    if problem is None:
        return
    if wait_s <= 0:
        raise PlacementError(problem)
    from ray.autoscaler.sdk import request_resources

    bundle = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    request_resources(bundles=[bundle] * num_workers)  # a hint to an autoscaler; a no-op without one
    _log.warning("waiting up to %gs for the Ray cluster to grow: %s", wait_s, problem)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
        problem = placement_problem(
            num_workers, cpus_per_worker, use_gpu, reserve_cpus, ray.cluster_resources(), _nodes()
        )
        if problem is None:
            return
    raise PlacementError(
        f"{problem}; the cluster did not grow to hold them within train.placement_timeout_s={wait_s:g}s"
    )


def _nodes() -> list[dict]:
    import ray

    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def placement_problem(
    num_workers: int,
    cpus_per_worker: float,
    use_gpu: bool,
    reserve_cpus: float,
    totals: dict,
    nodes: list[dict],
) -> str | None:
    """Why the workers do not fit into a cluster of these totals and nodes (None: they fit)."""
    total_cpus = float(totals.get("CPU", 0.0))
    total_gpus = float(totals.get("GPU", 0.0))
    need = num_workers * cpus_per_worker + reserve_cpus
    driver = f" (plus {_fmt(reserve_cpus)} for the trial driver)" if reserve_cpus else ""
    if need > total_cpus + 1e-9:
        return (
            f"train.num_workers={num_workers} x train.cpus_per_worker={_fmt(cpus_per_worker)} needs "
            f"{_fmt(need)} CPUs{driver} but the Ray cluster has {_fmt(total_cpus)}; lower train.num_workers or "
            f"train.cpus_per_worker (train.num_workers=0 trains in this process), join a larger cluster "
            f"with RAY_ADDRESS, or let an autoscaling cluster grow (train.placement_timeout_s)"
        )
    if use_gpu and num_workers > total_gpus + 1e-9:
        return (
            f"train.num_workers={num_workers} with train.use_gpu=true needs {num_workers} GPU(s) but the Ray "
            f"cluster has {_fmt(total_gpus)}"
        )
    if nodes:
        slots = sum(
            min(
                math.floor(float(n.get("CPU", 0.0)) / cpus_per_worker + 1e-9),
                math.floor(float(n.get("GPU", 0.0)) + 1e-9) if use_gpu else num_workers,
            )
            for n in nodes
        )
        if slots < num_workers:
            largest = max(float(n.get("CPU", 0.0)) for n in nodes)
            return (
                f"train.num_workers={num_workers} x train.cpus_per_worker={_fmt(cpus_per_worker)} does not fit "
                f"on the Ray nodes: they hold {slots} such workers (largest node: {_fmt(largest)} CPUs)"
            )
    return None


def run_config_for(params: Params, run_name: str, storage_path: str | Path, callbacks: list | None = None):
    """The Train `RunConfig`: a named run folder in `train.storage` (a path or a pyarrow URI;
    reusing the name resumes it), the checkpoints kept, the worker-group restarts allowed, and
    Ray Train's log level."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig

    return RunConfig(
        name=run_name,
        storage_path=str(storage_path),
        checkpoint_config=CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
        failure_config=FailureConfig(max_failures=params.train.max_failures),
        callbacks=callbacks or [],
        logging_config=LoggingConfig(log_level=train_log_level()),  # type: ignore[call-arg]  # Train V2's RunConfig; the stubs resolve ray.air's
    )


def scaling_config_for(params: Params):
    """The Train `ScalingConfig` from `params.train` (`num_workers=0`: local mode)."""
    from ray.train import ScalingConfig

    tp = params.train
    return ScalingConfig(
        num_workers=tp.num_workers,
        use_gpu=tp.use_gpu,
        resources_per_worker={"CPU": tp.cpus_per_worker} if tp.num_workers else None,
        placement_strategy=tp.placement_strategy,
    )
