"""One MLflow run per stage: flattened params, lineage and extra tags, nesting, and an end
status that says how the stage ended (FINISHED, FAILED, KILLED)."""

from __future__ import annotations

import contextlib
import posixpath
import re
import secrets
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.lineage import lineage_tags
from pipeline.overrides import flatten
from pipeline.tracking.failures import note_failure, reset, tracking_failed
from pipeline.tracking.store import DEFAULT_EXPERIMENT, setup_tracking

if TYPE_CHECKING:  # pragma: no cover
    import mlflow

# MLflow's limits (mlflow.utils.validation), repeated here so that importing stays cheap.
MAX_PARAM_VAL_LENGTH = 6000
MAX_TAG_VAL_LENGTH = 8000
MAX_KEY_LENGTH = 250
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def safe_key(key: str) -> str:
    """A valid MLflow param/tag key: allowed characters only, normalised, <= 250 chars."""
    key = posixpath.normpath(_BAD_KEY_CHARS.sub("_", key)).lstrip("/")
    if key == "." or key.startswith(".."):
        key = "_" + key
    return key[:MAX_KEY_LENGTH].rstrip("/") or "_"


def flat_params(params: Any) -> dict[str, str]:
    """`Params` (via `.flat()`), a nested or flat mapping, or None -> `{key: str(value)}`.

    Values are stringified and cut to MLflow's 6000-character limit.
    """
    if params is None:
        return {}
    if hasattr(params, "flat"):
        flat = params.flat()
    elif isinstance(params, Mapping):
        flat = flatten(params)
    elif hasattr(params, "model_dump"):
        flat = flatten(params.model_dump())
    else:
        raise TypeError(f"cannot log params of type {type(params).__name__}")
    return {safe_key(str(k)): str(v)[:MAX_PARAM_VAL_LENGTH] for k, v in flat.items()}


def default_run_name(stage: str) -> str:
    """`<stage>-<yyyymmdd-HHMMSS>-<4 hex>`: sortable and unique."""
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def _experiment_of(params: Any) -> str | None:
    tracking = getattr(params, "tracking", None)
    if tracking is not None:
        return getattr(tracking, "experiment", None)
    if isinstance(params, Mapping):
        nested = params.get("tracking")
        if isinstance(nested, Mapping) and nested.get("experiment"):
            return str(nested["experiment"])
        if params.get("tracking.experiment"):
            return str(params["tracking.experiment"])
    return None


@contextlib.contextmanager
def start_stage_run(
    stage: str,
    params: Any = None,
    experiment: str | None = None,
    deps: list[Path] | list[str] | None = None,
    run_name: str | None = None,
    nested: bool = False,
    tags: Mapping[str, Any] | None = None,
    root: Path | str | None = None,
    parent_run_id: str | None = None,
    resume_run_id: str | None = None,
    uri: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Run one stage as one MLflow run: flattened params, lineage + extra tags.

    The experiment is `experiment`, else `params.tracking.experiment`, else "diffusionbert".
    `nested=True` nests under the active run, and so does any stage started while a run is
    active in this thread (the ablation's row runs hold their stages' runs); `parent_run_id`
    nests under a run started by another process (a Tune driver's run seen from a trial).
    `resume_run_id` reopens that run (an interrupted ablation going on). `uri` names the store
    when this process cannot derive it (a Tune trial logging to its driver's store). Yields the
    `mlflow.ActiveRun`; the run ends FINISHED, or FAILED (KILLED on Ctrl-C) when the block
    raises, and the exception propagates. In the main thread, SIGTERM / SIGINT / SIGHUP raise
    `pipeline.signals.Terminated` while the run is open, so a killed stage ends KILLED too.
    """
    import mlflow

    from pipeline.signals import held, terminate_on_signals

    name = experiment or _experiment_of(params) or DEFAULT_EXPERIMENT
    experiment_id = setup_tracking(name, root, uri)
    if resume_run_id is not None and not _run_exists(resume_run_id):
        # The store lost it (a new or restored workspace, another tracking server): the work
        # goes on under a new run rather than failing on a record of where it was logged.
        warnings.warn(f"MLflow run {resume_run_id} is not in the store; starting a new {stage} run", stacklevel=3)
        resume_run_id = None
    all_tags = lineage_tags(stage, deps, root)
    all_tags.update({str(k): v for k, v in (tags or {}).items()})
    safe_tags = {safe_key(k): str(v)[:MAX_TAG_VAL_LENGTH] for k, v in all_tags.items()}
    nested = nested or (parent_run_id is None and mlflow.active_run() is not None)
    # SIGTERM / SIGINT / SIGHUP raise Terminated (a KeyboardInterrupt) while the run is open, so
    # a killed stage ends its run KILLED; a signal while the run is being opened or ended waits.
    with terminate_on_signals():
        run_id = None
        status = "FINISHED"
        try:
            with held():
                if resume_run_id is not None:
                    run = mlflow.start_run(run_id=resume_run_id, nested=nested)
                    run_id = run.info.run_id
                    mlflow.set_tags(safe_tags)
                else:
                    run = mlflow.start_run(
                        experiment_id=experiment_id,
                        run_name=run_name or default_run_name(stage),
                        nested=nested,
                        parent_run_id=parent_run_id,
                        tags=safe_tags,
                    )
                    run_id = run.info.run_id
            if not nested:
                reset()
            flat = flat_params(params)
            if flat:
                mlflow.log_params(flat, run_id=run_id)
            yield run
        except BaseException as err:
            status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
            raise
        finally:
            if run_id is not None:
                with held():
                    _close(run_id, status)


def _close(run_id: str, status: str) -> None:
    """End the run, best effort: MLflow takes it off this thread's stack before it asks the
    store, so a store that does not answer leaves no run open here (it stays RUNNING in the
    store; `dbert train --resume` closes it), and the failure is one warning, never an exception
    that would hide how the stage ended."""
    failed = tracking_failed()
    try:
        _end_run(run_id, status)
    except Exception as err:
        if failed is None:
            note_failure(f"ending run {run_id} {status}", err)
        else:
            warnings.warn(f"MLflow run {run_id} is left RUNNING in the store: tracking failed ({failed})", stacklevel=3)


def _run_exists(run_id: str) -> bool:
    """Whether the current tracking store holds `run_id`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _end_run(run_id: str, status: str) -> None:
    """End `run_id` and any run left open inside it; never ends runs outside it."""
    import mlflow

    stack_ids = []
    active = mlflow.active_run()
    while active is not None and active.info.run_id != run_id and active.info.run_id not in stack_ids:
        stack_ids.append(active.info.run_id)
        mlflow.end_run(status)  # a nested run the block forgot to end
        active = mlflow.active_run()
    if active is not None and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:  # no longer on this thread's stack: terminate it directly
        mlflow.MlflowClient().set_terminated(run_id, status)
