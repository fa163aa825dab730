"""pipeline.tune: the search space from params, and what a real 2-trial Ray Tune run over Ray Train
workers with ASHA must leave (`check_tune_outputs`, applied to the multi-node run of
tests/integration/test_multinode.py: trials on two nodes, nested MLflow runs through a real server)."""

from __future__ import annotations

import pytest
import yaml

from pipeline.tune.space import TuneConfigError, search_space, search_values, trial_params
from tests.support.ray_fixtures import tiny_params


def test_the_search_space_grids_time_designs_and_adds_lr_and_lambda_only_when_asked():
    params = tiny_params("tune.time_designs=[none, prefix]")
    assert search_values(params) == {"model.time_design": ["none", "prefix"]}
    assert set(search_space(params)) == {"model.time_design"}
    assert search_space(params)["model.time_design"] == {"grid_search": ["none", "prefix"]}

    more = tiny_params("tune.time_designs=[none]", "tune.lrs=[1e-4, 3e-4]", "tune.spindle_lambdas=[0.1, 0.3]")
    assert search_values(more) == {
        "model.time_design": ["none"],
        "train.lr": [1e-4, 3e-4],
        "diffusion.spindle_lambda": [0.1, 0.3],
    }

    trial = trial_params(more, {"model.time_design": "none", "train.lr": 3e-4, "diffusion.spindle_lambda": 0.1})
    assert (trial.train.lr, trial.diffusion.spindle_lambda) == (3e-4, 0.1)
    assert trial.train.steps == more.tune.steps and trial.train.checkpoint_every == more.tune.steps


def test_a_spindle_lambda_that_breaks_monotonicity_is_refused_naming_the_limit():
    params = tiny_params("tune.spindle_lambdas=[0.2, 0.9]")  # T=100: limit 1/(100 sin(pi/100)) = 0.3184
    with pytest.raises(TuneConfigError, match=r"tune.spindle_lambdas: 0.9 above 0.318.*num_timesteps=100"):
        search_values(params)


def test_power_gammas_are_searched_only_with_the_power_schedule():
    params = tiny_params("diffusion.schedule=power", "tune.time_designs=[none]", "tune.power_gammas=[0.5, 2.0]")
    assert search_values(params)["diffusion.power_gamma"] == [0.5, 2.0]
    trial = trial_params(params, {"model.time_design": "none", "diffusion.power_gamma": 2.0})
    assert trial.diffusion.power_gamma == 2.0
    with pytest.raises(TuneConfigError, match="only acts on the power schedule"):
        search_values(tiny_params("tune.power_gammas=[1.0]"))


def check_tune_outputs(outcome, layout, client, parent, designs: set[str], steps: int) -> None:
    """What a finished tune leaves: the trials table, the proposal (never params.yaml itself) and
    one nested MLflow run per trial. The real 2-trial run that these checks follow is
    tests/integration/test_multinode.py's (Tune trials on two nodes, logging through an MLflow server): one
    Ray Tune run serves both, as each costs most of a minute of worker start-ups here."""
    import csv

    # the table: one row per trial, config + best bound + steps + status
    with open(layout.tune_out / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 == len(outcome.table)
    assert {r["model.time_design"] for r in rows} == designs
    for row in rows:
        assert float(row["best_val_bound"]) > 0
        assert int(row["steps"]) >= 2  # ASHA may stop the worse trial at its grace period
        assert row["status"] in ("completed", "stopped_early")
    assert (layout.tune_out / "results.json").is_file()

    # the proposal: only the overrides, with how to apply them
    text = outcome.proposal_path.read_text()
    assert outcome.proposal_path == layout.tune_out / "best_params.yaml"
    assert "dbert tune --apply" in text and "dvc exp run --temp -S model.time_design=" in text
    proposal = yaml.safe_load(text)
    assert proposal == outcome.best["overrides"] == {"model.time_design": outcome.best["model.time_design"]}
    assert outcome.best["best_val_bound"] == min(r["best_val_bound"] for r in outcome.table)
    assert not (layout.root / "params.yaml").exists()  # never written

    # nested MLflow runs: one per trial, under the parent, with the trial's params and metrics
    parent_id = parent.info.run_id
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    assert len(children) == 2
    assert {c.data.tags["trial_id"] for c in children} == {r["trial_id"] for r in outcome.table}
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["model.time_design"] == child.data.tags["trial.model.time_design"]
        assert child.data.params["train.steps"] == str(steps)
        assert child.data.metrics["val_bound"] > 0
        assert child.data.tags["tune_status"] in ("completed", "stopped_early")
    assert client.get_run(parent_id).data.metrics["best_val_bound"] == outcome.best["best_val_bound"]


def test_a_trial_that_trains_in_its_own_process_holds_the_cpus_it_trains_with():
    """With train.num_workers=0 the trial is the trainer: holding a 0.01-CPU sliver let Ray pack
    trials onto busy cores and start each on one thread (half speed on 2 cores)."""
    from pipeline.tune.trial import TRIAL_CPU, trial_cpus

    assert trial_cpus(tiny_params("train.num_workers=0", "train.cpus_per_worker=2")) == 2
    assert trial_cpus(tiny_params("train.num_workers=2", "train.cpus_per_worker=2")) == TRIAL_CPU
