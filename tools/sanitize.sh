#!/usr/bin/env bash
# The test suite under AddressSanitizer + UndefinedBehaviorSanitizer (CPU kernels).
#
#   tools/sanitize.sh [pytest args...]      e.g. tools/sanitize.sh -x -k "cpu"
#
# Copies the working tree (tracked and untracked, not ignored: no build/, no *.so) to a
# temporary directory, builds fedmpq_kernels._C there in place with FEDMPQ_SANITIZE=1
# FEDMPQ_CUDA=0 (setup.py build_ext --inplace: your own install and build are untouched),
# then runs `python -m pytest tests` from that copy, so the copy's fedmpq_kernels is the one
# imported. Exit status: pytest's (134 when a sanitizer fires, its report on stderr); 2 when
# the build or the set-up fails.
#
# Python is not built with ASan, so its runtime is preloaded, together with libstdc++:
# with libasan alone, ASan's __cxa_throw interceptor finds no real __cxa_throw (libstdc++ is
# not loaded yet when ASan starts) and every C++ throw -- the bindings' std::invalid_argument,
# which becomes ValueError -- aborts with "CHECK failed ... real___cxa_throw".
#
# Environment: PY (python, default "python"), CXX (must be the GCC that CMake builds with,
# default c++), FEDMPQ_SANITIZE_KEEP=1 keeps the copy (the reports' file:line point into it),
# ASAN_OPTIONS / UBSAN_OPTIONS (appended to, so they override the defaults below).
# The Triton-interpreter and reference backend cases are left out (-k "not triton-interpreter
# and not reference-cpu"): the interpreter is numpy and Python, the reference pure torch, and
# neither reaches the native module (the interpreter is a third of the plain suite's time, the
# reference cases 47 s of this run's 375). A -k of your own replaces that one (pytest keeps
# the last -k).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PY:-python}
CXX_BIN=${CXX:-c++}

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fedmpq-sanitize.XXXXXX")
cleanup() {
  if [[ "${FEDMPQ_SANITIZE_KEEP:-0}" == 1 ]]; then
    echo "sanitize: kept $WORK" >&2
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

# ---- copy the working tree ----
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked + untracked, minus ignored files (build/, *.so, caches) and minus tracked files
  # deleted in the working tree.
  (
    cd "$ROOT"
    git ls-files -co --exclude-standard -z |
      while IFS= read -r -d '' f; do [[ -e "$f" || -L "$f" ]] && printf '%s\0' "$f"; done |
      tar -cf - --null -T -
  ) | tar -xf - -C "$WORK"
else
  tar -C "$ROOT" --exclude=./build --exclude='*.so' --exclude=.git --exclude=__pycache__ \
    --exclude=.pytest_cache -cf - . | tar -xf - -C "$WORK"
fi

# ---- build tools: the installed ones; a missing pybind11 or cmake >= 3.24 is fetched into the
# copy only (never into the user's environment) ----
BUILD_PYTHONPATH=
need=()
"$PY" -c 'import pybind11' 2>/dev/null || need+=("pybind11>=2.12")
cmake_v=$(cmake --version 2>/dev/null | awk 'NR == 1 {print $3}') || cmake_v=
if [[ -z "$cmake_v" || "$(printf '%s\n' 3.24 "$cmake_v" | sort -V | head -1)" != 3.24 ]]; then
  need+=("cmake>=3.24")
fi
if ((${#need[@]})); then
  echo "sanitize: installing ${need[*]} into $WORK/.buildenv (build only)" >&2
  "$PY" -m pip install -q --disable-pip-version-check --target "$WORK/.buildenv" "${need[@]}"
  BUILD_PYTHONPATH="$WORK/.buildenv"
  export PATH="$WORK/.buildenv/bin:$PATH"
fi

# ---- sanitizer build, in place ----
cd "$WORK"
t0=$(date +%s)
if ! FEDMPQ_SANITIZE=1 FEDMPQ_CUDA=0 PYTHONPATH="$BUILD_PYTHONPATH" \
  "$PY" setup.py -q build_ext --inplace >"$WORK/build.log" 2>&1; then
  cat "$WORK/build.log" >&2
  echo "sanitize: build failed" >&2
  exit 2
fi
echo "sanitize: build $(($(date +%s) - t0)) s ($WORK)" >&2

# ---- run-time set-up ----
ASAN_LIB=$("$CXX_BIN" -print-file-name=libasan.so)
STDCXX_LIB=$("$CXX_BIN" -print-file-name=libstdc++.so)
for lib in "$ASAN_LIB" "$STDCXX_LIB"; do
  [[ "$lib" == /* && -e "$lib" ]] || { echo "sanitize: $CXX_BIN does not know $lib (GCC needed)" >&2; exit 2; }
done
export LD_PRELOAD="$ASAN_LIB $STDCXX_LIB${LD_PRELOAD:+ $LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# abort_on_error=1: SIGABRT, so pytest's faulthandler prints the Python stack (the test).
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
# The copy first on sys.path (also for the tests' subprocesses); the editable install's
# finder comes after the path finder, so it does not win.
export PYTHONPATH="$WORK${PYTHONPATH:+:$PYTHONPATH}"

mod=$("$PY" -c 'import fedmpq_kernels._C as m; print(m.__file__)')
echo "sanitize: fedmpq_kernels._C = $mod" >&2
case "$mod" in
  "$WORK"/*) ;;
  *) echo "sanitize: imported $mod, not the sanitized copy in $WORK" >&2; exit 2 ;;
esac

# --capture=sys: pytest's default fd capture would swallow a report written to fd 2 by a
# process the sanitizer then ends; with sys capture it reaches the terminal.
rc=0
# Flower's tests start Ray and Flower's own servers as subprocesses, which would inherit the
# preloaded sanitizer runtime; the native code they reach is tested by the rest of the suite.
# The CUDA emulator's tests (the adapter tests' and test_backends' federation on the emulated
# kernels too) and the Triton compile check run no code
# of the sanitized module (the emulator is a separate, uninstrumented library, and ASan does
# not follow its fibers' stacks; the compile check only compiles, in a subprocess that would
# inherit the runtime). Neither do the Triton interpreter's cases (no fedmpq_kernels/*/triton.py
# calls the native module), nor the tests on tests/fake_cuda's stand-in CUDA device (fake
# tensors, or the emulator's kernels, in subprocesses). The federation's command-level tests
# (test_cli, test_simulate, test_federation: runs stopped, resumed, refused) reach the native
# module only through whole runs, which test_backends (a federation on every backend) and
# the client's, server's and layers' tests take here; test_data and test_trainers reach none.
# They took 110 s of this run's 375 s of tests (2026-12-07, 2-core AMD EPYC).
"$PY" -m pytest tests -q -p no:cacheprovider --capture=sys -k "not triton-interpreter and not reference-cpu" \
  --ignore=tests/fedmpq/test_flower.py \
  --ignore=tests/fedmpq/test_cli.py --ignore=tests/fedmpq/test_simulate.py --ignore=tests/fedmpq/test_federation.py \
  --ignore=tests/fedmpq/test_data.py --ignore=tests/fedmpq/test_trainers.py \
  --ignore=tests/fedmpq_kernels/fake_quant/test_cuda_emulated.py --ignore=tests/fedmpq_kernels/pack/test_cuda_emulated.py \
  --ignore=tests/fedmpq_kernels/bitplane/test_cuda_emulated.py --ignore=tests/fedmpq_kernels/bitplane/test_cuda_adapter.py \
  --ignore=tests/fedmpq_kernels/bitplane/test_cuda_emulated_layers.py \
  --ignore=tests/fedmpq_kernels/fake_quant/test_cuda_adapter.py --ignore=tests/fedmpq_kernels/pack/test_cuda_adapter.py \
  --ignore=tests/fedmpq_kernels/test_cuda_emu.py --ignore=tests/fedmpq_kernels/test_triton_compiles.py \
  --ignore=tests/fedmpq/test_compile_on_cuda.py --ignore=tests/fedmpq/test_host_cuda.py \
  --deselect tests/fedmpq/test_backends.py::test_a_federation_through_the_emulated_cuda_kernels_is_the_reference_run \
  "$@" || rc=$?
exit "$rc"
