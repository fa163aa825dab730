#!/usr/bin/env bash
# Every GPU check the project asks for, in one run on a CUDA machine (each part keeps going when
# an earlier one fails; logs and results.json land in $OUT):
#   1. the library's device tests on CUDA (tests/test_devices.py with DBERT_TEST_DEVICE=cuda)
#   2. benchmarks/gpu_check.sh: bf16 training of a bert-base-sized denoiser, tokens/s and MFU
#   3. benchmarks/gpu_pipeline.py: the pipeline's Ray Train driver on a GPU worker, then the bound
#      (bf16 vs fp32) and sampling on the GPU
#
#   OUT=/tmp/gpu ROOT=<project with data/prepared + data/token_stats> bash benchmarks/gpu_suite.sh
#
# A machine without the Python stack can get it from a bundle: SITE_BUNDLE=<site.tar.xz> is
# unpacked to /tmp/site and put first on PYTHONPATH (see README "GPU").
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-suite}
ROOT=${ROOT:-.}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=1 \
  RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false DBERT_RAY_DASHBOARD=0 PYTHONUNBUFFERED=1
if [ -n "${SITE_BUNDLE:-}" ]; then
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site', filter='data')" "$SITE_BUNDLE"
  export PYTHONPATH="/tmp/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
fi
start=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - start ))s" | tee -a "$OUT/suite.log"; }

stamp "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c "import torch, transformers, ray, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ray', ray.__version__, 'pydantic', pydantic.__version__)"
} 2>&1 | tee -a "$OUT/suite.log"

stamp "device tests on cuda"
timeout "${TESTS_TIMEOUT:-180}" env DBERT_TEST_DEVICE=cuda $PY -m pytest -q -p no:cacheprovider tests/test_devices.py \
  2>&1 | tail -40 | tee "$OUT/device_tests.log"

stamp "gpu_check.sh"
timeout "${CHECK_TIMEOUT:-120}" bash benchmarks/gpu_check.sh 2>&1 | tail -20 | tee "$OUT/gpu_check.log"

stamp "pipeline on the gpu"
timeout "${PIPELINE_TIMEOUT:-300}" $PY benchmarks/gpu_pipeline.py --root "$ROOT" --out "$OUT/pipeline" \
  ${PIPELINE_ARGS:-} > "$OUT/gpu_pipeline.log" 2>&1
echo "exit $?" >> "$OUT/gpu_pipeline.log"
tail -60 "$OUT/gpu_pipeline.log"
cp "$OUT/pipeline/results.json" "$OUT/results.json" 2>/dev/null
rm -rf "$OUT/pipeline/model"
stamp "done"
