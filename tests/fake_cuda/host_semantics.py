"""Host CUDA's own semantics (fake_cuda.cpp's fallback), against the CPU: run on host CUDA by
tests/fedmpq/test_host_cuda.py through run_pytest.py (not collected by the plain suite, whose
torch has no CUDA). A fallback that copied where it should alias, lost an out= resize or let a
device mix through would make the federation runs on host CUDA prove less than they say."""
from __future__ import annotations

import gc

import pytest
import torch


def _pair(*shape, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).to(dtype)
    return x, x.to("cuda")


def test_host_cuda_is_the_device():
    assert torch.cuda.is_available() and torch.cuda.device_count() == 1
    x = torch.zeros(3, device="cuda")
    assert x.is_cuda and x.device == torch.device("cuda", 0)


def test_a_view_written_in_place_shows_in_its_base():
    c, g = _pair(6, 5)
    for t in (c, g):
        t[1:4, ::2].add_(10)
        t.t()[2].mul_(-1)
    assert g.is_cuda and torch.equal(g.cpu(), c)


def test_pieces_of_split_and_unbind_are_views_on_the_device():
    c, g = _pair(6, 4)
    for t in (c, g):
        a, b = t.split(3)
        b.fill_(7)
        t.unbind(1)[0].zero_()
    assert torch.equal(g.cpu(), c)
    assert all(p.is_cuda for p in g.chunk(3))


def test_an_argument_returned_is_itself():
    c, g = _pair(5)
    assert g.add_(1) is g
    out = torch.empty(5, device="cuda")
    assert torch.add(g, 1, out=out) is out
    host = torch.empty(5)
    assert torch.ops.aten.copy_.default(host, g) is host and torch.equal(host, g.cpu())


def test_out_grows_the_device_storage():
    c, g = _pair(7, 3)
    out = torch.empty(0, device="cuda")
    torch.mul(g, 2, out=out)
    assert out.is_cuda and out.shape == (7, 3) and torch.equal(out.cpu(), c * 2)
    assert out.untyped_storage().device.type == "cuda" and out.untyped_storage().nbytes() >= 7 * 3 * 4


def test_resize_keeps_the_strides_of_the_same_sizes_and_grows_otherwise():
    c, g = _pair(2, 3)
    for t in (c.t(), g.t()):
        before = t.stride()
        t.resize_(t.shape)
        assert t.stride() == before
    c, g = _pair(3)
    g.resize_(5)
    assert g.shape == (5,) and torch.equal(g[:3].cpu(), c)
    with pytest.raises(RuntimeError, match="negative"):
        g.resize_(-1)


def test_a_fresh_output_outlives_its_inputs():
    c, g = _pair(1000)
    y = g * 3
    del g
    gc.collect()
    torch.zeros(1000, device="cuda").fill_(5)  # reuse freed memory, if any was
    assert torch.equal(y.cpu(), c * 3)


def test_conjugate_and_negative_views_keep_their_bits():
    c, g = _pair(4, dtype=torch.complex64)
    assert torch.equal(g.conj().clone().cpu(), c.conj().clone())
    assert torch.equal(torch._neg_view(g).clone().cpu(), -c)


def test_autograd_and_draws_run_on_the_device():
    c, g = _pair(8)
    g.requires_grad_(True)
    (g * g).sum().backward()
    assert g.grad.is_cuda and torch.equal(g.grad.cpu(), 2 * c)
    torch.manual_seed(3)
    r = torch.randn(4, device="cuda")
    assert r.is_cuda and torch.isfinite(r.cpu()).all()


@pytest.mark.parametrize("case", ["add", "mul-out-cpu-0d", "inplace-cpu-0d", "set-storage", "set-tensor", "cat"])
def test_a_cpu_tensor_beside_a_cuda_one_is_refused(case):
    _, g = _pair(3)
    cpu, cpu0 = torch.ones(3), torch.zeros(())
    calls = {
        "add": lambda: g + cpu,
        "mul-out-cpu-0d": lambda: torch.mul(g.sum(), g.sum(), out=cpu0),
        "inplace-cpu-0d": lambda: cpu0.add_(g.sum()),
        "set-storage": lambda: g.set_(cpu.untyped_storage()),
        "set-tensor": lambda: torch.ops.aten.set_.source_Tensor(cpu, g),
        "cat": lambda: torch.cat([g, cpu]),
    }
    with pytest.raises(RuntimeError, match="same device"):
        calls[case]()


def test_what_a_gpu_takes_from_the_host_is_taken():
    c, g = _pair(5)
    idx = torch.tensor([4, 0, 2])
    assert torch.equal(g[idx].cpu(), c[idx])  # CPU indices
    assert torch.equal((g + torch.tensor(2.0)).cpu(), c + 2)  # a CPU scalar, read
    g2 = g.clone()
    g2[idx] = torch.tensor(9.0)  # index_put_ with CPU indices and a 0-dim value
    c2 = c.clone()
    c2[idx] = 9.0
    assert torch.equal(g2.cpu(), c2)
    assert torch.equal(torch.empty(5).copy_(g), c) and torch.equal(g.clone().copy_(c).cpu(), c)
