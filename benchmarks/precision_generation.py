"""Does the evaluation precision move a row's sample metrics? Re-runs the generation half of an
ablation row's evaluation (its exact params: 128 samples + 128 for Self-BLEU, 128 steps, top-k 30,
BLEU against the whole test split) under fp32 and bf16 autocast, for the rows named, and prints
BLEU-4, Self-BLEU and the samples' unigram entropy per (row, precision). The bound part runs on 16
test sentences and one seed only (its precision effect was measured separately, < 0.1%).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision_generation.py \\
        outputs/schedules/rows/dbert_linear_tad outputs/schedules_b/rows/dbert_spindle_tad

Each row folder must hold a finished row (models/final, data/). The params are the schedule
experiment's (`make -p` SCHEDULE_SET), read from the row's result.json overrides.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from pipeline.ablation.rows import plan
from pipeline.artifacts import Layout, read_json
from pipeline.config import load_params, with_values
from pipeline.eval.evaluate import evaluate_model

REPO = Path(__file__).resolve().parents[1]


def schedule_set() -> list[str]:
    """The --set items of the Makefile's SCHEDULE_SET, as make expands them."""
    dump = subprocess.run(["make", "-s", "-p", "-n", "schedules"], cwd=REPO, capture_output=True, text=True).stdout
    line = next(x for x in dump.splitlines() if x.startswith("SCHEDULE_SET :=") or x.startswith("SCHEDULE_SET ="))
    words = line.split("=", 1)[1].split()
    return [words[i + 1] for i, w in enumerate(words) if w == "--set"]


def main(rows: list[str]) -> None:
    base = load_params(REPO / "params.yaml", schedule_set())
    runs = {r.key: r for r in plan(base)}
    for folder in map(Path, rows):
        run = runs[folder.name]
        assert read_json(folder / "result.json")["fingerprint"] == run.fingerprint, f"{folder}: other params"
        for precision in ("fp32", "bf16"):
            params = with_values(
                run.params, {"evaluate.precision": precision, "evaluate.num_sequences": 16, "evaluate.seeds": [0]}
            )
            start = time.perf_counter()
            report = evaluate_model(params, Layout(folder), folder / "models/final")
            gen = report["generation"]
            line = {
                "row": folder.name,
                "precision": precision,
                "bleu": round(gen["bleu"], 4),
                "self_bleu": round(gen["self_bleu"], 4),
                "entropy_bits": round(gen["unigram_entropy_bits"], 3),
                "samples": len(report["samples"]),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
