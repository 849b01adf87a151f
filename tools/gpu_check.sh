#!/usr/bin/env bash
# The GPU check: one call on a lent H100/H200 (an image with python3, torch+cu130, triton,
# nvcc, pybind11, cmake, ninja, pytest-benchmark; no internet). Run from anywhere:
#
#   OUT=/some/dir tools/gpu_check.sh              # the device tool sets $OUT
#   STEPS="tests-cuda split" tools/gpu_check.sh   # a recheck: only these steps after the build
#   BUDGET=240 tools/gpu_check.sh                 # seconds for the whole script (default 480)
#
# Steps, in the order they run (the issue's required evidence first: a run cut off by its
# budget loses the last ones): tests-cuda federation bench-kernels client-step
# tests-triton-cuda federation-graph cifar-round tests-client-cuda split tests-reference-cuda.
# An unknown name in STEPS stops the script before the build.
#
# 1. prerequisites (nvcc, Python.h of this python, torch sees a GPU, triton);
# 2. build with FEDMPQ_CUDA=1, so a build that did not find nvcc fails instead of quietly
#    falling back to the CPU; the native module must see the GPU;
# 3. tests-cuda: every kernel family's tests on the CUDA C++ backend (fake-quant, packing,
#    bit-plane training: tests/fedmpq_kernels/<family>/), FEDMPQ_TEST_BACKENDS making a
#    backend that cannot run fail instead of skip;
# 4. federation: `fedmpq simulate --device cuda --rounds 2` (eager), every client reporting;
# 5. bench-kernels: every kernel at 2^24 against device-to-device copy_, a fresh output
#    (clone) and its torch anchor, each checked against the reference first,
#    per call with a synchronization, 20 calls per synchronization, and 20 calls replayed
#    from one CUDA graph; ResNet-20's 20 layers' bit-plane step in one call;
# 6. client-step: the ResNet-20 client step on CUDA (float, fedmpq 2/4/8-bit, b32 and b128,
#    eager and replayed from a CUDA graph; float and 4-bit at b32 under torch.compile; float
#    and 4-bit channels-last, eager: whether memory_format auto should pick it on CUDA too);
# 7. tests-triton-cuda: the same kernel tests on the Triton backend;
# 8. federation-graph: the 2-round federation again with --cuda-graph true (never yet run on
#    a GPU: step 4 is the evidence that a plain CUDA federation works if capture does not);
# 9. cifar-round: one round of the paper's CIFAR-10 setting (ResNet-20, 10 clients, 5 local
#    epochs, b128) on a CIFAR-10-shaped stand-in (tools/synthetic_cifar.py), with
#    --cuda-graph true when step 8 passed (else eager), and from it 50 rounds' time (the
#    eager round took 68.8 s on 2026-12-04: docs/BENCHMARKS.md);
# 10. tests-client-cuda: the client's GPU tests (a round replayed from a CUDA graph uploads the
#    eager round's bytes; a federation on CUDA sends the CPU's payload layout; two rounds on
#    the cuda and triton-cuda backends are the reference backend's run, byte for byte);
# 11. split: where a 4-bit client step's time goes (b32 with a torch.profiler table of 5
#    steps, b128, b32 with the bit-plane family on Triton);
# 12. tests-reference-cuda: the pure-torch reference's tests on the GPU (passed on
#    2026-12-04: the least likely to find anything new).
#
# What comes back. The device tool returns at most 8 files from $OUT and the last 12,000
# characters of the output, so $OUT holds two files only, both rewritten after every step (a
# run killed at the call's limit still returns them): summary.md (the step table, failures,
# measurements, and a RESULT line: PASS, FAIL, or INCOMPLETE naming the step that was
# running) and logs.tar.gz (every step's log and the runs' results.json/rounds.csv; logs and
# run folders live in a work folder outside $OUT). The output ends with the step table and
# the RESULT line.
#
# Time. BUDGET (default 480 s, issue 17's 8 minutes) is the whole script's: each step's limit
# is cut to what is left, and a step with under 20 s left is not run ("not run (budget)").
# A step that runs out of time gets SIGINT (pytest then prints its counts and failures), then
# SIGKILL 15 s later. Expected on an H200 (2026-12-04 timings scaled by the suites' growth
# since): build 20-45 s, tests-cuda ~70, federation ~25, bench-kernels ~80, client-step ~85,
# tests-triton-cuda ~85, federation-graph ~30, cifar-round 50-90, tests-client-cuda ~45,
# split ~45, tests-reference-cuda ~55: about 615 s in all, so the default budget reaches
# about cifar-round and a second call (STEPS="tests-client-cuda split tests-reference-cuda",
# the Triton JIT's cache kept on a warm machine) does the rest. Run with timeout_s 600.
# Test steps run on 8 pytest-xdist workers where the image has xdist (Triton's JIT compiles
# in parallel). Exit status: 0 when every step that ran passed and none was cut by the budget.
set -euo pipefail
OUT=${OUT:-/tmp/fedmpq_gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # (offline: no version check)
PY=${PY:-python3}
T0=$(date +%s)
BUDGET=${BUDGET:-480}
[[ "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_check: BUDGET must be a number of seconds, got '$BUDGET'" >&2; exit 2; }
DEADLINE=$(( T0 + BUDGET ))
ALL_STEPS="tests-cuda federation bench-kernels client-step tests-triton-cuda federation-graph cifar-round tests-client-cuda split tests-reference-cuda"
for st in ${STEPS:-}; do
  [[ " $ALL_STEPS " == *" $st "* ]] || { echo "gpu_check: unknown step '$st' in STEPS (steps: $ALL_STEPS)" >&2; exit 2; }
done

# Logs and run folders: outside $OUT (only summary.md and logs.tar.gz go there).
W=$(mktemp -d "${TMPDIR:-/tmp}/fedmpq_gpu_check.XXXXXX")
HEAD="$W/head.md" ROWS="$W/rows.md" FAILS="$W/failures.md" DETAILS="$W/details.md"
: > "$HEAD"; : > "$ROWS"; : > "$FAILS"; : > "$DETAILS"
failed=""   # the steps that failed
cut=""      # the steps the budget left out
passed=""   # the steps that passed

say() { echo "$*" >> "$HEAD"; }
detail() { echo "$*" >> "$DETAILS"; }
table() {  # file, what to say when it is missing (nothing when STEPS left its step out)
  if [ -s "$1" ]; then cat "$1" >> "$DETAILS"; detail ""
  elif [ -z "${STEPS:-}" ]; then detail "($2)"; detail ""; fi
}
step_table() {
  echo "| step | result | tests | seconds |"
  echo "|---|---|---|---|"
  cat "$ROWS"
  if [ -s "$FAILS" ]; then echo; echo "Failures (first 15 lines of each failing step):"; echo; cat "$FAILS"; fi
}
# summary.md and logs.tar.gz, rewritten whole (through a temporary file: a kill mid-write
# leaves the previous version) after every step; $1 is the RESULT line's word(s).
finalize() {
  { cat "$HEAD"; echo; step_table; echo; cat "$DETAILS"; echo "RESULT: $1"; } > "$OUT/.summary.md.tmp"
  mv -f "$OUT/.summary.md.tmp" "$OUT/summary.md"
  tar -czf "$OUT/.logs.tar.gz.tmp" -C "$W" --exclude='*.pt' --exclude='*.png' . 2>/dev/null &&
    mv -f "$OUT/.logs.tar.gz.tmp" "$OUT/logs.tar.gz" || rm -f "$OUT/.logs.tar.gz.tmp"
}
result_word() {
  if [ -n "$failed" ]; then echo "FAIL (failed:$failed${cut:+; not run for the budget:$cut})"
  elif [ -n "$cut" ]; then echo "INCOMPLETE (passed:${passed:- none}; not run for the budget:$cut)"
  else echo "PASS"; fi
}
stop_prereq() {  # a failed prerequisite or build: the summary says why, and the script ends
  say "FAIL $1"
  finalize "FAIL ($1)"
  cat "$OUT/summary.md"
  exit 1
}

say "# fedmpq GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)${STEPS:+, steps: $STEPS}, budget ${BUDGET} s"
say ""
finalize "INCOMPLETE (running prerequisites)"

# ---- 1. prerequisites (fail fast) ---------------------------------------------------
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$W/gpu.txt" 2>&1 ||
  stop_prereq "prerequisites: nvidia-smi failed: $(head -c 300 "$W/gpu.txt")"
command -v nvcc >/dev/null || stop_prereq "prerequisites: nvcc not on PATH"
inc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>&1) ||
  stop_prereq "prerequisites: $PY cannot run: $inc"
[ -f "$inc/Python.h" ] || stop_prereq "prerequisites: $inc/Python.h missing (Python headers)"
$PY - > "$W/prereq.txt" 2>&1 <<'EOF' || stop_prereq "prerequisites: $(tail -n1 "$W/prereq.txt")"
import torch, triton, pybind11
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print(f"gpu      {torch.cuda.get_device_name(0)} (sm_{''.join(map(str, torch.cuda.get_device_capability(0)))}, {torch.cuda.device_count()} visible)")
print(f"torch    {torch.__version__} (CUDA {torch.version.cuda})")
print(f"triton   {triton.__version__}")
print(f"pybind11 {pybind11.__version__}")
EOF
say "- GPU: $(head -n1 "$W/gpu.txt")"
say "- nvcc: $(nvcc --version | tail -n1); Python.h: $inc"
sed 's/^/- /' "$W/prereq.txt" >> "$HEAD"

# ---- 2. build (fail fast) -------------------------------------------------------------
finalize "INCOMPLETE (running the build)"
cap=$($PY -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability(0))))" 2>&1) ||
  stop_prereq "prerequisites: compute capability: $cap"
export FEDMPQ_CUDA=1 FEDMPQ_CUDA_ARCHS=${FEDMPQ_CUDA_ARCHS:-$cap}
start=$(date +%s)
if ! timeout -k 15 120 $PY -m pip install -e . --no-build-isolation --no-deps -q > "$W/build.txt" 2>&1; then
  tail -30 "$W/build.txt"; stop_prereq "build (log: build.txt in logs.tar.gz)"
fi
say "- build: $(( $(date +%s) - start )) s for sm_$FEDMPQ_CUDA_ARCHS"
$PY -m fedmpq_kernels.info > "$W/info.txt" 2>&1 || stop_prereq "build: fedmpq_kernels.info (info.txt)"
cat "$W/info.txt"
$PY -c "
from fedmpq_kernels._native import native, native_error
assert native is not None, native_error
assert native.with_cuda, 'built without CUDA'
assert native.cuda_device_count() > 0, 'the module sees no GPU (driver older than the toolkit?)'
" > "$W/native.txt" 2>&1 || stop_prereq "build: the native module has no usable CUDA: $(tail -n1 "$W/native.txt")"

# ---- the steps ----------------------------------------------------------------------------
run_step() {  # name, limit (s), command...
  local name=$1 limit=$2; shift 2
  local log="$W/$name.txt" t0 rc counts left
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then
    echo "| $name | not run (STEPS) | | |" >> "$ROWS"
    return 0
  fi
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -lt 20 ]; then
    echo "| $name | not run (budget: ${left} s left) | | |" >> "$ROWS"
    cut="$cut $name"
    finalize "$(result_word)"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  finalize "INCOMPLETE (running $name, limit ${limit} s${failed:+; failed so far:$failed})"
  t0=$(date +%s)
  echo "== $name (limit ${limit} s)"
  set +e
  timeout -s INT -k 15 "$limit" "$@" > "$log" 2>&1
  rc=$?
  set -e
  counts=$(grep -Eo '[0-9]+ (passed|failed|error|errors|skipped|deselected)' "$log" | tail -n 5 | paste -sd, - || true)
  if [ "$rc" -eq 0 ]; then
    echo "| $name | pass | ${counts:-none} | $(( $(date +%s) - t0 )) |" >> "$ROWS"
    passed="$passed $name"
  else
    failed="$failed $name"
    { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && counts="timed out after ${limit} s; ${counts}"
    echo "| $name | **FAIL** (rc $rc) | ${counts:-see $name.txt} | $(( $(date +%s) - t0 )) |" >> "$ROWS"
    # whole lines (the test steps run with CI=true: pytest's short summary keeps the message)
    { echo "$name ($name.txt in logs.tar.gz):"; echo '```'
      { grep -E '^(FAILED|ERROR)' "$log" || tail -n 5 "$log"; } | head -n 15 | cut -c1-600
      [ -s "$log" ] || echo "(the step printed nothing)"
      echo '```'; echo; } >> "$FAILS"
  fi
  finalize "$(result_word)"
}
# pytest-xdist (in the device image) spreads each test step over 8 workers: Triton's JIT
# compiles, the slowest part on a fresh machine, then run in parallel.
par=()
$PY -c "import xdist" 2>/dev/null && par=(-n 8)
# CI=true: pytest then writes each failure's message whole in the short summary (cut to 80
# columns otherwise, as the first H200 recheck found) and does not shorten assertion diffs.
backend_tests() {  # backend, limit (s)
  run_step "tests-$1" "$2" env CI=true FEDMPQ_TEST_BACKENDS="$1" \
    $PY -m pytest tests/fedmpq_kernels -q -p no:cacheprovider -rfE "${par[@]}"
}
federation_detail() {  # run folder, what ran
  [ -s "$1/results.json" ] || return 0
  $PY - "$1/results.json" "$2" >> "$DETAILS" 2>&1 <<'EOF' || detail "($2: results.json unreadable)"
import json, sys
r = json.load(open(sys.argv[1]))
rounds = [x for x in r.get("rounds", []) if isinstance(x, dict)]
print(f"{sys.argv[2]}: accuracy per round {[x.get('accuracy') for x in rounds]}, "
      f"seconds per round {[round(x.get('seconds', 0.0), 2) for x in rounds]}")
print()
EOF
}

# 3. every kernel family on the CUDA C++ backend
backend_tests cuda 130

# 4. a federation on the GPU, eager (each run step first removes its own folder of an earlier
# call: fedmpq refuses to write over a run; a failing client is left out and the run exits 0,
# so the step fails unless every client reported)
run_step federation 60 sh -c "rm -rf $W/fed && $PY -m fedmpq simulate --device cuda --rounds 2 -q --out $W/fed && \
  $PY tools/every_client_reported.py $W/fed/results.json"
federation_detail "$W/fed" "federation on cuda (fedmpq simulate --device cuda --rounds 2)"

# 5. the kernels' GPU rows, compiled backends and anchors (the pure-torch reference is not timed)
run_step bench-kernels 120 $PY -m pytest benches/bench_fake_quant.py benches/bench_pack.py benches/bench_bitplane.py \
  --benchmark-only -q -p no:cacheprovider -k "cuda and not reference" \
  --fedmpq-sizes=16777216 --benchmark-max-time=0.1 --benchmark-min-rounds=5 \
  --benchmark-warmup=on --fedmpq-md "$W/bench_gpu.md"
table "$W/bench_gpu.md" "no kernel benchmark table: see bench-kernels.txt"

# 6. the client step (ResNet-20, b32 and b128) on the GPU: eager (also channels-last), replayed
# from a CUDA graph, and under torch.compile for float and fedmpq-4bit at b32 (each compile takes tens of
# seconds: the other compiled cases of benches/bench_client_step.py run outside this budget)
run_step client-step 120 $PY -m pytest benches/bench_client_step.py --benchmark-only -q -p no:cacheprovider \
  -k "cuda and (not compile or (b32 and (float- or 4bit)))" --fedmpq-md "$W/bench_client_step.md"
table "$W/bench_client_step.md" "no client-step table: see client-step.txt"

# 7. every kernel family on the Triton backend
backend_tests triton-cuda 130

# 8. the federation again, each client's step replayed from a CUDA graph
run_step federation-graph 60 sh -c "rm -rf $W/fed_graph && $PY -m fedmpq simulate --device cuda --cuda-graph true \
  --rounds 2 -q --out $W/fed_graph && $PY tools/every_client_reported.py $W/fed_graph/results.json"
federation_detail "$W/fed_graph" "federation on cuda (fedmpq simulate --device cuda --cuda-graph true --rounds 2)"

# 9. the paper's CIFAR-10 round on the GPU: ResNet-20, 10 clients, 5 local epochs at b128
# (configs/cifar10_fedmpq_a0.1.json) on a CIFAR-10-shaped stand-in (random pixels: the machine
# cannot fetch CIFAR; the same samples, so the same steps per round). One round: every client
# captures its own graph in every round, and the Triton kernels were compiled (and cached on
# disk) by the steps before, so a first round costs what a later one does. From a CUDA graph
# only if step 8 showed that capture works.
graph=false
[[ " $passed " == *" federation-graph "* ]] && graph=true
data="${TMPDIR:-/tmp}/fedmpq_cifar"  # 180 MB: not in the work folder, which is tarred
run_step cifar-round 120 sh -c "rm -rf $W/cifar && $PY tools/synthetic_cifar.py $data > /dev/null && \
  $PY -m fedmpq simulate --config configs/cifar10_fedmpq_a0.1.json --data-dir $data \
  --device cuda --cuda-graph $graph --rounds 1 -q --out $W/cifar && \
  $PY tools/every_client_reported.py $W/cifar/results.json"
if [ -s "$W/cifar/rounds.csv" ]; then
  $PY - "$W/cifar/rounds.csv" "$graph" >> "$DETAILS" 2>&1 <<'EOF' || detail "(cifar rounds.csv unreadable)"
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
sec = [float(r["seconds"]) for r in rows]
q = [float(r["quant_seconds"]) for r in rows]
print(f"ResNet-20 CIFAR-10-shaped round on cuda, --cuda-graph {sys.argv[2]} (configs/cifar10_fedmpq_a0.1.json, "
      f"10 clients x 5 local epochs, b128): seconds per round {[round(s, 1) for s in sec]}, quantization seconds "
      f"{[round(x, 2) for x in q]}; 50 rounds at that pace: {50 * sec[-1] / 60:.1f} min")
print()
EOF
fi

# 10. the client and the federation on CUDA, tested (graph replay against eager, byte for byte;
# the optimizer's batched coefficients against the CPU's; two rounds on the cuda and
# triton-cuda backends against the reference backend on the GPU, byte for byte)
run_step tests-client-cuda 90 env CI=true $PY -m pytest tests/fedmpq/test_client.py tests/fedmpq/test_simulate.py \
  tests/fedmpq/test_nn.py tests/fedmpq/test_backends.py -k "(cuda or gpu) and not emulated" -q -p no:cacheprovider -rfE

# 11. where a 4-bit client step's time goes on the GPU (b32 with a profile of 5 steps; b128;
# b32 with only the bit-plane family on Triton, against the CUDA C++ bit-plane kernels)
run_step split 70 sh -c "$PY benches/client_step_split.py --device cuda --batch 32 --reps 20 --profile 5 > $W/split.md && \
  $PY benches/client_step_split.py --device cuda --batch 128 --reps 20 >> $W/split.md && \
  printf '\n### batch 32, bit-plane family on Triton (FEDMPQ_BACKEND=bitplane=triton)\n\n' >> $W/split.md && \
  FEDMPQ_BACKEND=bitplane=triton $PY benches/client_step_split.py --device cuda --batch 32 --reps 20 >> $W/split.md"
table "$W/split.md" "no time split: see split.txt"

# 12. the pure-torch reference on the GPU: last, the least likely to find anything new
backend_tests reference-cuda 80

res=$(result_word)
finalize "$res"
echo
cat "$DETAILS"
echo "---- gpu_check: $(( $(date +%s) - T0 )) s (budget ${BUDGET} s); \$OUT: summary.md, logs.tar.gz"
step_table
echo "RESULT: $res"
[ "$res" = "PASS" ]
