#!/usr/bin/env bash
# Every GPU check of the project in one run. Each part runs in its own process under its own
# timeout (and the suite's overall budget), and the suite keeps going when one fails:
#   device_tests    tests/unit/test_devices.py + tests/unit/test_host_sync.py with DBERT_TEST_DEVICE=cuda
#   train_eager     benchmarks/gpu_pipeline.py --part train: the pipeline's Ray Train driver, a random
#                   bert-base-shaped denoiser, batches of 16,384 real tokens in packed rows of 128
#                   (train.tokens_per_batch), eager; real tokens/s and MFU against a bf16 matmul peak
#                   measured in the same process; exports the model for the next two parts
#   bound           that model's bound, fp32 vs bf16: nats/token and sequences/s
#   sampling        the default model and that model, fp32 and bf16, 256 samples x 32 WordPieces x
#                   128 steps: samples/s and total / forward time
#   train_compiled  the same training with train.compile on (after bound and sampling: compiling
#                   takes the longest and is the likeliest to run out of time)
#   gpu_check       benchmarks/gpu_check.sh: the plain-torch bert-base step, the reference for MFU
# Logs (<part>.log, suite.log), parts.tsv (part, exit status, seconds) and results.json land in $OUT.
#
#   OUT=/tmp/gpu ROOT=PROJECT bash benchmarks/gpu_suite.sh           # a CUDA machine, <= 450 s of parts
#   SMALL=1 OUT=/tmp/gpu-small bash benchmarks/gpu_suite.sh          # or --small: the same steps on the
#                                                                   # CPU, tiny shapes, a few steps
#
# ROOT holds data/prepared and data/token_stats (`dbert prepare`, `dbert token-stats`); training
# runs and checkpoints land under it. Without ROOT the checkout is used when it has them (the
# small mode always builds its own); otherwise they are built into a temp dir from the LM1B sample
# at $DBERT_LM1B_DIR (default ../shared/data/lm1b; 200 sentences a split in the small mode) by the
# code of those two stages (gpu_pipeline.py --part data), which needs the whole stack, MLflow too.
#
# A machine without the Python stack can get it from a bundle: SITE_BUNDLE=<site.tar.xz> is
# unpacked to /tmp/site and put first on PYTHONPATH (`bash benchmarks/gpu_bundle.sh` builds one:
# Ray, pydantic and the default tokenizer, 29 MiB).
# Knobs: PYTHON (default .venv/bin/python when there, else python3), SUITE_BUDGET_S (seconds for
# all parts; 450 on a GPU), <PART>_TIMEOUT (DEVICE_TESTS_TIMEOUT, TRAIN_EAGER_TIMEOUT, ...),
# TOKENS_PER_BATCH (16384), PIPELINE_ARGS (more flags for every gpu_pipeline.py part).
# Exit status: 0 when every part exited 0.
set -u
cd "$(dirname "$0")/.."
SMALL=${SMALL:-0}
for arg in "$@"; do
  case $arg in
    --small) SMALL=1 ;;
    -h | --help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ "$SMALL" = 0 ] || SMALL=1
start=$(date +%s)  # the budget counts from here: unpacking a site bundle is GPU time too
OUT=${OUT:-/tmp/gpu-suite}
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
PY=$PYTHON
export PYTHON
mkdir -p "$OUT/pipeline"
OUT=$(cd "$OUT" && pwd)
: > "$OUT/parts.tsv"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MLFLOW_DISABLE_TELEMETRY=1 DVC_NO_ANALYTICS=1 \
  RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false DBERT_RAY_DASHBOARD=0 \
  PYTHONUNBUFFERED=1
if [ -n "${SITE_BUNDLE:-}" ]; then
  $PY -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall('/tmp/site', filter='data')" "$SITE_BUNDLE"
  export PYTHONPATH="/tmp/site${EXTRA_PYTHONPATH:+:$EXTRA_PYTHONPATH}"
fi

if [ "$SMALL" = 1 ]; then
  BUDGET=${SUITE_BUDGET_S:-1200} DEFAULT_TIMEOUT=300
  SMOKE=(--cpu-smoke)
  TRAIN_SIZES=(--steps 3)
else
  BUDGET=${SUITE_BUDGET_S:-450} DEFAULT_TIMEOUT=120
  SMOKE=()
  TRAIN_SIZES=(--tokens-per-batch "${TOKENS_PER_BATCH:-16384}" --row-length 128)
fi
# shellcheck disable=SC2206  # PIPELINE_ARGS is a list of flags
EXTRA=(${PIPELINE_ARGS:-})
PIPELINE=("$PY" benchmarks/gpu_pipeline.py "${SMOKE[@]}" --out "$OUT/pipeline")
failed=0

stamp() { echo "== $1 at +$(($(date +%s) - start))s" | tee -a "$OUT/suite.log"; }

# part NAME DEFAULT_LIMIT_S COMMAND...: run COMMAND under min(${NAME}_TIMEOUT or the default, the
# budget left) into $OUT/NAME.log; record NAME, exit status (or "skipped") and seconds in parts.tsv.
part() {
  local name=$1 limit=$2
  shift 2
  local var
  var="$(echo "$name" | tr '[:lower:]' '[:upper:]')_TIMEOUT"
  limit=${!var:-$limit}
  local left=$((BUDGET - ($(date +%s) - start)))
  if [ "$left" -lt 20 ]; then
    stamp "$name skipped: ${left}s of the budget left"
    echo "$name skipped 0" >> "$OUT/parts.tsv"
    failed=1
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  stamp "$name (limit ${limit}s)"
  local t0 rc
  t0=$(date +%s)
  timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name $rc $(($(date +%s) - t0))" >> "$OUT/parts.tsv"
  tail -n 12 "$OUT/$name.log" | tee -a "$OUT/suite.log"
  [ "$rc" = 0 ] || { failed=1; stamp "$name exited $rc"; }
}

stamp "environment (small=$SMALL, python $PY)"
{
  if [ "$SMALL" = 0 ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
  $PY -c "import torch, transformers, ray, pydantic; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'ray', ray.__version__, 'pydantic', pydantic.__version__)"
} 2>&1 | tee -a "$OUT/suite.log"

# The project data: ROOT, else the checkout's, else built here (the small mode always builds).
built=""
if [ -z "${ROOT:-}" ] && { [ "$SMALL" = 1 ] || [ ! -d data/prepared/train ] || [ ! -d data/token_stats ]; }; then
  built=$(mktemp -d "${TMPDIR:-/tmp}/gpu-suite-root.XXXXXX")
  ROOT=$built
  trap 'rm -rf "$built"' EXIT
  part data 300 "${PIPELINE[@]}" --part data --root "$ROOT"
fi
ROOT=${ROOT:-.}
ROOT=$(cd "$ROOT" && pwd)

if [ "$SMALL" = 1 ]; then  # the CUDA tests skip without CUDA: one host-sync case on the fake device instead
  part device_tests 150 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/pipeline/device_tests.xml" \
    tests/unit/test_host_sync.py -k "diffusion and none and token_budget"
else
  part device_tests 150 env DBERT_TEST_DEVICE=cuda "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$OUT/pipeline/device_tests.xml" tests/unit/test_devices.py tests/unit/test_host_sync.py
fi
part train_eager "$DEFAULT_TIMEOUT" "${PIPELINE[@]}" --part train --compile off --root "$ROOT" "${TRAIN_SIZES[@]}" "${EXTRA[@]}"
part bound 60 "${PIPELINE[@]}" --part bound --root "$ROOT" "${EXTRA[@]}"
part sampling 150 "${PIPELINE[@]}" --part sampling "${EXTRA[@]}"
part train_compiled 180 "${PIPELINE[@]}" --part train --compile on --root "$ROOT" "${TRAIN_SIZES[@]}" "${EXTRA[@]}"
if [ "$SMALL" = 1 ]; then
  part gpu_check 60 "$PY" benchmarks/gpu_check.py --device cpu --tiny --steps 4 --batch 4 --seq-len 32 \
    --json "$OUT/pipeline/gpu_check.json"
else
  part gpu_check 60 bash benchmarks/gpu_check.sh --json "$OUT/pipeline/gpu_check.json"
fi

stamp "results"
"${PIPELINE[@]}" --part merge --status "$OUT/parts.tsv" --results "$OUT/results.json" > "$OUT/merge.log" 2>&1 ||
  { failed=1; tail -n 20 "$OUT/merge.log"; }
rm -rf "$OUT/pipeline/model"  # the export (440 MB at bert-base shape); the numbers are in results.json
column -t "$OUT/parts.tsv" 2>/dev/null | tee -a "$OUT/suite.log" || cat "$OUT/parts.tsv"
stamp "done (exit $failed)"
exit "$failed"
