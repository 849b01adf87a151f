"""The reduction workspace (``_device.workspace``): one per stream outside a CUDA-graph
capture; inside one, a fresh one per call, or one for the whole capture within
:func:`fedmpq_kernels.capture_workspace`. The capture is simulated on CPU tensors (the
function only asks torch whether the current stream is capturing); the GPU graph tests
(test_scale_grad.py, the client's graph tests) replay real captures."""
from __future__ import annotations

import threading

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import _device

CPU = torch.device("cpu")


@pytest.fixture
def capturing(monkeypatch):
    state = {"on": False}
    monkeypatch.setattr(torch._C, "_cuda_isCurrentStreamCapturing", lambda: state["on"])
    monkeypatch.setattr(_device, "_WORKSPACES", {})
    return state


def _zero(ws, words):
    assert ws.dtype == torch.int32 and ws.numel() >= words and ws.numel() % 2 == 0
    assert int(ws.count_nonzero()) == 0


def test_outside_a_capture_one_per_stream_kept_and_grown(capturing):
    a = _device.workspace(CPU, 7, 10)
    _zero(a, 10)
    a[0] = 5  # what a kernel leaves is kept (the kernels reset the ticket themselves)
    assert _device.workspace(CPU, 7, 1000) is a
    assert _device.workspace(CPU, 8, 10) is not a  # another stream
    big = _device.workspace(CPU, 7, 5000)
    assert big is not a and big.numel() >= 5000
    assert _device.workspace(CPU, 7, 10) is big


def test_in_a_capture_a_fresh_one_per_call_without_the_context(capturing):
    capturing["on"] = True
    a, b = _device.workspace(CPU, 7, 10), _device.workspace(CPU, 7, 10)
    assert a is not b
    _zero(a, 10)
    _zero(b, 10)
    assert not _device._WORKSPACES  # never the stream's, which eager work shares


def test_capture_workspace_shares_one_per_capture(capturing):
    capturing["on"] = True
    with fk.capture_workspace():
        a = _device.workspace(CPU, 7, 10)
        _zero(a, 10)
        a[0] = 0  # the ticket, as the kernels leave it
        assert _device.workspace(CPU, 9, 300) is a  # any stream of the capture, any smaller size
        big = _device.workspace(CPU, 7, 5000)
        assert big is not a
        _zero(big, 5000)
        assert _device.workspace(CPU, 7, 10) is big
        with fk.capture_workspace():  # a nested capture has its own
            inner = _device.workspace(CPU, 7, 10)
            assert inner is not big
        assert _device.workspace(CPU, 7, 10) is big
    assert _device.workspace(CPU, 7, 10) is not big  # after the block: per call again
    capturing["on"] = False
    with fk.capture_workspace():  # not capturing: the stream's own, as without the block
        assert _device.workspace(CPU, 7, 10) is _device.workspace(CPU, 7, 10)
    assert not _device._WORKSPACES.keys() - {(None, 7)}


def test_capture_workspace_is_left_on_error_and_per_thread(capturing):
    capturing["on"] = True
    with pytest.raises(KeyError):
        with fk.capture_workspace():
            shared = _device.workspace(CPU, 7, 10)
            raise KeyError("the step failed")
    assert _device.workspace(CPU, 7, 10) is not shared
    seen = {}
    with fk.capture_workspace():
        mine = _device.workspace(CPU, 7, 10)
        t = threading.Thread(target=lambda: seen.update(other=_device.workspace(CPU, 7, 10)))
        t.start()
        t.join()
        assert _device.workspace(CPU, 7, 10) is mine
    assert seen["other"] is not mine
