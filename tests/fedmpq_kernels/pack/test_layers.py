"""dequant_accumulate_layers: many layers of one payload in one call, against one
dequant_accumulate per layer (itself checked against the reference); its table rules on
every backend; and the native binding fuzzed with hostile tables (always ValueError, never
an out-of-bounds access: tools/sanitize.sh runs this under ASan/UBSan)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fedmpq_kernels as fk
from fedmpq_kernels._native import native
from fedmpq_kernels.pack import reference as P

FUZZ = int(os.environ.get("FEDMPQ_FUZZ_EXAMPLES", "300"))


def make_payload(sizes, bits, device, seed=0):
    """A payload holding, per layer, its planes then its sign map (4-byte aligned, with a
    gap of 8 bytes between layers), and the table rows for it."""
    g = torch.Generator().manual_seed(seed)
    chunks, rows, data_off, acc_off = [torch.zeros(8, dtype=torch.uint8)], [], 8, 0
    codes_all, neg_all = [], []
    for n, b in zip(sizes, bits):
        codes = torch.randint(0, 1 << b, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
        neg = torch.randint(0, 2, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
        chunk = torch.cat([fk.pack_codes(codes, b), fk.pack_codes(neg, 1), torch.zeros(8, dtype=torch.uint8)])
        rows.append([acc_off, n, b, data_off])
        chunks.append(chunk)
        data_off += chunk.numel()
        acc_off += n + 3  # gaps in the accumulator too
        codes_all.append(codes)
        neg_all.append(neg)
    payload = torch.cat(chunks).to(device)
    return payload, torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), acc_off, codes_all, neg_all


@pytest.mark.parametrize("weight", [1.0, 37.0])
def test_layers_equal_one_call_per_layer(backend, weight):
    sizes, bits = [0, 1, 33, 1000, 4099, 70000], [1, 8, 3, 4, 5, 2]
    backend.skip_if_too_big(max(sizes))
    dev = backend.device
    payload, table, acc_n, _, _ = make_payload(sizes, bits, dev)
    scales = [0.5, 2.0, 0.0, 1.25, 3.0, 0.1]
    coefs = fk.layer_coefs(scales, bits, weight)
    acc0 = torch.randn(acc_n, generator=torch.Generator().manual_seed(9)).to(dev)
    with backend.active():
        got = fk.dequant_accumulate_layers(acc0.clone(), payload, table, coefs)
        want = acc0.clone()
        for (acc_off, n, b, off), s in zip(table.tolist(), scales):
            nb = fk.bitmap_nbytes(n)
            fk.dequant_accumulate(want[acc_off:acc_off + n], payload[off:off + b * nb], payload[off + b * nb:off + (b + 1) * nb],
                                  b, s, weight)
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


def test_small_layers_equal_the_reference_on_every_backend(backend):
    """The sizes the Triton interpreter takes (the case above skips it): each backend's
    dequant_accumulate_layers against the reference's, bit for bit; a GPU backend without a
    table kernel calls its own dequant_accumulate once per row."""
    sizes, bits = [0, 1, 33, 1000, 4000], [1, 8, 3, 4, 5]
    dev = backend.device
    payload, table, acc_n, _, _ = make_payload(sizes, bits, dev, seed=4)
    coefs = fk.layer_coefs([0.5, 2.0, 0.0, 1.25, 3.0], bits, 3.0)
    acc0 = torch.randn(acc_n, generator=torch.Generator().manual_seed(5))
    want = acc0.clone()
    P.dequant_accumulate_layers(want, payload.cpu(), table, coefs)
    with backend.active():
        got = fk.dequant_accumulate_layers(acc0.clone().to(dev), payload, table, coefs)
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("big", [False, True], ids=["small", "multi-chunk"])
def test_every_width_against_the_reference(backend, big):
    """Every width 1..8 in one table (6 and 7 were in none), small rows and rows past 64K
    elements (the CPU splits those into chunks at every width, not only 2), against the
    reference bit for bit; and an empty table leaves acc as it was."""
    sizes = [(1 << 16) + 70 + 33 * b if big else 33 * b + 7 for b in range(1, 9)]
    backend.skip_if_too_big(max(sizes))
    bits = list(range(1, 9))
    dev = backend.device
    payload, table, acc_n, _, _ = make_payload(sizes, bits, dev, seed=int(big))
    coefs = fk.layer_coefs([0.1 * b for b in bits], bits, 3.0)
    acc0 = torch.randn(acc_n, generator=torch.Generator().manual_seed(1))
    want = acc0.clone()
    P.dequant_accumulate_layers(want, payload.cpu(), table, coefs)
    with backend.active():
        got = fk.dequant_accumulate_layers(acc0.clone().to(dev), payload, table, coefs)
        empty = fk.dequant_accumulate_layers(acc0.clone().to(dev), payload, torch.zeros(0, 4, dtype=torch.int64),
                                             torch.zeros(0))
    assert torch.equal(got.cpu().view(torch.int32), want.view(torch.int32))
    assert torch.equal(empty.cpu().view(torch.int32), acc0.view(torch.int32))


def test_layer_coefs_are_the_float32_products():
    c = fk.layer_coefs([0.3, 2.0], [4, 1], 7.0)
    assert c.dtype == torch.float32
    assert c.tolist() == [float(np.float32(7.0) * (np.float32(0.3) / np.float32(15))), 14.0]


def _nonzero_payload(nbytes: int, device) -> torch.Tensor:
    """Seeded random bytes, none zero: any row a backend applied before (or instead of)
    refusing its table would change acc (a payload of zeros adds zeros, which the
    'nothing written' checks below could not tell from nothing)."""
    b = torch.randint(1, 256, (nbytes,), generator=torch.Generator().manual_seed(11), dtype=torch.int32)
    return b.to(torch.uint8).to(device)


@pytest.mark.parametrize(
    "row, match",
    [
        ([0, 10, 9, 8], "bits must be in 1..8|is invalid"),
        ([0, 10, 0, 8], "bits must be in 1..8|is invalid"),
        ([-1, 10, 2, 8], "accumulator range|is invalid"),
        ([95, 10, 2, 8], "accumulator range|is invalid"),
        ([0, 10, 2, 6], "misaligned|is invalid"),
        ([0, 10, 2, 2**40], "out of the payload|is invalid"),
        ([0, 10, 2, -4], "out of the payload|is invalid"),  # aligned, and its 12 bytes would end inside
        ([0, 10**9, 2, 8], "accumulator range|out of the payload|is invalid"),
        ([0, -5, 2, 8], "negative element count|is invalid"),
        ([0, 2**62, 2, 8], "any kernel accepts|is invalid"),
        # acc_off + n passes 2^63: it wrapped to a negative end in the Python backends' check, so
        # the reference, Triton and CUDA took the row and added nothing (the CPU binding refused it)
        ([2**63 - 10, 20, 2, 8], "accumulator range|is invalid"),
    ],
)
def test_bad_table_rows_raise(backend, row, match):
    dev = backend.device
    payload = _nonzero_payload(64, dev)
    acc = torch.zeros(100, device=dev)
    with backend.active(), pytest.raises(ValueError, match=match):
        fk.dequant_accumulate_layers(acc, payload, torch.tensor([row]), torch.ones(1))
    assert not acc.any()


def test_a_row_whose_sign_map_runs_past_the_payload_raises(backend):
    """Planes that fit exactly at the payload's end, the sign map after them does not: the
    row is refused (on the CPU by the C++ binding's own check), never read past the end."""
    dev = backend.device
    payload = _nonzero_payload(64, dev)  # planes that, applied before the refusal, would show in acc
    acc = torch.zeros(100, device=dev)
    with backend.active(), pytest.raises(ValueError, match="out of the payload|is invalid"):
        fk.dequant_accumulate_layers(acc, payload, torch.tensor([[0, 10, 2, 56]]), torch.ones(1))  # 8 + 4 bytes at 56
    assert not acc.any()


def test_a_row_may_end_exactly_at_the_end_of_acc_and_of_the_payload(backend):
    """The bounds are inclusive: a row whose elements end at acc's last one and whose sign
    map ends at the payload's last byte is valid (2-bit planes of 10 codes: 8 bytes, then 4
    of signs, at 52 of 64), the same as one dequant_accumulate."""
    dev = backend.device
    payload = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(5), dtype=torch.int32)
    payload = payload.to(torch.uint8).to(dev)
    with backend.active():
        got = fk.dequant_accumulate_layers(torch.zeros(100, device=dev), payload, torch.tensor([[90, 10, 2, 52]]),
                                           fk.layer_coefs([0.5], [2]))
        want = torch.zeros(100, device=dev)
        fk.dequant_accumulate(want[90:], payload[52:60], payload[60:64], 2, 0.5)
    assert want[90:].any()
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


def test_overlapping_rows_and_bad_coefs_raise(backend):
    dev = backend.device
    # non-zero bytes: row 0 of each refused table is valid, and had it been added before
    # row 1 was refused, acc would show it
    payload = _nonzero_payload(64, dev)
    acc = torch.zeros(100, device=dev)
    with backend.active():
        with pytest.raises(ValueError, match="overlapping|is invalid"):
            fk.dequant_accumulate_layers(acc, payload, torch.tensor([[10, 20, 1, 8], [25, 5, 1, 16]]), torch.ones(2))
        # one shared element ([10, 30) and [29, 34)) is an overlap on every backend (the
        # reference and Triton check the table in numpy, the CPU in its binding); a row that
        # starts where the last one ends is fine, and adds what the reference adds
        with pytest.raises(ValueError, match="overlapping|is invalid"):
            fk.dequant_accumulate_layers(acc, payload, torch.tensor([[10, 20, 1, 8], [29, 5, 1, 16]]), torch.ones(2))
        assert not acc.any()
        fk.dequant_accumulate_layers(acc, payload, torch.tensor([[10, 20, 1, 8], [30, 5, 1, 16]]), torch.ones(2))
        want = torch.zeros(100)
        P.dequant_accumulate_layers(want, payload.cpu(), torch.tensor([[10, 20, 1, 8], [30, 5, 1, 16]]), torch.ones(2))
        assert want[10:35].any() and not want[:10].any() and not want[35:].any()
        assert torch.equal(acc.cpu().view(torch.int32), want.view(torch.int32))
        with pytest.raises(ValueError, match="coef must be finite|is invalid"):
            fk.dequant_accumulate_layers(acc, payload, torch.tensor([[0, 20, 1, 8]]), torch.tensor([float("inf")]))
        assert torch.equal(acc.cpu().view(torch.int32), want.view(torch.int32))  # refused: nothing added
    with pytest.raises(TypeError, match="table must be an int64"):
        fk.dequant_accumulate_layers(acc, payload, torch.zeros(1, 3, dtype=torch.int64), torch.ones(1))
    with pytest.raises(TypeError, match="coefs must be a float32"):
        fk.dequant_accumulate_layers(acc, payload, torch.zeros(1, 4, dtype=torch.int64), torch.ones(2))
    with pytest.raises(ValueError, match="4-byte-aligned"):
        fk.dequant_accumulate_layers(acc, torch.zeros(65, dtype=torch.uint8, device=dev)[1:], torch.zeros(0, 4, dtype=torch.int64),
                                     torch.ones(0))


def test_a_strided_table_and_coefs_are_read_by_their_values(backend):
    """The table and coefs may be any strided CPU tensors (a transposed table, every other
    coef): the rows are their values, as for contiguous copies."""
    dev = backend.device
    payload, table, acc_n, _, _ = make_payload([40, 77], [3, 5], dev)
    coefs = fk.layer_coefs([0.5, 2.0], [3, 5])
    t_strided = table.t().contiguous().t()
    c_strided = torch.stack([coefs, torch.full_like(coefs, 9.0)], dim=1)[:, 0]
    assert not t_strided.is_contiguous() and not c_strided.is_contiguous()
    with backend.active():
        want = fk.dequant_accumulate_layers(torch.zeros(acc_n, device=dev), payload, table, coefs)
        got = fk.dequant_accumulate_layers(torch.zeros(acc_n, device=dev), payload, t_strided, c_strided)
    assert want.any()
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("which", ["table", "coefs"])
def test_a_table_or_coefs_off_the_cpu_raise(backend, which):
    """The table and coefs describe the work and are read on the host: CPU tensors only,
    refused by name elsewhere (here a meta tensor: the backends failed on it with numpy's or
    a null-pointer error)."""
    dev = backend.device
    payload = torch.zeros(64, dtype=torch.uint8, device=dev)
    table, coefs = torch.tensor([[0, 10, 1, 8]]), torch.ones(1)
    if which == "table":
        table = table.to("meta")
    else:
        coefs = coefs.to("meta")
    with backend.active(), pytest.raises(ValueError, match="table and coefs must be CPU tensors"):
        fk.dequant_accumulate_layers(torch.zeros(100, device=dev), payload, table, coefs)


@pytest.mark.skipif(native is None, reason="native module not built")
@pytest.mark.parametrize(
    "over, match",
    [
        (dict(table_nbytes=31), "table holds 31 bytes, fewer than 1 rows"),
        (dict(coefs_len=0), "coefs holds 0 values, fewer than the rows"),
        (dict(table=4), "table: null or not 8-byte aligned"),
        (dict(coefs=2), "coefs: null or not 4-byte aligned"),
        (dict(payload=1), "payload must be 4-byte aligned"),
    ],
)
def test_native_binding_refuses_short_or_misaligned_buffers(over, match):
    """The binding's own checks of the buffers it is handed (the table's int64 rows need 8-byte
    alignment, coefs and payload 4), each at its edge: one byte or one value short, or an
    address off by half the alignment. Every case fails before the table is read."""
    payload, acc = torch.zeros(64, dtype=torch.uint8), torch.zeros(100)
    table, coefs = torch.tensor([[0, 10, 2, 8]]), torch.ones(1)
    a = dict(acc=acc.data_ptr(), acc_n=100, payload=payload.data_ptr(), payload_nbytes=64, table=table.data_ptr(),
             nrows=1, table_nbytes=32, coefs=coefs.data_ptr(), coefs_len=1, nthreads=1)
    native.cpu.dequant_accumulate_layers(**a)  # the baseline is valid
    for k in ("table", "coefs", "payload"):
        if k in over:
            over = {**over, k: a[k] + over[k]}
    with pytest.raises(ValueError, match=match):
        native.cpu.dequant_accumulate_layers(**{**a, **over})


@pytest.mark.skipif(native is None, reason="native module not built")
def test_native_binding_refuses_an_acc_over_its_inputs():
    """acc is written while the kernel reads the payload, the coefs and the table's rows (again,
    after the binding checked them): an acc sharing bytes with any of them made the kernel read
    what it wrote. A table inside acc turned row 1's checked acc_off into a float's bits once
    row 0 had added into them, and row 1 then wrote ~4 GiB past acc: a segfault (so that case
    runs in a subprocess). Each is refused before anything is written; back to back is not an
    overlap."""
    code = (
        "import torch\n"
        "from fedmpq_kernels._native import native\n"
        "acc = torch.zeros(256)\n"
        "payload = torch.full((72,), 255, dtype=torch.uint8); payload[32:36] = 0; payload[68:72] = 0\n"
        "rows = acc[104:120].view(torch.int64)  # the table inside acc, row 0 adding over row 1\n"
        "rows.copy_(torch.tensor([96, 32, 8, 0, 160, 32, 8, 36]))\n"
        "coefs = torch.ones(2)\n"
        "try:\n"
        "    native.cpu.dequant_accumulate_layers(acc.data_ptr(), 256, payload.data_ptr(), 72, rows.data_ptr(), 2, 64,\n"
        "                                         coefs.data_ptr(), 2, 1)\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "acc and table overlap", (r.returncode, r.stdout, r.stderr[-2000:])

    acc, payload = torch.zeros(256), torch.full((72,), 255, dtype=torch.uint8)
    table, coefs = torch.tensor([[0, 32, 8, 0]]), torch.ones(1)
    a = dict(acc=acc.data_ptr(), acc_n=256, payload=payload.data_ptr(), payload_nbytes=72, table=table.data_ptr(),
             nrows=1, table_nbytes=32, coefs=coefs.data_ptr(), coefs_len=1, nthreads=1)
    for over, match in [(dict(coefs=acc.data_ptr() + 4 * 255), "acc and coefs overlap"),
                        (dict(payload=acc.data_ptr() + 4 * 200), "acc and payload overlap"),
                        (dict(table=acc.data_ptr() + 4 * 250), "acc and table overlap")]:
        with pytest.raises(ValueError, match=match):
            native.cpu.dequant_accumulate_layers(**{**a, **over})
    assert not acc.any()
    acc[248:].view(torch.int64).copy_(table.view(-1))  # acc ends where the table starts
    native.cpu.dequant_accumulate_layers(**{**a, "acc_n": 248, "table": acc.data_ptr() + 4 * 248})
    assert acc[:32].any() and not acc[32:248].any() and torch.equal(acc[248:].view(torch.int64), table.view(-1))


@pytest.mark.skipif(native is None, reason="native module not built")
@settings(max_examples=FUZZ, deadline=None, suppress_health_check=list(HealthCheck), derandomize=FUZZ <= 300)
@given(st.data())
def test_native_binding_fuzzed(data):
    """Hostile tables and sizes straight into the C++ binding: it runs only what fits, and
    raises ValueError on everything else."""
    payload = torch.randint(0, 256, (256,), generator=torch.Generator().manual_seed(1), dtype=torch.int32).to(torch.uint8)
    acc = torch.zeros(300)
    nrows = data.draw(st.integers(0, 6))
    big = st.sampled_from([0, 1, 3, 4, 8, 31, 32, 33, 64, 200, 255, 256, 300, 2**31, 2**56, 2**62, -1, -(2**63)])
    rows = [[data.draw(big), data.draw(big), data.draw(st.integers(-2, 10)), data.draw(big)] for _ in range(nrows)]
    table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    coefs = torch.tensor([data.draw(st.sampled_from([1.0, 0.0, -2.5, float("nan"), float("inf")])) for _ in range(nrows)],
                         dtype=torch.float32)
    # Buffer sizes the caller declares are the truth or less (the binding cannot know more);
    # everything else is hostile.
    acc_n = data.draw(st.sampled_from([0, 1, 100, 300]))
    pay_n = data.draw(st.sampled_from([0, 64, 256]))
    table_nbytes = data.draw(st.sampled_from([table.numel() * 8, max(table.numel() * 8 - 8, 0), 0]))
    coefs_len = data.draw(st.sampled_from([nrows, max(nrows - 1, 0)]))
    before = acc.clone()
    try:
        native.cpu.dequant_accumulate_layers(acc.data_ptr(), acc_n, payload.data_ptr(), pay_n,
                                             table.data_ptr() if nrows else 0, nrows, table_nbytes,
                                             coefs.data_ptr() if nrows else 0, coefs_len, 2)
    except ValueError:
        assert torch.equal(acc, before)  # refused before any kernel ran
        return
    assert torch.equal(acc[acc_n:], before[acc_n:])  # nothing written past the declared end


@pytest.mark.parametrize("scales, weight, match", [
    ([0.5, -1.0], 1.0, r"scale must be finite and >= 0 in float32, got -1.0 \(scale 1\)"),
    ([float("nan"), 1.0], 1.0, "scale must be finite and >= 0 in float32, got nan"),
    ([0.5, 1e39], 1.0, "scale must be finite and >= 0 in float32, got inf"),  # a double beyond float32
    ([0.5, 1.0], 1e39, "weight must be finite in float32, got 1e"),
    ([0.5, 3e38], 100.0, r"weight \* scale overflows float32 \(100.0 \* 3.*, scale 1\)"),  # 3e38 / 7 * 100
])
def test_layer_coefs_refuses_what_dequant_accumulate_refuses(scales, weight, match):
    """dequant_accumulate refused a negative, NaN or out-of-range scale and weight; the
    coefficients for its many-layer form took them (a negative scale made a negative
    coefficient, NaN a coefficient the table check names only as 'finite coef')."""
    with pytest.raises(ValueError, match=match):
        fk.layer_coefs(scales, [3, 3], weight)
    # a negative weight stays allowed, as dequant_accumulate's
    want = float(torch.tensor(-2.0) * (torch.tensor(0.5) / torch.tensor(7.0)))
    assert fk.layer_coefs([0.0, 0.5], [3, 3], -2.0).tolist() == [0.0, want]


@pytest.mark.parametrize("bits", [[0, 3], [3, 40], [3, -1], [1.5, 2], [3]])
def test_layer_coefs_refuses_widths_outside_1_to_8(bits):
    """0 bits gave an inf coefficient (a division by 2^0 - 1), 40 a coefficient of 0: both
    silently; a float width was taken as it was."""
    with pytest.raises(ValueError, match="^bits must be integers in 1..8, one per scale or one for all"):
        fk.layer_coefs([0.5, 1.0], bits)
    assert fk.layer_coefs([0.5, 1.0], 3).tolist() == fk.layer_coefs([0.5, 1.0], [3, 3]).tolist()


_REWRITTEN_TABLE = r"""
import threading, torch, fedmpq_kernels as fk
from fedmpq_kernels.pack import reference as P
torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
L, n, bits = 64, 1 << 12, 4
codes = torch.randint(0, 16, (n,), generator=g, dtype=torch.int32).to(torch.uint8)
_, sign, _ = fk.binarize(torch.randn(n, generator=g), bits)
blob = torch.cat([fk.pack_codes(codes, bits), sign])
payload = blob.repeat(L)
table = torch.tensor([(l * n, n, bits, l * blob.numel()) for l in range(L)], dtype=torch.int64)
coefs = torch.full((L,), 0.01)
# what one accepted call adds to a zero acc: the reference on the rows as checked (good ones)
want = torch.zeros(L * n)
P.dequant_accumulate_layers(want, payload, table.clone(), coefs)
assert want.any()
want = want.view(torch.int32)
acc = torch.zeros(L * n)
good = int(table[L - 1, 0])
stop = threading.Event()
def rewrite():
    while not stop.is_set():
        table[L - 1, 0] = 1 << 40  # the last row's accumulator offset, far outside acc
        table[L - 1, 0] = good
t = threading.Thread(target=rewrite, daemon=True)
t.start()
# first: the first accepted call left acc as the reference's one call (the refused calls
# before it wrote nothing); total: acc after the loop, as the reference's rows added once per
# accepted call (float32 adds of the same values in the same order: the same bits), so every
# accepted call added what it must and no refused call wrote. acc is checked after the loop,
# not after each call: each extra torch op in the loop is another GIL hand-off to the rewriter
outcomes = {"ok": 0, "refused": 0}
calls, first = 0, None
while calls < 2000 or (outcomes["ok"] == 0 and calls < 20000):  # on until one call is accepted
    calls += 1
    try:
        fk.dequant_accumulate_layers(acc, payload, table, coefs)
    except ValueError:
        outcomes["refused"] += 1
    else:
        outcomes["ok"] += 1
        if first is None:
            first = torch.equal(acc.view(torch.int32), want)
stop.set()
t.join()  # not at exit: a daemon thread still in torch then aborts the interpreter's teardown
total = torch.zeros(L * n)
for _ in range(outcomes["ok"]):
    total.add_(want.view(torch.float32))
outcomes["first"] = bool(first)
outcomes["total"] = torch.equal(acc.view(torch.int32), total.view(torch.int32))
print(outcomes)
"""


def _check_rewritten_table_outcomes(stdout: str) -> dict:
    """The child's last line, {'ok': .., 'refused': .., 'first': .., 'total': ..}: at least
    one call accepted (a binding that refused every call ran nothing), the first accepted
    call's acc the reference's for the good rows, and acc at the end the reference's rows
    added once per accepted call (none added something else, no refused call wrote)."""
    import ast

    o = ast.literal_eval(stdout.strip().splitlines()[-1])
    assert set(o) == {"ok", "refused", "first", "total"}, o
    assert o["ok"] >= 1, f"no call was accepted: {o}"
    assert o["ok"] + o["refused"] >= 2000, o
    assert o["first"], f"the first accepted call's acc is not the reference's: {o}"
    assert o["total"], f"acc is not the reference's rows added once per accepted call: {o}"
    return o


def test_a_table_rewritten_by_another_thread_during_the_call_is_refused_or_used_whole():
    """The CPU binding checked the table's rows, released the GIL, and its kernel read the
    caller's rows again: a row another thread rewrote in between (an offset far outside acc)
    was written through (SIGSEGV in every run). It checks and uses a copy: each
    call is refused (the bad row seen) or runs on the rows it checked, adding exactly what the
    reference adds for them. In a child process, so that a crash fails this test instead of
    ending the run."""
    r = subprocess.run([sys.executable, "-c", _REWRITTEN_TABLE], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert "'ok'" in r.stdout and "'refused'" in r.stdout, r.stdout
    _check_rewritten_table_outcomes(r.stdout)
