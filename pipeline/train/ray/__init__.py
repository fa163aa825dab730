"""Training on Ray Train V2 (2.60): `driver.run_training` runs `pipeline.train.loop.train_loop` on
TorchTrainer workers (DDP over gloo/nccl) or, with `train.num_workers=0`, in this process (Ray
Train's local mode), then copies the final checkpoint next to the project and exports the model.

One job per module: `cluster` (join or start Ray, fail fast on placement, Train configs), `runs`
(run records and checkpoints on disk), `worker` (the typed `WorkerConfig` and the worker
function), `reports` (how rank 0's reports reach the driver), `driver` (`run_training`, export),
`faults` (test-only fault injection). What they add on top of Ray Train:

* Resume: a run is a `RunConfig(name, storage_path)` folder. Reusing the name makes the V2
  controller reload its checkpoint snapshot there, so `ray.train.get_checkpoint()` returns the
  latest checkpoint in the workers; worker-group failures (`FailureConfig.max_failures`) restart
  from it the same way. Local mode persists nothing and retries nothing, so there checkpoints are
  copied into the same run folder by the worker, and the driver passes the latest one through
  `WorkerConfig.resume_from`, used whenever `ray.train.get_checkpoint()` is None.
* Reports: `ray.train.report` must be called by every rank at the same steps (the loop does);
  rank 0 alone hands over a checkpoint. A controller-side `UserCallback` sees the metrics of all
  ranks and forwards rank 0's to the driver (history, live `progress`), so history survives
  worker restarts; the driver also appends each report to the run folder's `history.jsonl`, so a
  resumed run's history starts at step 1, not at the resume (local and file: run folders). Local mode runs no callbacks: the worker calls the driver's sink directly.
* MLflow: rank 0 logs each report to the driver's run by id (`WorkerConfig.mlflow_run_id`; the
  tracking URI travels in the config because a Ray cluster started earlier does not see later
  env changes). Workers never start or end that run, and never create the database.
* Placement: `cluster.check_placement` fails fast when the cluster cannot hold the workers,
  instead of letting Ray wait for resources forever.

Importing these modules does not import Ray, torch or MLflow.
"""
