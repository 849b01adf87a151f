#!/usr/bin/env bash
# The GPU check: one call on a lent H100/H200 (an image with python3, torch+cu130, triton,
# nvcc, pybind11, cmake, ninja, pytest-benchmark; no internet). Run from anywhere:
#
#   OUT=/some/dir tools/gpu_check.sh        # the device tool sets $OUT
#   STEPS="tests-cuda split" tools/gpu_check.sh   # a recheck: only these steps after the build
#
# Steps (for STEPS): tests-cuda tests-triton-cuda tests-reference-cuda tests-client-cuda
# bench-kernels client-step split federation cifar-round. An unknown name stops the script
# before the build.
#
# 1. prerequisites (nvcc, Python.h of this python, torch sees a GPU, triton), printed;
# 2. build with FEDMPQ_CUDA=1, so a build that did not find nvcc fails instead of quietly
#    falling back to the CPU; the native module must see the GPU;
# 3. the tests of each GPU backend on their own (cuda, triton-cuda; reference-cuda last), without
#    -x, each under its own time limit (FEDMPQ_TEST_BACKENDS makes a backend that cannot run
#    fail instead of skip), so one failing backend does not hide the others: every family,
#    the bit-plane training kernels included (tests/fedmpq_kernels/<family>/); then the
#    client's GPU tests (a round replayed from a CUDA graph uploads the eager round's bytes;
#    a federation on CUDA sends the CPU's payload layout; two rounds on the cuda and
#    triton-cuda backends are the reference backend's run on the GPU, byte for byte);
# 4. the GPU benchmarks: every kernel (fake-quant, packing, bit-plane training) at 2^24
#    against device-to-device copy_ and the torch way, per call with a synchronization,
#    20 calls per synchronization, and 20 calls replayed from one CUDA graph; ResNet-20's 20
#    layers' bit-plane step in one call (launches over layer tables) against layer by layer;
#    the ResNet-20 client step on CUDA (eager, replayed from a CUDA graph as cuda_graph does, and float
#    and fedmpq-4bit at batch 32 under torch.compile) and its time split;
# 5. a 2-round federation on the GPU: fedmpq simulate --device cuda --cuda-graph true --rounds 2;
# 6. one round of the paper's CIFAR-10 setting (ResNet-20, 10 clients, 5 local epochs) on the
#    GPU with --cuda-graph true, on a CIFAR-10-shaped stand-in (tools/synthetic_cifar.py), and
#    from it 50 rounds' time (the eager round took 68.8 s on 2026-12-04: docs/BENCHMARKS.md);
# 7. the reference backend's tests on the GPU (reference-cuda), last: they passed on
#    2026-12-04, so a run cut off by the call's limit loses them first.
# The b32 time split ends with a torch.profiler table of 5 steps (launches, host time per op);
# a b32 split runs the bit-plane family on Triton (FEDMPQ_BACKEND=bitplane=triton), and a last one
# makes the weights per layer (--per-layer-weights) as before batch_weights.
# Steps 1-2 stop the script at the first failure; 3-7 always all run. It writes
# $OUT/summary.md (pass/fail per step with the test counts, then the benchmark tables: what
# docs/BENCHMARKS.md takes as is) and full logs beside it, and exits non-zero when any step
# failed. Each table also goes to $OUT/details.md as soon as its step ends, so a run cut off
# by the call's limit still brings back what it measured.
# Budget (issue 17 asks for 8 minutes; a call may take 10): on the H200 on 2026-12-04 the build
# took 19 s, the test steps 42 (cuda), 65 (triton-cuda) and 41 s (reference-cuda), the kernel
# benchmarks 51, the client step 58, the split 19 and the federation 20 s. Since then came the
# client's GPU tests, the graph benchmarks, one graphed CIFAR round (the eager round: 69 s) and
# the CUDA bit-plane kernels (in tests-cuda and bench-kernels), so about 7-8 minutes are
# expected. The limits (790 s, plus 90 s for the build) are
# ceilings, and the step least likely to find anything new comes last. Run with timeout_s
# 600: the summary is written step by step, so a cut-off run still returns what it did. Test steps run on 8
# pytest-xdist workers where the image has xdist (Triton's JIT compiles in parallel).
#
# Kernels covered, CUDA C++ and Triton: fake-quant forward (absmax, values, bitmaps) and
# backward with dL/dS reduced in the kernel's last block/program, every dtype, and
# relu6_fake_quant; packing (pack_codes with its deferred range check, unpack_codes,
# dequant_accumulate), every bit-width, aligned and sliced inputs, 2^23-element cases that
# take several grid-stride trips, device/stream rules, CUDA-graph capture; bit-plane
# training (binarize, dequantize and its backward, popcounts, the fused optimizer step, and
# on CUDA C++ their launches over layer tables: a model's weights and its step; the registry
# falls back per op where a backend has no kernel). Later families'
# tests (tests/fedmpq_kernels/<family>/) and benches (benches/bench_<family>.py) are picked up
# by the same steps.
set -euo pipefail
OUT=${OUT:-/tmp/fedmpq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # (offline: no version check)
PY=${PY:-python3}
SUMMARY="$OUT/summary.md"
failed=0
ALL_STEPS="tests-cuda tests-triton-cuda tests-reference-cuda tests-client-cuda bench-kernels client-step split federation cifar-round"
for st in ${STEPS:-}; do
  [[ " $ALL_STEPS " == *" $st "* ]] || { echo "gpu_check: unknown step '$st' in STEPS (steps: $ALL_STEPS)" >&2; exit 2; }
done

say() { echo "$*" >> "$SUMMARY"; }  # the summary is printed whole at the end
# The measurements, each written to $DETAILS as soon as its step ends (a run cut off by the
# call's limit keeps them there), and appended to the summary after the step table.
DETAILS="$OUT/details.md"
detail() { echo "$*" >> "$DETAILS"; }
table() {  # file, what to say when it is missing (nothing when STEPS left its step out)
  if [ -s "$1" ]; then cat "$1" >> "$DETAILS"; detail ""
  elif [ -z "${STEPS:-}" ]; then detail "($2)"; detail ""; fi
}
: > "$SUMMARY"
: > "$DETAILS"
say "# fedmpq GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)${STEPS:+, steps: $STEPS}"
say ""

# ---- 1. prerequisites (fail fast) ---------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 ||
  { say "FAIL prerequisites: nvidia-smi failed: $(head -c 300 "$OUT/gpu.txt")"; cat "$SUMMARY"; exit 1; }
command -v nvcc >/dev/null || { say "FAIL prerequisites: nvcc not on PATH"; cat "$SUMMARY"; exit 1; }
inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
[ -f "$inc/Python.h" ] || { say "FAIL prerequisites: $inc/Python.h missing (Python headers)"; cat "$SUMMARY"; exit 1; }
$PY - > "$OUT/prereq.txt" 2>&1 <<'EOF' || { say "FAIL prerequisites: $(tail -n1 "$OUT/prereq.txt")"; cat "$SUMMARY"; exit 1; }
import torch, triton, pybind11
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"gpu      {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}, {torch.cuda.device_count()} visible)")
print(f"torch    {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton   {triton.__version__}")
print(f"pybind11 {pybind11.__version__}")
EOF
say "- GPU: $(head -n1 "$OUT/gpu.txt")"
say "- nvcc: $(nvcc --version | tail -n1); Python.h: $inc"
sed 's/^/- /' "$OUT/prereq.txt" >> "$SUMMARY"

# ---- 2. build (fail fast) -------------------------------------------------------------
cap=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability(0))))")
export FEDMPQ_CUDA=1 FEDMPQ_CUDA_ARCHS=${FEDMPQ_CUDA_ARCHS:-$cap}
start=$(date +%s)
if ! timeout 90 $PY -m pip install -e . --no-build-isolation --no-deps -q > "$OUT/build.txt" 2>&1; then
  tail -30 "$OUT/build.txt"; say "FAIL build (log: build.txt)"; cat "$SUMMARY"; exit 1
fi
say "- build: $(( $(date +%s) - start )) s for sm_$FEDMPQ_CUDA_ARCHS"
$PY -m fedmpq_kernels.info > "$OUT/info.txt" 2>&1 || { say "FAIL build: fedmpq_kernels.info (info.txt)"; cat "$SUMMARY"; exit 1; }
cat "$OUT/info.txt"
$PY -c "
from fedmpq_kernels._native import native, native_error
assert native is not None, native_error
assert native.with_cuda, 'built without CUDA'
assert native.cuda_device_count() > 0, 'the module sees no GPU (driver older than the toolkit?)'
" || { say "FAIL build: the native module has no usable CUDA (info.txt)"; cat "$SUMMARY"; exit 1; }

# ---- 3. tests, one backend per step (all run) ----------------------------------------
say ""
say "| step | result | tests | seconds |"
say "|---|---|---|---|"
run_step() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  local log="$OUT/$name.txt" t0 rc counts
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    say "| $name | not run (STEPS) | | |"
    return 0
  fi
  t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  set +e
  timeout "$limit" "$@" > "$log" 2>&1
  rc=$?
  set -e
  counts=$(grep -Eo '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$log" | tail -n 5 | paste -sd, - || true)
  if [ "$rc" -eq 0 ]; then
    say "| $name | pass | ${counts:-none} | $(( $(date +%s) - t0 )) |"
  else
    failed=1
    [ "$rc" -eq 124 ] && counts="timed out after ${limit} s; ${counts}"
    say "| $name | **FAIL** (rc $rc) | ${counts:-see $name.txt} | $(( $(date +%s) - t0 )) |"
    # whole lines (the test steps run with CI=true: pytest's short summary keeps the message)
    grep -E '^(FAILED|ERROR)' "$log" | head -n 15 | cut -c1-600 | sed 's/^/    /' >> "$SUMMARY" || true
  fi
}
# pytest-xdist (in the device image) spreads each step over 8 workers: Triton's JIT
# compiles, the slowest part on a fresh machine, then run in parallel.
par=()
$PY -c "import xdist" 2>/dev/null && par=(-n 8)
# CI=true: pytest then writes each failure's message whole in the short summary (cut to 80
# columns otherwise, as the first H200 recheck found) and does not shorten assertion diffs.
backend_tests() {  # backend, limit (s)
  run_step "tests-$1" "$2" env CI=true FEDMPQ_TEST_BACKENDS="$1" \
    $PY -m pytest tests/fedmpq_kernels -q -p no:cacheprovider -rfE "${par[@]}"
}
backend_tests cuda 120  # 42 s on the H200 before the bit-plane family had CUDA kernels (a timeout loses the step's summary)
backend_tests triton-cuda 100
# the client and the federation on CUDA (graph replay against eager, byte for byte; the
# optimizer's batched coefficients against the CPU's; two rounds on the cuda and triton-cuda
# backends against the reference backend on the GPU, byte for byte)
run_step tests-client-cuda 90 env CI=true $PY -m pytest tests/fedmpq/test_client.py tests/fedmpq/test_simulate.py \
  tests/fedmpq/test_nn.py tests/fedmpq/test_backends.py -k "(cuda or gpu) and not emulated" -q -p no:cacheprovider -rfE

# ---- 4. benchmarks (GPU rows only) -------------------------------------------------------
# GPU rows of the compiled backends and the anchors (the pure-torch reference is not timed):
# every kernel at 2^24 elements (latency, throughput and CUDA-graph variants).
run_step bench-kernels 90 $PY -m pytest benches/bench_fake_quant.py benches/bench_pack.py benches/bench_bitplane.py \
  --benchmark-only -q -p no:cacheprovider -k "cuda and not reference" \
  --fedmpq-sizes=16777216 --benchmark-max-time=0.1 --benchmark-min-rounds=5 \
  --benchmark-warmup=on --fedmpq-md "$OUT/bench_gpu.md"
table "$OUT/bench_gpu.md" "no kernel benchmark table: see bench-kernels.txt"
# the client step (ResNet-20, batch 32 and 128) on the GPU: eager, replayed from a CUDA graph,
# and under torch.compile for float and fedmpq-4bit at batch 32 (each compile takes tens of
# seconds: the other compiled cases of benches/bench_client_step.py run outside this budget)
run_step client-step 110 $PY -m pytest benches/bench_client_step.py --benchmark-only -q -p no:cacheprovider \
  -k "cuda and (not compile or (b32 and (float- or 4bit)))" --fedmpq-md "$OUT/bench_client_step.md"
table "$OUT/bench_client_step.md" "no client-step table: see client-step.txt"
# where a 4-bit client step's time goes on the GPU
# (then the b32 split again with only the bit-plane family on Triton: the CUDA C++ bit-plane
# kernels, new since the last GPU run, against the Triton ones in the same run; and once more
# with one dequantize per layer, against the client's batch_weights, new since it too)
run_step split 60 sh -c "$PY benches/client_step_split.py --device cuda --batch 32 --reps 20 --profile 5 > $OUT/split.md && \
  $PY benches/client_step_split.py --device cuda --batch 128 --reps 20 >> $OUT/split.md && \
  printf '\n### batch 32, bit-plane family on Triton (FEDMPQ_BACKEND=bitplane=triton)\n\n' >> $OUT/split.md && \
  FEDMPQ_BACKEND=bitplane=triton $PY benches/client_step_split.py --device cuda --batch 32 --reps 20 >> $OUT/split.md && \
  printf '\n### batch 32, one dequantize per layer (--per-layer-weights; the client uses batch_weights)\n\n' >> $OUT/split.md && \
  $PY benches/client_step_split.py --device cuda --batch 32 --reps 20 --per-layer-weights >> $OUT/split.md"
table "$OUT/split.md" "no time split: see split.txt"

# ---- 5. a federation on the GPU ---------------------------------------------------------
# (each run step first removes its own folder of an earlier call: fedmpq refuses to write over a run)
# (a failing client is left out and the run exits 0: the step fails unless every client reported)
run_step federation 40 sh -c "rm -rf $OUT/fed && $PY -m fedmpq simulate --device cuda --cuda-graph true --rounds 2 -q --out $OUT/fed && \
  $PY tools/every_client_reported.py $OUT/fed/results.json"
if [ -s "$OUT/fed/results.json" ]; then
  $PY - "$OUT/fed/results.json" >> "$DETAILS" 2>&1 <<'EOF2' || detail "(results.json unreadable)"
import json, sys
r = json.load(open(sys.argv[1]))
rounds = r.get("rounds", [])
acc = [x.get("accuracy") for x in rounds if isinstance(x, dict)]
sec = [round(x.get("seconds", 0.0), 2) for x in rounds if isinstance(x, dict)]
print(f"federation on cuda (fedmpq simulate --device cuda --cuda-graph true --rounds 2): accuracy per round {acc}, seconds per round {sec}")
EOF2
fi

# ---- 6. the paper's CIFAR-10 round on the GPU -------------------------------------------
# ResNet-20, 10 clients, 5 local epochs at batch 128 (configs/cifar10_fedmpq_a0.1.json) on a
# CIFAR-10-shaped stand-in (random pixels: the machine cannot fetch CIFAR; the same samples,
# so the same steps per round). One round: every client captures its own graph in every
# round, and the Triton kernels were compiled (and cached on disk) by the steps before, so
# a first round costs what a later one does; a second would take a minute of the budget.
run_step cifar-round 120 sh -c "rm -rf $OUT/cifar && $PY tools/synthetic_cifar.py /tmp/fedmpq_cifar > /dev/null && \
  $PY -m fedmpq simulate --config configs/cifar10_fedmpq_a0.1.json --data-dir /tmp/fedmpq_cifar \
  --device cuda --cuda-graph true --rounds 1 -q --out $OUT/cifar && \
  $PY tools/every_client_reported.py $OUT/cifar/results.json"
if [ -s "$OUT/cifar/rounds.csv" ]; then
  $PY - "$OUT/cifar/rounds.csv" >> "$DETAILS" 2>&1 <<'EOF3' || detail "(cifar rounds.csv unreadable)"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
sec = [float(r["seconds"]) for r in rows]
q = [float(r["quant_seconds"]) for r in rows]
print(f"ResNet-20 CIFAR-10-shaped round on cuda with --cuda-graph true (configs/cifar10_fedmpq_a0.1.json, 10 clients x 5 local "
      f"epochs, b128): seconds per round {[round(s, 1) for s in sec]}, quantization seconds {[round(x, 2) for x in q]}; "
      f"50 rounds at that pace: {50 * sec[-1] / 60:.1f} min")
EOF3
fi

# ---- 7. the pure-torch reference on the GPU: last, as the least likely to find anything new
# (it passed on 2026-12-04), so a run cut off by the call's limit loses it first
backend_tests reference-cuda 60

say ""
cat "$DETAILS" >> "$SUMMARY"
if [ "$failed" -ne 0 ]; then say "RESULT: FAIL"; else say "RESULT: PASS"; fi
cat "$SUMMARY"
exit "$failed"
