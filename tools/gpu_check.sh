#!/usr/bin/env bash
# The GPU check: one call on a lent H100/H200, whose image has python3 with torch+cu130,
# triton, nvcc, pybind11, cmake, ninja and pytest-benchmark, and no internet. Builds for the
# card in hand, runs the CUDA and Triton tests and the GPU benchmarks, and leaves full logs
# in $OUT (the device tool returns that folder). About 5 minutes; run with timeout_s >= 480.
set -uo pipefail
OUT=${OUT:-/tmp/fedmpq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$OUT/gpu.txt"
export FEDMPQ_CUDA_ARCHS=${FEDMPQ_CUDA_ARCHS:-90}
{ time $PY -m pip install -e . --no-build-isolation --no-deps -q; } 2>&1 | tee "$OUT/build.txt"
$PY -m fedmpq_kernels.info 2>&1 | tee "$OUT/info.txt"
# Test ids carry the backend: reference-cuda, cuda, triton-cuda.
timeout 240 $PY -m pytest tests/fedmpq_kernels -q -x -k "cuda" -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -25
timeout 180 $PY -m pytest benches/ --benchmark-only -q -k "cuda" -p no:cacheprovider \
  --benchmark-min-rounds=20 --fedmpq-md "$OUT/bench_gpu.md" > "$OUT/bench_log.txt" 2>&1
cat "$OUT/bench_gpu.md" 2>/dev/null || tail -40 "$OUT/bench_log.txt"
