"""Benchmark plumbing: sizes, devices, warm-up, and the ratio table printed at the end.

Every benchmark stores ``extra_info`` with its group key (op, size, variant, device), its
implementation name and the bytes it must move at least (0 where bytes mean nothing: host
cost, a training step); ``torch_anchor`` names the group's "torch way" to compare with
(default ``torch_fq``: torch's own fake-quant) and ``floor`` its physical-floor row (default
``copy_``). At the end of the session the medians are turned into ratios against the rows
measured in the same run: the floor, ``clone`` (the same bytes into a fresh output, page
faults included: the floor of an op that allocates its output) where the group has it, and
the torch anchor; and the share of the floor's bandwidth each reaches (GB/s counted over the
bytes each must move). Printed, and with ``--fedmpq-md PATH`` written as a Markdown table
(docs/BENCHMARKS.md quotes it).
"""
from __future__ import annotations

import contextlib
import platform
import time
from typing import Iterator, Optional

import pytest
import torch

from fedmpq_kernels import registry

DEFAULT_SIZES = "1048576,4194304,16777216"


def pytest_addoption(parser):
    g = parser.getgroup("fedmpq")
    g.addoption("--fedmpq-sizes", default=DEFAULT_SIZES, help="comma-separated element counts (default 2^20,2^22,2^24)")
    g.addoption("--fedmpq-md", default=None, help="write the ratio table as Markdown to this path")


def pytest_generate_tests(metafunc):
    if "numel" in metafunc.fixturenames:
        sizes = [int(s) for s in metafunc.config.getoption("--fedmpq-sizes").split(",") if s]
        metafunc.parametrize("numel", sizes, ids=[_size_id(n) for n in sizes])


def _size_id(n: int) -> str:
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def randn(*shape: int, device: str) -> torch.Tensor:
    """Standard-normal float32 of ``shape`` drawn on the CPU (seeded by the caller's
    ``torch.manual_seed``) and moved to ``device``: the same inputs on every device, and none
    drawn from the CUDA generator, which a failed graph capture leaves unusable for the rest
    of the process ("Offset increment outside graph capture", first H200 run 2026-12-04)."""
    return torch.randn(*shape).to(device)


def torch_fq_dynamic(x: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """torch's fake-quant of ``x`` with fedmpq's dynamic scale, the way torch code would write
    it: ``max|x| / L`` as a tensor (torch's tensor-qparams form), levels -L..L (``signed``) or
    0..L, L = 2^bits - 1: fedmpq's grid. The scale is not differentiated (as fedmpq's)."""
    L = 2**bits - 1
    s = (x.detach().abs().amax() / L).reshape(1)
    zero = torch.zeros(1, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_tensor_affine(x, s, zero, -L if signed else 0, L)


def backend_of(impl: str) -> Optional[str]:
    """The registry backend of a candidate named ``fedmpq[<backend>]``; None for an anchor."""
    return impl[7:-1] if impl.startswith("fedmpq[") else None


def skip_unless_runs(impl: str, device: str, family: str, op: Optional[str] = None) -> None:
    """Skip a ``fedmpq[<backend>]`` candidate that cannot run op ``op`` of ``family`` (any of
    its ops when None) on ``device`` tensors here; anchors always run."""
    name = backend_of(impl)
    if name is None:
        return
    if not registry.supports(name, device) or (name == "triton" and device == "cpu"):
        pytest.skip(f"{name} does not run on {device} tensors")
    if not registry.has(family, name) or (op is not None and not hasattr(registry.module(family, name), op)):
        pytest.skip(f"{name} has no {op or family} kernel (the registry falls back to another backend)")
    ok, why = registry.available(name)
    if not ok:
        pytest.skip(f"{name} unavailable: {why}")


@contextlib.contextmanager
def selected(impl: str, device: str) -> Iterator[None]:
    """``impl``'s backend in force for every op family (the registry's defaults for an
    anchor), whatever ``FEDMPQ_BACKEND`` says: its per-family entries (``bitplane=triton``)
    win over ``use_backend(name)`` alone, so a ``fedmpq[cpu]`` row would time another
    backend. Checks (untimed) that every family having the backend resolves to it."""
    name = backend_of(impl)
    with contextlib.ExitStack() as stack:
        stack.enter_context(registry.use_backend(name))
        for family in registry.FAMILIES:
            has = name is not None and registry.has(family, name)
            stack.enter_context(registry.use_backend(name if has else None, family=family))
            if has and registry.supports(name, device):
                got = registry.backend_for(device, family)
                assert got == name, f"{impl} would run {family} on the {got!r} backend"
        yield


WARMUP_S = 0.05  # untimed calls per case before timing: until this many seconds have passed


def warm_up(run) -> None:
    """Call ``run`` untimed until WARMUP_S have passed: at least once (a case slower than
    that, a reference kernel at 2^24, pays one call), at most 1000 times. pytest-benchmark
    sizes its rounds from the first timed call and has no warm-up by default: a cold first
    call (torch's learnable fake-quant's first forward+backward in a process takes ~0.3 s,
    against ~35 us warm) left an anchor 5 rounds, all still warming up, and its ratio in the
    table reversed."""
    start = time.perf_counter()
    for _ in range(1000):
        run()
        if time.perf_counter() - start >= WARMUP_S:
            break


def run_timed(benchmark, impl: str, fn, device: str) -> None:
    """Time ``fn`` (then a device synchronization) with ``impl``'s backend selected once,
    outside the timed calls (selection is not free), after an untimed :func:`warm_up`."""
    def run():
        r = fn()
        sync(device)
        return r

    with selected(impl, device):
        if not getattr(benchmark, "disabled", False):  # --benchmark-disable: one call, a smoke test
            warm_up(run)
        benchmark(run)


CALLS = 20  # calls per timed sample in the throughput and CUDA-graph variants
VARIANTS = ["latency", "throughput", "graph"]


def variant_label(variant: str) -> str:
    """How a variant shows in the tables: ``latency`` (one call, then a synchronization:
    host cost and launch latency included), ``throughput`` (CALLS calls, one
    synchronization: launches overlap the kernels), ``graph`` (the CALLS calls captured in
    one CUDA graph, replayed, one synchronization: no host work per call)."""
    return {"latency": "", "throughput": f", {CALLS} calls/sync", "graph": f", graph of {CALLS}"}[variant]


def run_variant(benchmark, impl: str, fn, device: str, variant: str) -> None:
    """Time ``fn`` in ``variant`` (see :func:`variant_label`) with ``impl``'s backend selected.
    The throughput and graph variants are CUDA-only and time CALLS calls per sample (scale
    the group's bytes by CALLS); graph skips an anchor's or the reference's op that cannot be
    captured, with the reason, and fails a compiled backend's."""
    if variant == "latency":
        run_timed(benchmark, impl, fn, device)
        return
    if device != "cuda":
        pytest.skip(f"the {variant} variant is for CUDA")
    with selected(impl, device):
        def many():
            for _ in range(CALLS):
                fn()

        # Warm-up on a side stream (Triton's JIT, lazy workspaces, allocator pools), as
        # torch's CUDA-graph documentation asks before a capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            many()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if variant == "throughput":
            def run():
                many()
                torch.cuda.synchronize()
        else:
            graph = torch.cuda.CUDAGraph()
            prev = torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    many()
            except Exception as exc:  # a synchronizing or otherwise uncapturable op
                # (benches draw inputs with randn() above: the CUDA generator is broken now)
                torch.cuda.set_stream(prev)  # torch restores it only after a capture that ended well
                torch.cuda.synchronize()
                why = f"{impl} cannot be captured in a CUDA graph: {type(exc).__name__}: {exc}"
                if backend_of(impl) not in (None, "reference"):
                    pytest.fail(why)  # the compiled backends' ops are meant to be capturable
                pytest.skip(why)  # an anchor, or the pure-torch reference

            def run():
                graph.replay()
                torch.cuda.synchronize()
        benchmark(run)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()} threads{gpu}, torch {torch.__version__}"


def _rows(benchmarks):
    """Per group: each row's median against the group's floor (``extra_info["floor"]``, default
    ``copy_``: the same bytes through a preallocated output, or in place where the op works in
    place), against ``clone`` where the group has one (the same bytes into a fresh output, with
    its page faults: the floor of an op that allocates its output) and against the group's torch
    anchor (``extra_info["torch_anchor"]``, default ``torch_fq``)."""
    by_group = {}
    for b in benchmarks:
        info = b.extra_info
        if "group_key" not in info or b.stats is None:
            continue
        by_group.setdefault(info["group_key"], []).append((info["name"], info, b.stats.median))
    rows = []
    for key in sorted(by_group, key=lambda k: (k[0], k[3], k[1], k[2])):
        entries = by_group[key]
        floor_name = next((i["floor"] for n, i, t in entries if i.get("floor")), "copy_")
        floor = next(((i, t) for n, i, t in entries if n == floor_name), None)
        floor_t = floor[1] if floor else None
        floor_gbs = floor[0]["bytes"] / floor[1] / 1e9 if floor and floor[0]["bytes"] else None
        clone_t = next((t for n, i, t in entries if n == "clone"), None)
        anchor = next((i.get("torch_anchor") for n, i, t in entries if i.get("torch_anchor")), "torch_fq")
        torch_t = next((t for n, i, t in entries if n == anchor), None)
        for name, info, t in sorted(entries, key=lambda e: e[2]):
            gbs = info["bytes"] / t / 1e9 if info["bytes"] else None  # None: bytes mean nothing here
            rows.append(dict(
                op=key[0], size=_size_id(key[1]), scale=key[2], device=key[3], name=name,
                median_ms=t * 1e3, gbs=gbs,
                x_floor=(t / floor_t) if floor_t else None,
                pct_floor_bw=(100 * gbs / floor_gbs) if floor_gbs and gbs is not None else None,
                x_clone=(t / clone_t) if clone_t else None,
                speedup_vs_torch=(torch_t / t) if torch_t else None, anchor=name == anchor,
                floor=floor_name if floor else None,
            ))
    return rows


def _fmt(rows):
    head = ("| op | size | variant | device | implementation | median ms | GB/s | % of floor's GB/s | × floor "
            "| × clone | speed-up vs the torch anchor |")
    out = [head, "|" + "---|" * 11]

    def num(v, f):
        return f.format(v) if v is not None else "–"

    for r in rows:
        name = r["name"] + (" (anchor)" if r["anchor"] else "") + (" (floor)" if r["name"] == r["floor"] else "")
        out.append(f"| {r['op']} | {r['size']} | {r['scale']} | {r['device']} | {name} | {r['median_ms']:.4g} "
                   f"| {num(r['gbs'], '{:.1f}')} | {num(r['pct_floor_bw'], '{:.0f} %')} | {num(r['x_floor'], '{:.2f}')} "
                   f"| {num(r['x_clone'], '{:.2f}')} | {num(r['speedup_vs_torch'], '{:.2f}×')} |")
    return out


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or getattr(bs, "disabled", True) or not bs.benchmarks:
        return
    rows = _rows(bs.benchmarks)
    if not rows:
        return
    lines = [f"machine: {machine()}", ""] + _fmt(rows)
    terminalreporter.write_sep("=", "fedmpq ratios (medians, same run)")
    for line in lines:
        terminalreporter.write_line(line)
    path = config.getoption("--fedmpq-md")
    if path:
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
