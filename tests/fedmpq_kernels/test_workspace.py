"""The reduction workspace (``_device.workspace``): one per stream outside a CUDA-graph
capture; inside one, a fresh one per call, or one for the whole capture within
:func:`fedmpq_kernels.capture_workspace`, shared by every call on the capture's stream
(autograd's device thread included). The capture is simulated on CPU tensors (the code only
asks torch whether the current stream is capturing, and which stream is current); the GPU
graph tests (test_scale_grad.py, the client's graph tests) replay real captures."""
from __future__ import annotations

import threading

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import _device

CPU = torch.device("cpu")  # index None: the workspaces' key is (None, stream)


@pytest.fixture
def capture(monkeypatch):
    """state["on"]: the current stream is capturing; state["stream"]: the current stream."""
    state = {"on": False, "stream": 7}
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: state["on"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_device, "_capturing_stream", lambda: (None, state["stream"]))
    monkeypatch.setattr(_device, "_WORKSPACES", {})
    monkeypatch.setattr(_device, "_SHARED", {})
    return state


def _zero(ws, words):
    assert ws.dtype == torch.int32 and ws.numel() >= words and ws.numel() % 2 == 0
    assert int(ws.count_nonzero()) == 0


def test_outside_a_capture_one_per_stream_kept_and_grown(capture):
    a = _device.workspace(CPU, 7, 10)
    _zero(a, 10)
    a[1] = 5  # what a kernel leaves in the slots is kept
    assert _device.workspace(CPU, 7, 1000) is a
    assert _device.workspace(CPU, 8, 10) is not a  # another stream
    big = _device.workspace(CPU, 7, 5000)
    assert big is not a and big.numel() >= 5000
    assert _device.workspace(CPU, 7, 10) is big
    with fk.capture_workspace():  # not capturing: no effect
        assert _device.workspace(CPU, 7, 10) is big
    assert not _device._SHARED


def test_in_a_capture_a_fresh_one_per_call_without_the_context(capture):
    capture["on"] = True
    a, b = _device.workspace(CPU, 7, 10), _device.workspace(CPU, 7, 10)
    assert a is not b
    _zero(a, 10)
    _zero(b, 10)
    assert not _device._WORKSPACES  # never the stream's, which eager work shares


def test_capture_workspace_shares_one_per_capture_stream(capture):
    capture["on"] = True
    with fk.capture_workspace():
        a = _device.workspace(CPU, 7, 10)
        _zero(a, 10)
        assert _device.workspace(CPU, 7, 300) is a  # a smaller need: the same one
        assert _device.workspace(CPU, 8, 10) is not a  # another stream: not this capture's
        big = _device.workspace(CPU, 7, 5000)
        assert big is not a
        _zero(big, 5000)
        assert _device.workspace(CPU, 7, 10) is big
        with fk.capture_workspace():  # nested in the same capture: still the capture's one
            assert _device.workspace(CPU, 7, 10) is big
        assert _device.workspace(CPU, 7, 10) is big
        # autograd's device thread runs the backward on the capture's stream: it shares too
        seen = {}
        t = threading.Thread(target=lambda: seen.update(ws=_device.workspace(CPU, 7, 10)))
        t.start()
        t.join()
        assert seen["ws"] is big
    assert not _device._SHARED
    assert _device.workspace(CPU, 7, 10) is not big  # after the block: per call again


def test_capture_workspace_ends_on_error(capture):
    capture["on"] = True
    with pytest.raises(KeyError):
        with fk.capture_workspace():
            shared = _device.workspace(CPU, 7, 10)
            raise KeyError("the step failed")
    assert not _device._SHARED
    assert _device.workspace(CPU, 7, 10) is not shared


def test_two_captures_on_two_streams_do_not_share(capture):
    capture["on"] = True
    with fk.capture_workspace():
        capture["stream"] = 9
        with fk.capture_workspace():  # another thread's capture, on stream 9, say
            nine = _device.workspace(CPU, 9, 10)
            seven = _device.workspace(CPU, 7, 10)
            assert nine is not seven
            assert _device.workspace(CPU, 9, 10) is nine and _device.workspace(CPU, 7, 10) is seven
        assert set(_device._SHARED) == {(None, 7)}
    assert not _device._SHARED


def test_a_ticket_left_set_is_named_and_cleared(capture):
    """tests/tickets.py, which the suite runs after every test: a workspace whose ticket a
    test left set is named and set back to zero; its slots are left as they are."""
    from tests.tickets import tickets_left

    assert tickets_left() == []
    ws = _device.workspace(CPU, 7, 10)
    ws[1] = 9
    assert tickets_left() == []  # stale slots are allowed
    ws[0] = 3
    _device.workspace(CPU, 8, 10)
    assert tickets_left() == ["workspace of (device None, stream 0x7): ticket 3"]
    assert int(ws[0]) == 0 and int(ws[1]) == 9
    assert tickets_left() == []


# The Triton kernels on a workspace kept between calls, as on a GPU (the interpreter's own
# reduction_workspace makes a fresh one per call): every family in turn, many programs (64-
# element blocks, 32 for the step, 4 slots combined at a time), grids that grow and shrink
# between calls, slots poisoned with NaN bits when the workspace is made. Each call must
# give the reference's bits and leave the ticket at zero for the next one.
_NAN = 0x7FC00000


def test_triton_kernels_on_one_kept_workspace(backend, monkeypatch):
    if not backend.interpreted:
        pytest.skip("the Triton interpreter case")
    from fedmpq_kernels import _triton_common
    from fedmpq_kernels.bitplane import reference as BR
    from fedmpq_kernels.fake_quant import reference as FR

    from .bitplane.helpers import bits_of, fresh_state, reference_run

    kept = {}

    def kept_workspace(device, nprog, wide=False):
        words = 2 * (nprog + 1) if wide else nprog + 1
        ws = kept.get("ws")
        if ws is None or ws.numel() < words:
            ws = kept["ws"] = torch.full((max(words, 256),), _NAN, dtype=torch.int32)
            ws[0] = 0
        assert int(ws[0]) == 0, "a ticket left by the call before"
        return ws

    fq, bp = backend.module("fake_quant"), backend.module("bitplane")
    for mod in (_triton_common, fq, bp):
        if hasattr(mod, "reduction_workspace"):
            monkeypatch.setattr(mod, "reduction_workspace", kept_workspace)
    for mod in (fq, bp):
        monkeypatch.setattr(mod, "BLOCK", 64)
        monkeypatch.setattr(mod, "FINISH", 4)
    monkeypatch.setattr(_triton_common, "FINISH", 4)
    monkeypatch.setattr(bp, "STEP_CONFIG", {b: (32, 1) for b in range(1, 9)})

    def ticket_back(op):
        assert int(kept["ws"][0]) == 0, f"{op} left the ticket at {int(kept['ws'][0])}"

    for numel in (1000, 65, 1, 257):  # 16, 2, 1 and 5 programs of 64
        gen = torch.Generator().manual_seed(numel)
        x = torch.randn(numel, generator=gen) * 1.5
        g = torch.randint(-8, 9, (numel,), generator=gen).float()  # exact sums in any order
        assert torch.equal(fq.fake_quant(x, 3, None, 0)[0], FR.fake_quant(x, 3, None, 0)[0])
        ticket_back("fake_quant (absmax)")
        _, b = fq.fake_quant(x, 4, torch.tensor(1.0), 2)
        gx, gs = fq.fake_quant_backward(g, b, True)
        rgx, rgs = FR.fake_quant_backward(g, b, True)
        assert torch.equal(gx, rgx) and gs.item() == rgs.item()
        ticket_back("fake_quant_backward")
        for got, want in zip(fq.relu6_fake_quant(x, 4), FR.relu6_fake_quant(x, 4)):
            assert torch.equal(got, want)
        ticket_back("relu6_fake_quant")
        for bits in (1, 4, 8):
            q, s, sc = bp.binarize(x, bits)
            rq, rs, rsc = BR.binarize(x, bits)
            assert torch.equal(q, rq) and torch.equal(s, rs) and torch.equal(bits_of(sc), bits_of(rsc))
            ticket_back("binarize")
            assert torch.equal(bits_of(bp.dequantize_backward(g, q, s, bits)),
                               bits_of(BR.dequantize_backward(g, q, s, bits)))
            ticket_back("dequantize_backward")
        bits = 3
        (codes, sign, mom, gstate), scale = fresh_state(numel, bits, "cpu")
        for t, (grad, coef, key, want, want_gs) in enumerate(reference_run(numel, bits, 0.5, 0.9)):
            assert torch.equal(bp.plane_popcounts(codes, bits), BR.plane_popcounts(codes, bits))
            ticket_back("plane_popcounts")
            got_gs = bp.bitplane_step(codes, sign, mom, gstate, grad, coef, scale, bits, 0.5, 0.9, key)
            ticket_back("bitplane_step")
            assert torch.equal(bits_of(got_gs), bits_of(want_gs)), f"{bits} bits, step {t}: g_s"
            for name, a, w in zip(("codes", "sign", "mom", "gs"), (codes, sign, mom, gstate), want):
                assert torch.equal(a, w), f"{bits} bits, step {t}: {name}"


def test_the_cuda_adapters_hold_the_workspace_until_their_launch(emu, monkeypatch):
    """Each CUDA adapter keeps the workspace tensor alive until its launch is queued. Another
    thread on the same stream may replace the stream's workspace with a larger one between
    this call's lookup and its launch; had the adapter kept only the pointer, the old one
    would be freed and the allocator could hand its memory to work queued before the
    launch. Modelled here by a workspace lookup whose tensor nobody else holds: every
    launch must find the workspace it was given still alive."""
    import types
    import weakref

    from fedmpq_kernels.bitplane import cuda as bc
    from fedmpq_kernels.bitplane import reference as BR
    from fedmpq_kernels.fake_quant import cuda as fc
    from tests.cuda_emu.launchers import wire

    given = []  # weak references to every workspace handed out

    def replaced_workspace(dev, stream, words):
        ws = torch.zeros(words + (words & 1), dtype=torch.int32)
        given.append(weakref.ref(ws))
        return ws

    launches = []

    class Checked:
        """_C.cuda whose every launch first checks that each workspace handed out is alive."""

        def __init__(self, inner):
            self.inner = inner

        def __getattr__(self, name):
            fn = getattr(self.inner, name)

            def launch(*args, **kw):
                if given:
                    launches.append(name)
                    assert all(r() is not None for r in given), f"{name}: its workspace was freed before the launch"
                    given.clear()
                return fn(*args, **kw)
            return launch

    for mod in (bc, fc):
        cuda = wire(mod, emu, monkeypatch)
        monkeypatch.setattr(mod, "native", types.SimpleNamespace(cuda=Checked(cuda)))
        monkeypatch.setattr(mod, "workspace", replaced_workspace)

    n, bits = 1000, 4
    w = torch.randn(n, generator=torch.Generator().manual_seed(0))
    codes, sign, scale = bc.binarize(w, bits)
    want = BR.binarize(w, bits)
    assert torch.equal(codes, want[0]) and torch.equal(sign, want[1])
    g = torch.randn(n, generator=torch.Generator().manual_seed(1))
    bc.dequantize_backward(g, codes, sign, bits)
    bc.dequantize_backward_layers([g, g], [codes, codes], [sign, sign], [bits, bits])
    bc.plane_popcounts(codes, bits)
    bc.plane_popcounts_layers([codes, codes], [bits, bits])
    state = [codes.clone(), sign.clone(), torch.zeros(bits, n, dtype=torch.uint8), torch.zeros(1)]
    coef = torch.full((bits,), 1e-4)
    bc.bitplane_step(*state, g, coef, scale, bits, 0.5, 0.9, 3)
    bc.bitplane_step_layers([state[0]], [state[1]], [state[2]], [state[3]], [g], [coef], [scale], [bits], 0.5, 0.9, [4])
    y, bm = fc.fake_quant(w, bits, None, 2)
    fc.fake_quant_backward(w, bm, True)
    fc.relu6_fake_quant(w, bits)
    assert launches == ["binarize", "dequantize_backward", "dequantize_backward_layers", "plane_popcounts",
                        "plane_popcounts_layers", "bitplane_step", "bitplane_step_layers", "absmax",
                        "fake_quant_backward", "relu6_fake_quant"]
