"""ablation (opt-in, `dbert ablation`): PAPER §8's rows trained and evaluated on one budget each,
then one report with the table and the paper's four claims checked.

Reads  params (every group: each row is the base params plus the row's overrides; `ablation.*`
       picks the rows, the per-row budget and the training seeds), data/prepared/ and
       data/token_stats/ (run `dvc repro token_stats` first).
Writes outputs/ablation/rows/<key>/ - each row's own checkout-shaped root (data/ links to the
       project's; its schedule, checkpoints, model, train and evaluate outputs) with result.json
       when it is done - outputs/ablation/state.json (MLflow run ids, for resuming) and
       outputs/ablation/report/ (report.json, report.md, curves.png, quality_diversity.png).
       With `ablation.publish` (a committed folder), also rows/<key>/result.json there as each row
       finishes and report/ with the rows so far (marked partial until the last one).
MLflow: one parent run `ablation`, one child per row (its table numbers as metrics), and under
       each child the row's schedule, train and evaluate stage runs.

Resumable: run it again and finished rows (same params fingerprint) are reused, also from
`ablation.publish` in a checkout that has no outputs/, an interrupted row's training continues
from its last checkpoint, and the MLflow runs are reopened.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.ablation.rows import RowRun, plan, plan_fingerprint
from pipeline.artifacts import Layout, atomic_directory, read_json, write_json_atomic
from pipeline.config import Params, with_values
from pipeline.vocab import ProgressCallback
from stages.common import code_paths, require, stage_run, tracking_root

STAGE = "ablation"
ROW_STAGE = "ablation_row"
PARAMS = ("ablation", "model", "diffusion", "train", "evaluate", "data.max_seq_len", "data.source")
INPUTS = (
    "data/prepared/train",
    "data/prepared/validation",
    "data/prepared/test",
    "data/prepared/test.txt",
    "data/token_stats",
)
OUTPUTS = ("outputs/ablation/rows", "outputs/ablation/state.json", "outputs/ablation/report")
SHARED_DATA = ("prepared", "token_stats")  # linked into each row's root; the schedule is per row

# on_row(index, total, key, status): the CLI prints one line per row ("start", "done", "reused").
RowCallback = Callable[[int, int, str, str], None]


def run(
    params: Params,
    root: Path,
    *,
    only: list[str] | None = None,
    fresh: bool = False,
    progress: ProgressCallback | None = None,
    on_row: RowCallback | None = None,
    command: str = "dbert ablation",
) -> dict:
    """Train and evaluate every planned row (reusing finished ones), then write the report.
    Every run, the rows' stage runs included, goes to the project's store (a row's root is not a
    project), named explicitly. `command`: the command line the report names."""
    from pipeline.ablation.writeup import build_report, parent_metrics, write_report
    from pipeline.tracking.log import log_artifact, log_metrics
    from pipeline.tracking.store import tracking_uri

    layout = Layout(Path(root))
    runs = plan(params, only)  # an unknown row is named before anything else is checked
    for path in INPUTS:
        require(layout.root / path, path, "token-stats" if "token_stats" in path else "prepare")
    out = layout.root / params.ablation.out
    if fresh and out.exists():
        shutil.rmtree(out)
    state_path = out / "state.json"
    state = read_json(state_path) if state_path.is_file() else {}
    same_plan = state.get("plan") == [r.key for r in runs] and state.get("params") == plan_fingerprint(params)
    uri = tracking_uri(tracking_root(layout.root))
    with stage_run(
        STAGE,
        params,
        root,
        PARAMS,
        [*code_paths(__name__), *INPUTS],
        run_name="ablation",
        resume_run_id=state.get("parent_run_id") if same_plan else None,
        tracking_uri=uri,
    ) as parent:
        state.update(
            {"parent_run_id": parent.info.run_id, "plan": [r.key for r in runs], "params": plan_fingerprint(params)}
        )
        state.setdefault("rows", {})
        write_json_atomic(state, state_path)
        publish = layout.root / params.ablation.publish if params.ablation.publish else None
        results = []
        for index, row_run in enumerate(runs):
            if publish is not None:
                _reuse_published(row_run, layout, publish)
            results.append(_run_row(row_run, layout, state, state_path, index, len(runs), progress, on_row, uri))
            if publish is not None and index + 1 < len(runs):  # the last one gets the final report below
                _publish(results, publish, _published_report(params, results, publish, parent.info.run_id, command))
        report = build_report(params, results, parent.info.run_id, command=command)
        with atomic_directory(out / "report") as tmp:
            write_report(report, tmp)
            log_metrics(parent_metrics(report))
            for name in sorted(p.name for p in tmp.iterdir()):
                log_artifact(tmp / name, "report")
        if publish is not None:
            # a run of some rows (--row: one half of make schedules-parallel) publishes the whole plan's report so far
            whole = report if only is None else _published_report(params, results, publish, parent.info.run_id, command)
            _publish(results, publish, whole)
    return {
        "stage": STAGE,
        "report": str(out / "report"),
        "mlflow_run_id": parent.info.run_id,
        "rows": len(results),
        "claims": {c["claim"]: c["verdict"] for c in report["claims"]},
    }


def report_only(params: Params, root: Path, command: str = "dbert ablation --report-only") -> dict:
    """The report of the rows finished so far, from this checkout's `ablation.out` or published
    under `ablation.publish`, training and evaluating nothing and opening no MLflow run: to look at
    an experiment while its rows run elsewhere, or to re-render it after the report code changed.
    Written to `ablation.publish`/report (the committed one) when set, else `ablation.out`/report;
    it names the parent run of state.json, if any."""
    from pipeline.ablation.writeup import build_report, write_report

    layout = Layout(Path(root))
    runs = plan(params)
    out = layout.root / params.ablation.out
    publish = layout.root / params.ablation.publish if params.ablation.publish else None
    results = [r for row_run in runs if (r := _finished_result(row_run, out, publish)) is not None]
    if not results:
        raise FileNotFoundError(
            f"no finished row of this plan in {out / 'rows'}"
            + (f" or {publish / 'rows'}" if publish is not None else "")
            + " (finished with these params); run `dbert ablation` first"
        )
    state_path = out / "state.json"
    parent = read_json(state_path).get("parent_run_id", "") if state_path.is_file() else ""
    earlier = _earlier_report(publish)
    report = build_report(
        params, results, parent or earlier.get("mlflow_parent_run_id", ""), planned=len(runs), command=command
    )
    trained_by = earlier.get("trained_by") or (
        {"command": earlier["command"], "git_commit": earlier["git_commit"]}
        if earlier.get("command") and "--report-only" not in earlier["command"]
        else None
    )
    if trained_by:  # a re-render keeps the provenance of the rows it renders
        report["trained_by"] = trained_by
    if publish is not None:
        _publish(results, publish, report)
        written = publish / "report"
    else:
        with atomic_directory(out / "report") as tmp:
            write_report(report, tmp)
        written = out / "report"
    return {
        "stage": STAGE,
        "report": str(written),
        "mlflow_run_id": parent,
        "rows": len(results),
        "claims": {c["claim"]: c["verdict"] for c in report["claims"]},
    }


def _earlier_report(publish: Path | None) -> dict:
    """The published report.json a re-render replaces ({} when there is none)."""
    path = None if publish is None else publish / "report" / "report.json"
    return read_json(path) if path is not None and path.is_file() else {}


def _finished_result(row_run: RowRun, out: Path, publish: Path | None) -> dict | None:
    """The row's result.json in `out` when it was measured with these params, else the published one."""
    result = _result_with_fingerprint(out / "rows" / row_run.key / "result.json", row_run)
    if result is None and publish is not None:
        result = _published_result(row_run, publish)
    return result


def _result_with_fingerprint(path: Path, row_run: RowRun) -> dict | None:
    """The result.json at `path` when it was measured with `row_run`'s params (same fingerprint)."""
    if not path.is_file():
        return None
    result = read_json(path)
    return result if result.get("fingerprint") == row_run.fingerprint else None


# ---------------------------------------------------------------------------------------------
# One row
# ---------------------------------------------------------------------------------------------


def _run_row(
    row_run: RowRun,
    layout: Layout,
    state: dict,
    state_path: Path,
    index: int,
    total: int,
    progress: ProgressCallback | None,
    on_row: RowCallback | None,
    uri: str,
) -> dict:
    from pipeline.ablation.results import collect_result, row_metrics
    from pipeline.tracking.log import log_metrics
    from pipeline.tracking.runs import start_stage_run

    row_root = layout.root / row_run.params.ablation.out / "rows" / row_run.key
    parent_id = state["parent_run_id"]
    record = state["rows"].get(row_run.key, {})
    result_path = row_root / "result.json"
    if (result := _result_with_fingerprint(result_path, row_run)) is not None:
        if record.get("parent") != parent_id:  # finished under an earlier parent: give it a child here
            trained_in = result["mlflow"].get("trained_in_row", result["mlflow"]["row"])
            with start_stage_run(
                ROW_STAGE,
                row_run.mlflow_params,
                run_name=row_run.key,
                nested=True,
                tags={**row_run.tags, "reused_from_run": trained_in},
                uri=uri,
            ) as child:
                log_metrics(row_metrics(result))
            # "row" is the child of the current parent; the stage runs stay under "trained_in_row".
            result["mlflow"].update({"row": child.info.run_id, "trained_in_row": trained_in})
            write_json_atomic(result, result_path)
            state["rows"][row_run.key] = {
                "run_id": child.info.run_id,
                "parent": parent_id,
                "fingerprint": row_run.fingerprint,
            }
            write_json_atomic(state, state_path)
        _notify(on_row, index, total, row_run.key, "reused")
        return result
    stamp = row_root / "fingerprint.json"
    trained_as = read_json(stamp).get("train_fingerprint") if stamp.is_file() else None
    if trained_as != row_run.train_fingerprint and row_root.exists():
        shutil.rmtree(row_root)  # the row's training params changed: nothing of it can be reused
    result_path.unlink(missing_ok=True)  # only the evaluation changed: keep the model, evaluate again
    _link_shared_data(layout, row_root)
    write_json_atomic({"fingerprint": row_run.fingerprint, "train_fingerprint": row_run.train_fingerprint}, stamp)
    # Reopen the row's run only when it was interrupted with these very params (MLflow refuses
    # to change a logged param); a re-evaluation with other settings gets a new child run.
    same = record.get("parent") == parent_id and record.get("fingerprint") == row_run.fingerprint
    resume_id = record.get("run_id") if same else None
    _notify(on_row, index, total, row_run.key, "start")
    with start_stage_run(
        ROW_STAGE,
        row_run.mlflow_params,
        run_name=row_run.key,
        nested=True,
        tags=row_run.tags,
        resume_run_id=resume_id,
        uri=uri,
    ) as child:
        state["rows"][row_run.key] = {
            "run_id": child.info.run_id,
            "parent": parent_id,
            "fingerprint": row_run.fingerprint,
        }
        write_json_atomic(state, state_path)
        seconds = _train_and_evaluate(row_run.params, row_root, _row_progress(progress, row_run.key), uri)
        result = collect_result(row_run, row_root, child.info.run_id, seconds, uri)
        log_metrics(row_metrics(result))
        write_json_atomic(result, result_path)
    _notify(on_row, index, total, row_run.key, "done")
    return result


def _train_and_evaluate(
    params: Params, row_root: Path, progress: ProgressCallback | None, uri: str
) -> dict[str, float]:
    """The pipeline's own stages on the row's root, logging to the store `uri`; a finished training
    is not repeated, an interrupted one resumes from its checkpoint. Seconds per phase accumulate
    over resumptions."""
    from pipeline.train.ray.runs import resumable
    from stages import evaluate, samplers, schedule, train

    row_layout = Layout(row_root)
    timing_path = row_root / "timing.json"
    seconds = read_json(timing_path) if timing_path.is_file() else {"train": 0.0, "evaluate": 0.0}
    schedule.run(params, row_root, tracking_uri=uri)
    if not ((row_layout.train_out / "metrics.json").is_file() and (row_layout.model / "config.json").is_file()):
        start = time.perf_counter()
        try:
            # The rows' models are compared, not served: no pyfunc, no registry version per row.
            unserved = with_values(params, {"tracking.registered_model": ""})
            timed = _recording_train_time(progress, seconds, timing_path, start)
            train.run(unserved, row_root, resume=resumable(row_layout), progress=timed, tracking_uri=uri)
        finally:
            seconds["train"] += time.perf_counter() - start
            write_json_atomic(seconds, timing_path)
    start = time.perf_counter()
    evaluate.run(params, row_root, progress=progress, tracking_uri=uri)
    if params.evaluate.table_steps or params.evaluate.qd_top_k:  # the detail rows: steps table, top-k curve
        # ... of the ancestral chain only: the rows compare models, not samplers (row_params).
        samplers.run(params, row_root, progress=progress, tracking_uri=uri)
    seconds["evaluate"] = time.perf_counter() - start
    write_json_atomic(seconds, timing_path)
    return seconds


def _row_progress(progress: ProgressCallback | None, key: str) -> ProgressCallback | None:
    """`progress` with the row's key before each task: one process trains several rows, and each
    row's bars and log lines must count its own steps from zero, not on from the row before."""
    if progress is None:
        return None

    def call(task: str, advance: int, total: int | None) -> None:
        progress(f"{key}: {task}", advance, total)

    return call


def _recording_train_time(
    progress: ProgressCallback | None, seconds: dict[str, float], path: Path, start: float
) -> ProgressCallback:
    """`progress`, also writing the training time so far to timing.json at every report: a session
    killed outright (no `finally`) still leaves the time up to its last checkpoint."""

    def call(task: str, advance: int, total: int | None) -> None:
        write_json_atomic({**seconds, "train": seconds["train"] + time.perf_counter() - start}, path)
        if progress is not None:
            progress(task, advance, total)

    return call


def _published_result(row_run: RowRun, publish: Path) -> dict | None:
    """The row's result.json under `ablation.publish` when it was measured with these very params
    (same fingerprint), else None."""
    return _result_with_fingerprint(publish / "rows" / row_run.key / "result.json", row_run)


def _reuse_published(row_run: RowRun, layout: Layout, publish: Path) -> None:
    """A row finished in another checkout and committed under `ablation.publish` is copied into
    `ablation.out` when this checkout has no result for it (or a stale one), so `_run_row`
    reuses it like a row finished here; a published result with other params is ignored."""
    result = _published_result(row_run, publish)
    if result is None:
        return
    local = layout.root / row_run.params.ablation.out / "rows" / row_run.key / "result.json"
    if _result_with_fingerprint(local, row_run) is None:
        write_json_atomic(result, local)


def _published_report(
    params: Params, results: list[dict], publish: Path, parent_run_id: str, command: str = "dbert ablation"
) -> dict:
    """The report so far of the whole plan (`ablation.rows`, whatever `--row` this run took): this
    run's finished rows and every row another run (the other half of `make schedules-parallel`,
    another checkout) published with the same fingerprint, in plan order. Two runs that share
    `ablation.publish` then both write the same report, not each its own half."""
    from pipeline.ablation.writeup import build_report

    whole = plan(params)
    keys = [row_run.key for row_run in whole]
    own = {r["key"]: r for r in results}
    rows = []
    for row_run in whole:
        if row_run.key in own:
            rows.append(own[row_run.key])
        elif (result := _published_result(row_run, publish)) is not None:
            rows.append(result)
    extra = [r for key, r in own.items() if key not in keys]  # a --row outside ablation.rows
    return build_report(params, rows + extra, parent_run_id, planned=len(keys) + len(extra), command=command)


def _publish(results: list[dict], publish: Path, report: dict) -> None:
    """Every finished row's result.json and the report so far into `ablation.publish` (meant to be
    committed): partial results land as rows finish, and a fresh checkout reuses them."""
    from pipeline.ablation.writeup import write_report

    for result in results:
        write_json_atomic(result, publish / "rows" / result["key"] / "result.json")
    with atomic_directory(publish / "report") as tmp:
        write_report(report, tmp)


def _link_shared_data(layout: Layout, row_root: Path) -> None:
    """The row reads the project's prepared text and token statistics through symlinks."""
    data = row_root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name in SHARED_DATA:
        link, target = data / name, (layout.root / "data" / name).resolve()
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink() if link.is_symlink() else shutil.rmtree(link)
        link.symlink_to(target, target_is_directory=True)


def _notify(on_row: RowCallback | None, index: int, total: int, key: str, status: str) -> None:
    if on_row is not None:
        on_row(index, total, key, status)
