"""What a training run's reports become: the history table (`outputs/train/history.csv`) and
the final metrics (`outputs/train/metrics.json`)."""

from __future__ import annotations

import math
from typing import Any

HISTORY_FIRST = (
    "step",
    "loss",
    "train_bound",
    "val_bound",
    "val_ppl",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "tokens_seen",
    "epoch",
)
HISTORY_SKIP = ("checkpoint_path",)  # machine-specific paths stay out of the plotted table


def history_table(history: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """(columns, rows): one row per report; scalar columns in a fixed order, empty where a row has
    no value."""
    keys = {
        k
        for row in history
        for k, v in row.items()
        if k not in HISTORY_SKIP and (v is None or isinstance(v, (int, float, str)))
    }
    columns = [k for k in HISTORY_FIRST if k in keys] + sorted(keys - set(HISTORY_FIRST))
    return columns, [[_cell(row.get(k)) for k in columns] for row in history]


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (list, tuple, dict)):
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ""
    return value


def final_metrics(history: list[dict[str, Any]], precision: str, run_name: str, run_id: str) -> dict[str, Any]:
    """The last report's training numbers and the last validation bound, with the run's identity."""
    last = history[-1] if history else {}
    evaluated = [row for row in history if row.get("val_bound") is not None]
    last_eval = evaluated[-1] if evaluated else {}
    val_bound = last_eval.get("val_bound")
    return {
        "step": int(last.get("step", 0)),
        "val_bound": val_bound,
        "val_ppl": last_eval.get("val_ppl", math.exp(min(val_bound, 50.0)) if val_bound is not None else None),
        "train_bound": last.get("train_bound"),
        "loss": last.get("loss"),
        "tokens_per_s": last.get("tokens_per_s"),
        "tokens_seen": last.get("tokens_seen"),
        "precision": precision,
        "run_name": run_name,
        "mlflow_run_id": run_id,
    }
