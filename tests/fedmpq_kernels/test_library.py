"""The eager fast path and the dispatcher: a TorchDispatchMode in force sees every fedmpq op
(forward and backward) as ``fedmpq.<name>``, as it sees aten ops, and gets the results the
fast path gives without it."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fedmpq_kernels as fk


class _Names(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _fake_quant(scale_kind):
    torch.manual_seed(0)
    x = (torch.randn(37) * 2).requires_grad_(True)
    s = None if scale_kind == "dynamic" else torch.nn.Parameter(torch.tensor(1.3))
    y = fk.fake_quant(x, 4, s, ste="identity" if s is None else "clipped")
    y.backward(torch.linspace(-1, 1, 37))
    return [y.detach(), x.grad] + ([] if s is None else [s.grad])


def _relu6():
    x = (torch.randn(41, generator=torch.Generator().manual_seed(1)) * 4).requires_grad_(True)
    y = fk.relu6_fake_quant(x, 3)
    y.backward(torch.ones(41))
    return [y.detach(), x.grad]


def _dequantize():
    codes, sign, scale = fk.binarize(torch.randn(29, generator=torch.Generator().manual_seed(2)), 5)
    s = torch.nn.Parameter(scale.clone())
    sink = torch.nn.Parameter(fk.sink_like((29,)))
    w = fk.dequantize(codes, sign, s, 5, sink)
    w.backward(torch.arange(29.0))
    return [w.detach(), s.grad, sink.grad, fk.plane_popcounts(codes, 5)]


def _step():
    codes, sign, scale = fk.binarize(torch.randn(50, generator=torch.Generator().manual_seed(3)), 4)
    mom, gs = torch.zeros((4, 50), dtype=torch.uint8), torch.zeros(1)
    g = torch.randn(50, generator=torch.Generator().manual_seed(4))
    out = fk.bitplane_step(codes, sign, mom, gs, g, torch.full((4,), 1e-3), scale, 4, 0.1, 0.9, 7)
    return [out, codes, sign, mom, gs]


def _pack():
    codes = torch.randint(0, 8, (45,), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    planes = fk.pack_codes(codes, 3)
    acc = fk.dequant_accumulate(torch.zeros(45), planes, None, 3, 0.5)
    return [planes, fk.unpack_codes(planes, 3, 45), acc]


CASES = {
    "fake_quant dynamic": (lambda: _fake_quant("dynamic"), ["fedmpq.fake_quant.default"]),
    "fake_quant learnable scale": (lambda: _fake_quant("learnable"),
                                   ["fedmpq.fake_quant.default", "fedmpq.fake_quant_backward.default"]),
    "relu6_fake_quant": (_relu6, ["fedmpq.relu6_fake_quant.default", "fedmpq.fake_quant_backward.default"]),
    "dequantize": (_dequantize, ["fedmpq.binarize.default", "fedmpq.dequantize.default",
                                 "fedmpq.dequantize_backward.default", "fedmpq.plane_popcounts.default"]),
    "bitplane_step": (_step, ["fedmpq.binarize.default", "fedmpq.bitplane_step.default"]),
    "pack": (_pack, ["fedmpq.pack_codes.default", "fedmpq.dequant_accumulate.default",
                     "fedmpq.unpack_codes.default"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_dispatch_mode_sees_every_fedmpq_op_and_changes_no_result(case):
    run, expected = CASES[case]
    plain = run()
    with _Names() as mode:
        seen = run()
    fedmpq_ops = [op for op in mode.ops if op.startswith("fedmpq.")]
    assert sorted(set(fedmpq_ops)) == sorted(expected), mode.ops
    for a, b in zip(plain, seen, strict=True):
        assert torch.equal(a, b)


def _u8(n):
    return torch.zeros(n, dtype=torch.uint8)


# Every op with more than one tensor argument: its arguments (CPU), and which of them is put
# on meta. The cases are valid calls, so only the meta argument can be refused.
_MIXED = [
    ("fake_quant", lambda: [torch.ones(40), 4, torch.tensor(1.0), 1], 2, "scale is on meta but x is on cpu"),
    ("fake_quant_backward", lambda: [torch.ones(40), _u8(8), True], 1, "bitmaps is on meta but grad is on cpu"),
    ("dequant_accumulate", lambda: [torch.zeros(40), _u8(8), _u8(8), 1, 1.0], 1, "planes is on meta but acc"),
    ("dequant_accumulate", lambda: [torch.zeros(40), _u8(8), _u8(8), 1, 1.0], 2, "signs is on meta but acc"),
    ("dequant_accumulate_layers", lambda: [torch.zeros(40), _u8(16), torch.tensor([[0, 40, 1, 0]]), torch.ones(1)],
     1, "payload is on meta but acc"),
    ("dequant_accumulate_layers", lambda: [torch.zeros(40), _u8(16), torch.tensor([[0, 40, 1, 0]]), torch.ones(1)],
     2, "table and coefs must be CPU tensors"),
    ("dequantize", lambda: [_u8(40), _u8(8), torch.tensor(1.0), 3, torch.zeros(40)], 4, "sink is on meta but codes"),
    ("dequantize_backward", lambda: [torch.ones(40), _u8(40), _u8(8), 3], 0, "grad is on meta but codes is on cpu"),
    ("bitplane_step", lambda: [_u8(40), _u8(8), _u8(120), torch.zeros(1), torch.ones(40), torch.zeros(3),
                               torch.tensor(1.0), 3, 0.1, 0.9, 1, torch.zeros(1, dtype=torch.int64)],
     11, "key_tensor is on meta but codes"),
    ("bitplane_step", lambda: [_u8(40), _u8(8), _u8(120), torch.zeros(1), torch.ones(40), torch.zeros(3),
                               torch.tensor(1.0), 3, 0.1, 0.9, 1, None], 4, "grad is on meta but codes"),
]


@pytest.mark.parametrize("name, make, meta, match", _MIXED, ids=[f"{c[0]}-{c[2]}" for c in _MIXED])
def test_a_direct_call_mixing_meta_and_cpu_tensors_is_refused(name, make, meta, match):
    """The dispatcher sends a call with any meta tensor to the op's fake kernel, even when the
    others are CPU tensors: the fake kernel must refuse the mix as the real op and torch's own
    ops do, not return an uninitialized tensor (fake_quant) or do nothing at all
    (dequant_accumulate). All on meta, the fake kernel still gives the shapes."""
    op = getattr(torch.ops.fedmpq, name)
    args = make()
    args[meta] = args[meta].to("meta")
    with pytest.raises(ValueError, match=match):
        op(*args)
    host = {2, 3} if name == "dequant_accumulate_layers" else set()  # its table and coefs stay on the CPU
    op(*[a.to("meta") if isinstance(a, torch.Tensor) and i not in host else a for i, a in enumerate(make())])
