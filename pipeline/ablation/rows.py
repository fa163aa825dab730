"""The paper's ablation rows (PAPER §8) as overrides of one params set.

Every row shares the base params (data, model checkpoint, optimiser, evaluation sizes) and the
per-row budget `ablation.train_steps`; a row changes only what the paper's table changes. With
`model.name_or_path=bert-base-uncased` the rows are the paper's own; with the bundled MiniLM,
"BERT init" means "pretrained MiniLM encoder" and D3PM is the same architecture from random
weights.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ABLATION_ROWS, Params, with_values


@dataclass(frozen=True)
class RowSpec:
    """One line of PAPER §8's table: what it is called there and how it differs from the base."""

    name: str
    method: str  # the paper's "Method" column
    init: str  # "BERT" (pretrained encoder) or "random"
    schedule: str  # the paper's "Schedule" column
    time: str  # LTE (layerwise) / PTE (prefix) / TAD (none) / "-"
    overrides: dict[str, Any]
    note: str = ""


ROWS: dict[str, RowSpec] = {
    spec.name: spec
    for spec in (
        RowSpec(
            "d3pm_linear_lte",
            "D3PM",
            "random",
            "linear",
            "LTE",
            {"model.random_init": True, "model.time_design": "layerwise", "diffusion.schedule": "linear"},
        ),
        RowSpec(
            "d3pm_linear_tad",
            "D3PM",
            "random",
            "linear",
            "TAD",
            {"model.random_init": True, "model.time_design": "none", "diffusion.schedule": "linear"},
        ),
        RowSpec(
            "bert_mouth",
            "BERT-Mouth",
            "BERT",
            "-",
            "-",
            {
                "train.objective": "mlm",
                "evaluate.sampler": "gibbs",
                "model.time_design": "none",
                "diffusion.schedule": "linear",
            },
            note="plain MLM fine-tune of the same encoder and budget, Gibbs sampling; bound on the linear chain",
        ),
        RowSpec(
            "dbert_linear_lte",
            "DiffusionBERT",
            "BERT",
            "linear",
            "LTE",
            {"model.time_design": "layerwise", "diffusion.schedule": "linear"},
        ),
        RowSpec(
            "dbert_linear_pte",
            "DiffusionBERT",
            "BERT",
            "linear",
            "PTE",
            {"model.time_design": "prefix", "diffusion.schedule": "linear"},
        ),
        RowSpec(
            "dbert_linear_tad",
            "DiffusionBERT",
            "BERT",
            "linear",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "linear"},
        ),
        RowSpec(
            "dbert_spindle_tad",
            "DiffusionBERT",
            "BERT",
            "spindle",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "spindle"},
        ),
        RowSpec(
            "dbert_power_tad",
            "DiffusionBERT (power)",
            "BERT",
            "power",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "power"},
            note="the exact token-aware power schedule (diffusion.power_gamma); not in the paper",
        ),
        RowSpec(
            "mdlm_loglinear_tad",
            "MDLM recipe",
            "BERT",
            "loglinear",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "loglinear"},
            note="the successor's recipe: log-linear schedule, continuous-time loss; not in the paper",
        ),
        RowSpec(
            "dbert_spindle_paper_tad",
            "DiffusionBERT",
            "BERT",
            "spindle_paper",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "spindle_paper"},
            note="LEAKY: the authors' per-sentence spindle; its bound is not a valid likelihood bound",
        ),
        RowSpec(
            "dbert_spindle_tad_packed",
            "DiffusionBERT",
            "BERT",
            "spindle",
            "TAD",
            {"model.time_design": "none", "diffusion.schedule": "spindle", "train.packed": True},
            note="PACKED: trained and scored on 64-WordPiece rows cut across sentences; not comparable",
        ),
    )
}
assert set(ROWS) == set(ABLATION_ROWS), "pipeline.config.ABLATION_ROWS and ROWS must name the same rows"


@dataclass(frozen=True)
class RowRun:
    """One training + evaluation of a row with one training seed."""

    row: RowSpec
    seed: int
    params: Params = field(compare=False)

    @property
    def key(self) -> str:
        """Directory and MLflow name: the row, plus the seed when it is not the first."""
        return self.row.name if self.seed == self.params.ablation.seeds[0] else f"{self.row.name}.seed{self.seed}"

    @property
    def fingerprint(self) -> str:
        """Hash of everything the row's result depends on: a resumed run reuses a finished row
        only when this is unchanged."""
        return digest(result_dump(self.params, exclude={"ablation", "tune", "tracking"}))

    @property
    def train_fingerprint(self) -> str:
        """Hash of what the row's training depends on: when only the evaluation changed, the
        trained model is kept and only re-evaluated."""
        return digest(result_dump(self.params, include={"data", "model", "diffusion", "train"}))

    @property
    def mlflow_params(self) -> dict[str, Any]:
        """What the row's MLflow run logs: its params without the ablation's and tune's own."""
        return {k: v for k, v in self.params.flat().items() if not k.startswith(("ablation.", "tune."))}

    @property
    def tags(self) -> dict[str, str]:
        """The row's MLflow tags: the paper's columns, the training seed, the fingerprint."""
        spec = self.row
        return {
            "ablation_row": spec.name,
            "training_seed": str(self.seed),
            "method": spec.method,
            "init": spec.init,
            "schedule": spec.schedule,
            "time": spec.time,
            "fingerprint": self.fingerprint,
            **({"note": spec.note} if spec.note else {}),
        }


def digest(obj: Any) -> str:
    """Short stable hash of a JSON-able object (params dumps)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()[:16]


# Where and how Ray places and stores a run: never part of what a row measures.
PLUMBING = {"train": ("storage", "placement_timeout_s", "placement_strategy")}
# Evaluation a row never runs (`row_params` turns it off): rows compare models, so they report no
# conditional numbers and compare no samplers; the default run's sizes of these are free to move.
NOT_IN_ROWS = {"evaluate": ("conditional_sequences", "compare_samplers", "compare_steps")}
# Without a steps table or a top-k curve a row never reads their sizes; they stay at the values the
# measured rows hashed, so the default run's (smaller) sizes do not make finished rows look stale.
UNREAD_TABLE_SIZES = {"evaluate.table_sequences": 32, "evaluate.table_samples": 32, "evaluate.qd_samples": 32}
# Params only one schedule reads: a row on another schedule does not depend on them, so choosing
# them (e.g. gamma from a Tune sweep) never makes its other rows look stale.
SCHEDULE_ONLY = {"power_gamma": "power"}
# Params added after rows were first measured, at the value that computes exactly what the code
# computed before them: hashed only when set otherwise, so finished rows stay reusable.
NEUTRAL_DEFAULTS = {
    ("train", "global_batch_size"): None,
    ("train", "tokens_per_batch"): None,  # padded batches of train.batch_size, as measured
    ("train", "row_length"): 128,  # read only under a token budget
    ("train", "compile"): False,
    ("model", "family"): "bert",
    ("diffusion", "power_gamma"): 1.0,  # read only by the power schedule
    ("ablation", "out"): "outputs/ablation",  # where, not what
    ("ablation", "publish"): "",  # where, not what
    ("ablation", "bound_seeds"): [0, 1, 2],  # the evaluate.seeds the rows were measured with
    ("ablation", "table_steps"): [2, 8, 16, 64, 128],  # the detail row's, as measured
    ("ablation", "qd_top_k"): [1, 3, 10, 30, 0],
    ("evaluate", "confidence_score"): "prob",  # read only by the confidence sampler
    ("evaluate", "remdm_eta"): 0.04,  # read only by the remdm sampler
    ("evaluate", "judge"): "",  # adds the judge's numbers, changes none of the others
    ("evaluate", "device"): "auto",  # where, not what: each row's report records its device and precision
    ("tracking", "registered_model"): "diffusion-bert",  # where the model is registered, not what it computes
}


def result_dump(params: Params, *, whole_plan: bool = False, **kwargs: Any) -> dict:
    """`params.model_dump(**kwargs)` without plumbing, without later params at their neutral
    defaults and (unless `whole_plan`: the parent run logs every param) without the params of
    schedules the row does not use: what a row's fingerprints hash."""
    dump = params.model_dump(**kwargs)
    for group, names in (*PLUMBING.items(), *NOT_IN_ROWS.items()):
        for name in names:
            dump.get(group, {}).pop(name, None)
    diffusion = dump.get("diffusion", {})
    for name, schedule in SCHEDULE_ONLY.items():
        if not whole_plan and diffusion.get("schedule") != schedule:
            diffusion.pop(name, None)
    for (group, name), neutral in NEUTRAL_DEFAULTS.items():
        if group in dump and name in dump[group] and dump[group][name] == neutral:
            del dump[group][name]
    return dump


def plan_fingerprint(base: Params) -> str:
    """Hash of the base params an ablation ran with: the parent MLflow run is reopened only when
    this (and the planned rows) are unchanged."""
    return digest(result_dump(base, whole_plan=True, exclude={"tune"}))


def row_params(base: Params, row: RowSpec, seed: int) -> Params:
    """`base` with the row's overrides, the shared budget, the training seed and the evaluation
    the ablation needs (the steps table and top-k curve only for `ablation.detail_rows`)."""
    ab = base.ablation
    overrides: dict[str, Any] = {
        "train.steps": ab.train_steps,
        "train.seed": seed,
        "evaluate.compare_init": False,
        "evaluate.conditional_sequences": 0,  # NOT_IN_ROWS
        "evaluate.compare_samplers": [],
        "evaluate.num_sequences": ab.num_sequences,
        "evaluate.num_samples": ab.num_samples,
        "evaluate.seeds": ab.bound_seeds,
        **row.overrides,
    }
    if row.name in ab.detail_rows and seed == ab.seeds[0]:
        overrides.update(
            {
                "evaluate.table_steps": ab.table_steps,
                "evaluate.table_sequences": ab.table_sequences,
                "evaluate.table_samples": ab.detail_samples,
                "evaluate.qd_top_k": ab.qd_top_k,
                "evaluate.qd_samples": ab.detail_samples,
            }
        )
    else:
        overrides.update({"evaluate.table_steps": [], "evaluate.qd_top_k": [], **UNREAD_TABLE_SIZES})
    return with_values(base, overrides)


def plan(base: Params, only: list[str] | None = None) -> list[RowRun]:
    """Every (row, seed) the ablation trains, in run order: all rows at the first seed (in
    `ablation.rows` order), then the repeated rows at the other seeds."""
    ab = base.ablation
    names = list(dict.fromkeys(ab.rows))
    if only:
        unknown = sorted(set(only) - set(ROWS))
        if unknown:
            raise ValueError(f"unknown ablation row(s) {unknown}; known: {sorted(ROWS)}")
        names = [n for n in names if n in only] + [n for n in only if n not in names]
    runs = [RowRun(ROWS[n], ab.seeds[0], row_params(base, ROWS[n], ab.seeds[0])) for n in names]
    for seed in ab.seeds[1:]:
        runs += [RowRun(ROWS[n], seed, row_params(base, ROWS[n], seed)) for n in names if n in ab.repeat_rows]
    return runs
