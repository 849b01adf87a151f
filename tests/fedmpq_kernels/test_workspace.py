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
