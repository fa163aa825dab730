"""How rank 0's reports reach the driver: a controller-side Ray Train callback that forwards them
over a Ray queue (workers on Ray), or a sink the worker calls directly (local mode, where the
worker runs in the driver's process and Ray Train runs no callbacks)."""

from __future__ import annotations

import secrets
from collections.abc import Callable

Sink = Callable[[dict], None]

_LOCAL_SINKS: dict[str, Sink] = {}


def register_sink(sink: Sink) -> str:
    """Register the driver's `sink(metrics)` for a local-mode run; the id goes in the worker config."""
    sink_id = secrets.token_hex(8)
    _LOCAL_SINKS[sink_id] = sink
    return sink_id


def drop_sink(sink_id: str | None) -> None:
    """Forget a sink once its run is over."""
    _LOCAL_SINKS.pop(sink_id or "", None)


def local_sink(sink_id: str | None) -> Sink | None:
    """The sink registered under `sink_id` in this process (None on a Ray worker, or without one)."""
    return _LOCAL_SINKS.get(sink_id or "")


def forward_reports_callback(queue):
    """A controller-side UserCallback that puts rank 0's metrics (plus every rank's weight
    checksum at the end, and the persisted checkpoint path) on a Ray queue for the driver."""
    from ray.train import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, queue) -> None:
            self.queue = queue

        def after_report(self, run_context, metrics, checkpoint) -> None:
            if not metrics:
                return
            entry = dict(metrics[0])
            sums = [m.get("weights_sha256") for m in metrics]
            if any(s is not None for s in sums):
                entry["weights_sha256_by_rank"] = sums
            entry["checkpoint_path"] = checkpoint.path if checkpoint is not None else None
            self.queue.put(entry)

    return ForwardReports(queue)
