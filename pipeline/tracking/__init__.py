"""MLflow tracking: the store and its queries (`store`), one run per stage (`runs`), rank-0 logging (`log`).

The store is embedded by default: `sqlite:///<abs project root>/mlflow.db` with artifacts under
`<abs project root>/mlartifacts` (MLflow 3 needs an explicit artifact location next to a sqlite
store). `MLFLOW_TRACKING_URI`, or an explicit `uri`, points everything at a tracking server
instead. Where the project root is: `pipeline.project`; what a run is tagged with:
`pipeline.lineage`.

Typical stage::

    with start_stage_run("train", params, deps=[Path("data/tokenized")]) as run:
        log_metrics({"loss": 1.2}, step=10)
        log_dict_artifact(report, "report.json")

Call `setup_tracking` (or enter `start_stage_run`) in the driver *before* Ray workers or Tune
trials start: creating the sqlite schema from several processes at once races. `setup_tracking`
also exports `MLFLOW_TRACKING_URI` (MLflow does so itself), so processes started afterwards
(a local Ray cluster's workers) log to the same store.

Importing this module is cheap: MLflow is imported lazily inside the functions that need it.
"""
