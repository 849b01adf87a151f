"""Packing on the GPU: every op runs on its tensors' device and on torch's current stream
there, and leaves the caller's current device and stream as they were (the rules of
tests/fedmpq_kernels/fake_quant/test_device.py). Skipped without a GPU; the multi-GPU case
needs two."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.pack import reference as R
from tests.fedmpq_kernels.streams import late_copies

ngpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
N = 70001  # whole tiles, a tail, more than one Triton program


def _kernel_backend(backend):
    if backend.device != "cuda" or backend.name == "reference":
        pytest.skip("GPU kernel backends only")


def _run_ops(device, late=None):
    """pack, unpack and dequant_accumulate of fixed inputs on `device`: their results there,
    and the reference's on the CPU. With a stream `late`, the inputs are written on it behind
    a sleep, over zeros and NaNs (see tests/fedmpq_kernels/streams.py)."""
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (N,), generator=g, dtype=torch.int32).to(torch.uint8)
    signs = R.pack_codes(torch.randint(0, 2, (N,), generator=g, dtype=torch.int32).to(torch.uint8), 1)
    acc0 = torch.randn(N, generator=g)
    if late is None:
        ins = codes.to(device), signs.to(device), acc0.to(device)
    else:
        ins = late_copies(late, (codes, 0), (signs, 0), (acc0, float("nan")))
    planes = fk.pack_codes(ins[0], 5)
    back = fk.unpack_codes(planes, 5, N)
    acc = fk.dequant_accumulate(ins[2], planes, ins[1], 5, 0.75, 3.0)
    want_planes = R.pack_codes(codes, 5)
    want_acc = acc0.clone()
    R.dequant_accumulate(want_acc, want_planes, signs, 5, float(np.float32(3.0) * (np.float32(0.75) / np.float32(31))))
    return (planes, back, acc), (want_planes, codes, want_acc)


def _assert_equal(got, want):
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)


@pytest.mark.skipif(ngpus < 1, reason="no CUDA device")
def test_current_device_and_stream_are_unchanged(backend):
    _kernel_backend(backend)
    dev0, stream0 = torch.cuda.current_device(), torch.cuda.current_stream()
    with backend.active():
        # On the current stream, then on a side stream: the kernels run on the stream that is
        # current, and it stays current. On the side stream the inputs are written there
        # behind a sleep, so a kernel on any other stream (idle) would read the fill.
        for stream in (stream0, torch.cuda.Stream()):
            late = None if stream == stream0 else stream
            with torch.cuda.stream(stream):
                got, want = _run_ops("cuda", late)
                assert torch.cuda.current_stream() == stream
            stream.synchronize()
            _assert_equal(got, want)
            assert torch.cuda.current_device() == dev0 and torch.cuda.current_stream() == stream0


@pytest.mark.skipif(ngpus < 1, reason="no CUDA device")
def test_native_launchers_refuse_a_device_that_is_not_current(backend):
    from fedmpq_kernels._native import native

    if backend.name != "cuda":
        pytest.skip("the CUDA C++ backend's launchers")
    codes = torch.zeros(64, dtype=torch.uint8, device="cuda")
    planes = torch.zeros(8, dtype=torch.uint8, device="cuda")
    seen = torch.zeros(1, dtype=torch.int32, device="cuda")
    acc = torch.zeros(64, device="cuda")
    other = (torch.cuda.current_device() + 1) % max(ngpus, 2)
    stream = torch.cuda.current_stream().cuda_stream
    match = f"current CUDA device is .* but the tensors are on cuda:{other}"
    with pytest.raises(ValueError, match=match):
        native.cuda.pack_codes(codes.data_ptr(), 64, 1, planes.data_ptr(), 8, seen.data_ptr(), other, stream)
    with pytest.raises(ValueError, match=match):
        native.cuda.unpack_codes(planes.data_ptr(), 8, 64, 1, codes.data_ptr(), 64, other, stream)
    with pytest.raises(ValueError, match=match):
        native.cuda.dequant_accumulate(acc.data_ptr(), 64, planes.data_ptr(), 8, 0, 0, 1, 1.0, other, stream)


@pytest.mark.skipif(ngpus < 2, reason="needs two GPUs")
@pytest.mark.parametrize("current, target", [(0, 1), (1, 0)])
def test_tensors_on_another_gpu(backend, current, target):
    _kernel_backend(backend)
    with backend.active(), torch.cuda.device(current):
        got, want = _run_ops(f"cuda:{target}")
        assert all(t.device == torch.device(f"cuda:{target}") for t in got)
        assert torch.cuda.current_device() == current
        assert torch.empty(1, device="cuda").device.index == current
        torch.cuda.synchronize(target)
        _assert_equal(got, want)
