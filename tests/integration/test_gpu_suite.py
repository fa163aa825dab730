"""benchmarks/gpu_suite.sh in its small mode: every part of the GPU run (data, device tests, the
pipeline's training eager and compiled, bound, sampling, the plain-torch check, the merge) end to
end on the CPU with tiny shapes, so that a run on a lent GPU cannot fail on a typo."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT_ROOT, clean_env, lm1b_dir

PARTS = {"data", "device_tests", "train_eager", "bound", "sampling", "train_compiled", "gpu_check"}
TRAIN_NUMBERS = ("tokens_per_s", "mfu", "peak_tflops", "mflop_per_token", "real_tokens_per_step", "last_loss")
SAMPLING_NUMBERS = ("seconds", "samples_per_s", "model_seconds", "total_over_forward")


def finite(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.integration
@pytest.mark.slow
def test_the_small_suite_runs_every_part_and_writes_finite_results(tmp_path, lm1b_dir, clean_env):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DBERT_LM1B_DIR": str(lm1b_dir)}
    for key in ("ROOT", "SMALL", "DBERT_TEST_DEVICE", "PIPELINE_ARGS", "SUITE_BUDGET_S", "SITE_BUNDLE"):
        env.pop(key, None)
    done = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", "--small"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())

    assert set(results["parts"]) == PARTS
    assert all(part["exit"] == 0 for part in results["parts"].values()), results["parts"]
    assert results["device_tests"]["passed"] >= 1 and results["device_tests"]["failures"] == 0
    for run, compiled in (("eager", False), ("compiled", True)):
        train = results["train"][run]
        assert train["compile"] is compiled and train["steps"] == 3
        assert train["layout"] == {"tokens_per_batch": 512, "row_length": 64}
        assert all(finite(train[key]) and train[key] > 0 for key in TRAIN_NUMBERS), train
    assert finite(results["train"]["compiled_over_eager_tokens_per_s"])
    for precision in ("fp32", "bf16"):
        bound = results["bound"][precision]
        assert finite(bound["nats_per_token"]) and finite(bound["sequences_per_s"]) and bound["sequences_per_s"] > 0
        for model in ("default_model", "base_shape"):
            row = results["sampling"][model][precision]
            assert all(finite(row[key]) and row[key] > 0 for key in SAMPLING_NUMBERS), row
            assert row["total_over_forward"] >= 1.0
    assert finite(results["bound"]["bf16_vs_fp32_relative"])
    assert all(finite(results["gpu_check"][key]) for key in ("tokens_per_s", "mfu", "bf16_peak_tflops"))
    assert not (out / "pipeline" / "model").exists()  # the export is not left in $OUT
