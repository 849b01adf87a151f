"""The CPU kernels' own thread pool (csrc/cpu/thread_pool.h), through the public API:
results that do not depend on the thread count, several Python threads in kernels at once,
a forked child that runs threaded kernels, and interpreter exit with a kernel running.

Sizes on both sides of the grain: below two grains a kernel stays on the calling thread,
above it the pool takes part (where the machine has two cores or more)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry
from fedmpq_kernels._checks import bitmap_nbytes
from fedmpq_kernels._native import native

pytestmark = pytest.mark.skipif(native is None or not registry.available("cpu")[0],
                                reason="the native CPU kernels are not built")

GRAIN = native.threading()["grain"] if native is not None else 1 << 15
SIZES = [1000, GRAIN + 5, 3 * GRAIN + 77, 9 * GRAIN + 3]  # one thread, one thread, pool, pool
BITS = 5


@contextlib.contextmanager
def num_threads(n: int):
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


needs_the_pool = pytest.mark.skipif(native is not None and native.threading()["max_threads"] < 2,
                                    reason="one core: no call uses the pool")


def posts_a_job(call) -> bool:
    """Whether ``call()`` handed work to the pool (its job count grew)."""
    jobs = native.threading()["jobs"]
    call()
    return native.threading()["jobs"] > jobs


def run_ops(n: int, seed: int, force: bool = True) -> dict:
    """Every CPU kernel family once on n elements: outputs, gradients (the float sums of the
    scale gradients are the reductions a thread split could reorder) and a bit-plane step.
    force: under use_backend("cpu") (False: the caller forced it, around its threads:
    use_backend changes one process-wide choice, which threads entering and leaving it at
    once would restore out of order)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    gy = torch.randn(n, generator=g)
    out = {}
    with registry.use_backend("cpu") if force else contextlib.nullcontext():
        out["fake_quant"] = fk.fake_quant(x, 4)
        xs, s = x.clone().requires_grad_(True), torch.tensor(2.0, requires_grad=True)
        fk.fake_quant(xs, 3, s, ste="clipped").backward(gy)
        out["fake_quant dx"], out["fake_quant dS"] = xs.grad, s.grad
        out["relu6_fake_quant"] = fk.relu6_fake_quant(x, 4)
        codes, sign, scale = fk.binarize(x, BITS)
        out.update({"codes": codes, "sign": sign, "scale": scale})
        planes = fk.pack_codes(codes, BITS)
        out["planes"] = planes
        out["unpacked"] = fk.unpack_codes(planes, BITS, n)
        acc = gy.clone()
        out["dequant_accumulate"] = fk.dequant_accumulate(acc, planes, sign, BITS, float(scale), 0.5)
        out["plane_popcounts"] = fk.plane_popcounts(codes, BITS)
        sc = scale.clone().requires_grad_(True)
        w = fk.dequantize(codes, sign, sc, BITS, fk.sink_like((n,)))
        w.backward(gy)
        out["dequantize"], out["dequantize ds"] = w.detach(), sc.grad
        c2, s2 = codes.clone(), sign.clone()
        mom, gs = torch.zeros((BITS, n), dtype=torch.uint8), torch.zeros(1)
        coef = torch.full((BITS,), 1e-4)
        g_s = fk.bitplane_step(c2, s2, mom, gs, gy, coef, scale, BITS, 0.5, 0.9, fk.step_key(seed, 0, 0))
        out.update({"step g_s": g_s, "step codes": c2, "step sign": s2, "step mom": mom, "step gs": gs})
    return out


def bits_of(t: torch.Tensor) -> bytes:
    # numpy, not torch: no torch op (torch's OpenMP cannot run in a forked child, see below)
    return t.detach().contiguous().reshape(-1).numpy().tobytes()


def mismatches(got: dict, want: dict) -> list:
    return [k for k in want if bits_of(got[k]) != bits_of(want[k])]


@pytest.mark.parametrize("n", SIZES)
def test_thread_count_does_not_change_results(n):
    """Fixed tasks and task-ordered reductions: 1, 2 and 3 threads give the same bits
    (the scale gradients are float sums, where a per-thread split used to show)."""
    with num_threads(1):
        want = run_ops(n, seed=n)
    for nt in (2, 3):
        with num_threads(nt):
            assert mismatches(run_ops(n, seed=n), want) == [], f"{nt} threads"


def test_many_python_threads_at_once():
    """Six Python threads in kernels at the same time (the GIL is released in them), each over
    every size in its own order: the pool serves one at a time, the others run on their own
    thread, and every result equals the one-thread result."""
    cases = [(n, seed) for n in SIZES for seed in (1, 2)]
    with num_threads(1):
        want = {c: run_ops(*c) for c in cases}
    jobs_before, busy_before = native.threading()["jobs"], native.threading()["busy_serial"]
    errors = []
    start = threading.Barrier(6)

    def worker(k: int):
        try:
            start.wait()
            for rep in range(2):
                for c in cases[k % len(cases):] + cases[:k % len(cases)]:
                    bad = mismatches(run_ops(*c, force=False), want[c])
                    if bad:
                        errors.append(f"thread {k} case {c}: {bad}")
        except Exception as e:  # reported below, not lost in the thread
            errors.append(f"thread {k}: {type(e).__name__}: {e}")

    with num_threads(2), registry.use_backend("cpu"):
        threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a kernel call did not return (deadlock?)"
    assert errors == []
    if native.threading()["max_threads"] >= 2:
        assert native.threading()["jobs"] > jobs_before, "the pool never ran a job"
        # Six threads over hundreds of pool-sized calls overlap: some call found the pool busy
        # and ran alone (with no such rule, two callers would share one job slot).
        assert native.threading()["busy_serial"] > busy_before, "no call ever found the pool busy"


def _wait_or_kill(pid: int, timeout: float) -> int | None:
    """The child's exit status, or None (the child killed) when it did not end in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_forked_child_runs_threaded_kernels():
    """fork() while another thread is inside a kernel (so the parent's pool may be busy) and
    after the pool's workers started: the child, where those workers do not exist, still runs
    threaded kernels (a fresh pool), with the same results.

    The child calls no torch op that torch itself would run on several threads: torch's own
    OpenMP pool deadlocks in a child forked after the parent used it (torch 2.13, libgomp),
    whatever this project does; the comparisons go through numpy."""
    n = 9 * GRAIN + 3
    x = torch.randn(n, generator=torch.Generator().manual_seed(7))
    with num_threads(2):
        want_y = bits_of(fk.fake_quant(x, 4))
        codes, sign, _ = fk.binarize(x, BITS)
        want_planes = bits_of(fk.pack_codes(codes, BITS))
        stop = threading.Event()

        def busy():
            while not stop.is_set():
                fk.fake_quant(x, 3)

        bg = threading.Thread(target=busy, daemon=True)
        bg.start()
        time.sleep(0.05)
        r, w = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: report through the pipe, never return into pytest
            msg = b"?"
            try:
                jobs = native.threading()["jobs"]
                ok = bits_of(fk.fake_quant(x, 4)) == want_y and bits_of(fk.pack_codes(codes, BITS)) == want_planes
                t = native.threading()
                used = t["max_threads"] < 2 or (t["jobs"] > jobs and t["workers"] >= 1)
                msg = b"ok" if ok and used else f"results equal: {ok}; pool: {t}".encode()
            except BaseException as e:  # noqa: BLE001 -- anything, reported to the parent
                msg = f"{type(e).__name__}: {e}".encode()
            finally:
                os.write(w, msg[:4000])
                os._exit(0)
        os.close(w)
        stop.set()
        bg.join(timeout=60)
        status = _wait_or_kill(pid, timeout=120)
        out = os.read(r, 4096)
        os.close(r)
    assert status is not None, "the forked child hung in a kernel (killed after 120 s)"
    assert out == b"ok", out.decode(errors="replace")


@pytest.mark.skipif("libasan" in os.environ.get("LD_PRELOAD", ""),
                    reason="sanitizer build: UBSan flags pybind11's own catch of the thread-exit unwind "
                           "(abi::__forced_unwind binds a reference to no object); tested in the normal build")
def test_interpreter_exit_with_a_kernel_running():
    """Exit while a daemon thread is inside threaded kernels: the pool is never torn down,
    and the bindings let CPython end that thread when it asks for the GIL back (with
    pybind11's gil_scoped_release this aborted: exit status 134). The loop calls the native
    module directly: torch's own ops (torch.empty in every adapter) have the same abort at
    exit on CPython < 3.14, which no code here can change."""
    n = 9 * GRAIN + 3
    code = (
        "import threading, time, torch\n"
        "from fedmpq_kernels._native import native\n"
        f"n = {n}\n"
        "x = torch.randn(n); y = torch.empty_like(x)\n"
        "codes = torch.randint(0, 32, (n,), dtype=torch.uint8)\n"
        "planes = torch.empty(5 * 4 * ((n + 31) // 32), dtype=torch.uint8)\n"
        "def loop():\n"
        "    while True:\n"
        "        native.cpu.fake_quant(x.data_ptr(), n, y.data_ptr(), n, 4, 0.0, True, 0, 0, 0, 0, 2)\n"
        "        native.cpu.pack_codes(codes.data_ptr(), n, 5, planes.data_ptr(), planes.numel(), 2)\n"
        "for _ in range(2):\n"
        "    threading.Thread(target=loop, daemon=True).start()\n"
        "time.sleep(0.3)\n"
        "print('exiting', flush=True)\n"
    )
    for _ in range(3):  # the exit lands at a different point of the loop each time
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and r.stdout.strip() == "exiting", (r.returncode, r.stderr[-2000:])


@pytest.mark.parametrize("env, want", [("250", "blocking after a 250 us spin"),
                                       ("5000000", "blocking after a 1000 us spin"),
                                       ("-7", "blocking")])
def test_the_worker_spin_comes_from_the_environment_and_is_bounded(env, want):
    """FEDMPQ_POOL_SPIN_US sets an idle worker's spin, clamped to 0..1000 us (never an
    open-ended spin), as reported before the pool exists and after a threaded call (in a
    subprocess: the pool reads it once)."""
    n = 9 * GRAIN + 3
    code = (
        "import torch\n"
        "from fedmpq_kernels._native import native\n"
        "before = native.threading()['wait']\n"
        f"x = torch.randn({n}); y = torch.empty_like(x)\n"
        f"native.cpu.fake_quant(x.data_ptr(), {n}, y.data_ptr(), {n}, 4, 0.0, True, 0, 0, 0, 0, 2)\n"
        "print(before); print(native.threading()['wait'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, FEDMPQ_POOL_SPIN_US=env))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [want, want]


@needs_the_pool
def test_a_call_of_one_task_stays_on_the_calling_thread():
    """Never more threads than tasks: one layer of one 64K-element chunk (two grains, so two
    threads are allowed) runs on the caller and posts no job; two such layers use the pool."""
    n = 1 << 16
    codes = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(3), dtype=torch.int32).to(torch.uint8)
    layer = torch.cat([fk.pack_codes(codes, 3), fk.pack_codes(codes & 1, 1)])
    coefs = torch.tensor([0.5, 0.25])
    with num_threads(2), registry.use_backend("cpu"):
        for rows, pooled in (([[0, n, 3, 0]], False), ([[0, n, 3, 0], [n, n, 3, layer.numel()]], True)):
            payload = torch.cat([layer] * len(rows))
            acc = torch.zeros(len(rows) * n)
            table, cf = torch.tensor(rows), coefs[:len(rows)]
            assert posts_a_job(lambda: fk.dequant_accumulate_layers(acc, payload, table, cf)) == pooled, rows


@needs_the_pool
def test_a_call_below_two_grains_stays_on_the_calling_thread():
    """A thread takes at least a grain of work (threads_for): 2 * GRAIN - 1 elements are two
    tasks but one thread's worth, so two allowed threads still run on the caller and post no
    job; 2 * GRAIN elements use the pool. Each op: fake_quant (its absmax, then the forward),
    relu6_fake_quant and pack_codes."""
    def ops(n):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
        codes = torch.randint(0, 8, (n,), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(torch.uint8)
        return [lambda: fk.fake_quant(x, 4), lambda: fk.relu6_fake_quant(x, 4), lambda: fk.pack_codes(codes, 3)]

    with num_threads(2), registry.use_backend("cpu"):
        for n, pooled in ((2 * GRAIN - 1, False), (2 * GRAIN, True)):
            for k, op in enumerate(ops(n)):
                assert posts_a_job(op) == pooled, (n, k)


def test_a_call_of_at_most_a_grain_does_not_ask_torch_for_its_thread_count(monkeypatch):
    """fake_quant's CPU adapters hand 1 thread to a call of at most GRAIN elements (the
    kernels run it on the calling thread whatever the count) without asking torch, and
    torch's count to a larger one; the results are the reference's either way."""
    from fedmpq_kernels.fake_quant import reference as R

    asked = []
    real = torch.get_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: asked.append(1) or real())
    with registry.use_backend("cpu"):
        for n, asks in ((1, 0), (GRAIN, 0), (GRAIN + 1, 1)):
            x = (torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3).requires_grad_()
            s = torch.tensor(2.0, requires_grad=True)
            g = torch.randn(n, generator=torch.Generator().manual_seed(n + 1))
            for op in (lambda: fk.fake_quant(x, 4, s, ste="clipped"), lambda: fk.relu6_fake_quant(x, 4)):
                del asked[:]
                y = op()
                assert len(asked) == asks, n
                y.backward(g)
                assert len(asked) == 2 * asks, n
        xr, sr = x.detach().clone().requires_grad_(), s.detach().clone().requires_grad_()
        y = fk.fake_quant(x, 4, s, ste="clipped")
        x.grad = s.grad = None
        y.backward(g)
        R.fake_quant_autograd(xr, 4, sr, "clipped").backward(g)
        assert torch.equal(y, R.fake_quant_autograd(xr, 4, sr, "clipped")) and torch.equal(x.grad, xr.grad)
        torch.testing.assert_close(s.grad, sr.grad, rtol=1e-5, atol=1e-5 * g.abs().sum().item() ** 0.5)  # summation order


@needs_the_pool
def test_the_scale_gradients_add_task_partials_in_task_order():
    """The float64 partials of the pool's tasks are added in task order, as one thread adds
    them. Three tasks whose partials are 2^53, 1 and -2^53: in order, 2^53 + 1 rounds to 2^53
    (ties to even) and the sum is 0; backwards it would be 1. Both scale gradients, dL/ds of
    dequantize and dL/dS of fake_quant (its clipped-high elements add dL/dy each)."""
    n = 3 * GRAIN
    gy = torch.zeros(n)
    gy[0], gy[GRAIN], gy[2 * GRAIN] = 2.0 ** 53, 1.0, -2.0 ** 53
    codes = torch.ones(n, dtype=torch.uint8)
    sign = torch.zeros(bitmap_nbytes(n), dtype=torch.uint8)  # all positive
    x = torch.zeros(n)
    x[0] = x[GRAIN] = x[2 * GRAIN] = 10.0  # above S = 2: clipped high
    for nt in (1, 2):
        with num_threads(nt), registry.use_backend("cpu"):
            s = torch.tensor(1.0, requires_grad=True)
            fk.dequantize(codes, sign, s, 1, fk.sink_like((n,))).backward(gy)  # 1 bit: dL/ds = sum of dL/dW
            big_s = torch.tensor(2.0, requires_grad=True)
            fk.fake_quant(x, 3, big_s, ste="clipped").backward(gy)
        assert (s.grad.item(), big_s.grad.item()) == (0.0, 0.0), f"{nt} threads"


def test_a_bitplane_call_of_at_most_a_grain_does_not_ask_torch_for_its_thread_count(monkeypatch):
    """The bit-plane CPU adapters hand 1 thread to a call of at most GRAIN elements (GRAIN
    element-planes for a step, whose thread count comes from n * bits) without asking torch,
    and torch's count to a larger one; the results are the same either way."""
    asked = []
    real = torch.get_num_threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: asked.append(1) or real())
    bits = 4
    with registry.use_backend("cpu"):
        for n, asks in ((1, 0), (GRAIN // bits, 0), (GRAIN // bits + 1, 1), (GRAIN + 1, 1)):
            gen = torch.Generator().manual_seed(n)
            w = torch.randn(n, generator=gen)
            del asked[:]
            codes, sign, scale = fk.binarize(w, bits)
            assert len(asked) == (n > GRAIN), n
            sc, sink = scale.clone().requires_grad_(), fk.sink_like((n,)).requires_grad_()
            del asked[:]
            fk.dequantize(codes, sign, sc, bits, sink).backward(torch.randn(n, generator=gen))
            assert len(asked) == 2 * (n > GRAIN), n
            del asked[:]
            fk.plane_popcounts(codes, bits)
            assert len(asked) == (n > GRAIN), n
            state = [codes.clone(), sign.clone(), torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1)]
            g, coef = torch.randn(n, generator=gen), torch.full((bits,), 1e-3)
            del asked[:]
            got = fk.bitplane_step(*state, g, coef, scale, bits, 0.1, 0.9, 7)
            assert len(asked) == asks, n
            want = [codes.clone(), sign.clone(), torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1)]
            with registry.use_backend("reference"):
                ref = fk.bitplane_step(*want, g, coef, scale, bits, 0.1, 0.9, 7)
            assert torch.equal(got, ref) and all(torch.equal(a, b) for a, b in zip(state, want)), n
