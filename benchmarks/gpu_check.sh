#!/usr/bin/env bash
# Short bf16 training of a random bert-base-sized denoiser on every visible CUDA GPU; prints
# tokens/s and MFU. Needs only the torch installed on the machine and this repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
N=$($PY -c "import torch; print(torch.cuda.device_count())")
if [ "$N" -lt 1 ]; then echo "no CUDA GPU visible" >&2; exit 1; fi
if [ "$N" -eq 1 ]; then
  exec $PY benchmarks/gpu_check.py "$@"
fi
exec $PY -m torch.distributed.run --standalone --nproc_per_node "$N" benchmarks/gpu_check.py "$@"
