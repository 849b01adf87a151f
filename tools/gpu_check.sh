#!/usr/bin/env bash
# The GPU check, one call on a lent H100/H200 (torch+cu130, triton, pybind11, cmake, ninja
# and pytest-benchmark are there; no internet). Builds for the card in hand, runs the
# CUDA and Triton tests and the GPU benchmarks, and leaves the logs in $OUT. ~5 minutes.
set -uo pipefail
OUT=${OUT:-/tmp/fedmpq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
export FEDMPQ_CUDA_ARCHS=${FEDMPQ_CUDA_ARCHS:-90}
time pip install -e . --no-build-isolation -q 2>&1 | tail -5 | tee "$OUT/build.txt"
python -m fedmpq_kernels.info | tee "$OUT/info.txt"
# Test ids carry the backend: reference-cuda, cuda, triton-cuda.
timeout 240 python -m pytest tests/fedmpq_kernels -q -x -k "cuda" -p no:cacheprovider 2>&1 | tail -25 | tee "$OUT/tests.txt"
timeout 180 python -m pytest benches/ --benchmark-only -q -k "cuda" -p no:cacheprovider \
  --benchmark-min-rounds=20 --fedmpq-md "$OUT/bench_gpu.md" 2>&1 | tail -60 > "$OUT/bench_log.txt"
cat "$OUT/bench_gpu.md"
