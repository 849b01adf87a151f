"""GPU device and stream handling: an op runs on its tensors' device and on torch's current
stream there, and leaves the caller's current device and stream as they were. Skipped
without a GPU; the multi-GPU cases need two."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.fake_quant import reference as R
from tests.fedmpq_kernels.streams import late_copies

ngpus = torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_case(backend):
    if backend.device != "cuda" or backend.name == "reference":
        pytest.skip("GPU kernel backends only")


def _every_op(x: torch.Tensor):
    """Forward (dynamic and given scale) and backward of every kernel, relu6_fake_quant's
    included; returns the results and the reference's (the scale gradient last)."""
    s = torch.tensor(1.0, device=x.device, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y_dyn = fk.fake_quant(x, 4)
    y = fk.fake_quant(xr, 3, s, ste="clipped")
    g = torch.linspace(-1, 1, x.numel(), device=x.device).reshape(x.shape)
    y.backward(g)
    x6 = x.detach().clone().requires_grad_(True)
    y6 = fk.relu6_fake_quant(x6, 4)
    y6.backward(g)
    xc = x.detach().cpu()
    want6 = (R.relu6_fake_quant(xc, 4)[0], torch.where((xc > 0) & (xc < 6), g.cpu(), torch.zeros_like(xc)))
    xo = x.detach().cpu().requires_grad_(True)
    so = torch.tensor(1.0, requires_grad=True)
    R.fake_quant_autograd(xo, 3, so, "clipped").backward(g.cpu())
    got = (y_dyn, y.detach(), xr.grad, y6.detach(), x6.grad, s.grad)
    want = (R.fake_quant_values(x.cpu(), 4, None), R.fake_quant_values(x.cpu(), 3, torch.tensor(1.0)), xo.grad,
            *want6, so.grad)
    return got, want


def _assert_results(got, want):
    for a, b in zip(got[:-1], want[:-1]):
        torch.testing.assert_close(a.cpu(), b, rtol=0, atol=0)
    torch.testing.assert_close(got[-1].cpu(), want[-1], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(ngpus < 1, reason="no CUDA device")
def test_current_device_and_stream_are_unchanged(backend):
    _gpu_case(backend)
    x = torch.randn(5000, device="cuda") * 2
    side = torch.cuda.Stream()
    with backend.active():
        dev0 = torch.cuda.current_device()
        stream0 = torch.cuda.current_stream()
        got, want = _every_op(x)
        torch.cuda.synchronize()
        assert torch.cuda.current_device() == dev0
        assert torch.cuda.current_stream() == stream0
        _assert_results(got, want)
        # On a side stream: the kernels run there, and it stays the current stream. The
        # input is written on the side stream behind a sleep, over NaNs, so a kernel on
        # any other stream (idle) would read NaNs.
        late, = late_copies(side, (x.cpu(), float("nan")))
        with torch.cuda.stream(side):
            got, want = _every_op(late)
            assert torch.cuda.current_stream() == side
        side.synchronize()
        _assert_results(got, want)
        assert torch.cuda.current_stream() == stream0


@pytest.mark.skipif(ngpus < 1, reason="no CUDA device")
def test_native_launcher_refuses_a_device_that_is_not_current(backend):
    """The CUDA C++ launchers never switch devices themselves (that would move torch's
    current device too): called for a device that is not current, they raise."""
    from fedmpq_kernels._native import native

    if backend.name != "cuda":
        pytest.skip("the CUDA C++ backend's launchers")
    x = torch.randn(64, device="cuda")
    y = torch.empty_like(x)
    s = torch.ones(1, device="cuda")
    other = (torch.cuda.current_device() + 1) % max(ngpus, 2)
    with pytest.raises(ValueError, match=f"current CUDA device is .* but the tensors are on cuda:{other}"):
        native.cuda.fake_quant(x.data_ptr(), y.data_ptr(), 0, 64, 64, 4, s.data_ptr(), True, 0, 0, 0, 0,
                                  other, torch.cuda.current_stream().cuda_stream)


@pytest.mark.skipif(ngpus < 2, reason="needs two GPUs")
@pytest.mark.parametrize("current, target", [(0, 1), (1, 0)])
def test_tensors_on_another_gpu(backend, current, target):
    """With cuda:<current> current, ops on cuda:<target> tensors run there, give the right
    results, and leave cuda:<current> current: a later device="cuda" allocation lands on it."""
    _gpu_case(backend)
    x = torch.randn(70000, device=f"cuda:{target}") * 2
    with backend.active(), torch.cuda.device(current):
        got, want = _every_op(x)
        assert all(t.device == x.device for t in got)
        assert torch.cuda.current_device() == current
        assert torch.empty(1, device="cuda").device.index == current
        torch.cuda.synchronize(target)
        _assert_results(got, want)
