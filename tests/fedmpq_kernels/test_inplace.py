"""The ops that write into their arguments tell autograd, as torch's own in-place ops do: a
graph that saved a tensor one of them overwrote refuses to run its backward (it gave a wrong
gradient, silently), on the public functions' direct paths and through ``torch.ops.fedmpq``
(its ADInplaceOrView kernels); an accumulator that requires grad is refused. On every
backend: the bumps are the op layer's, whatever kernel writes."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk

MODIFIED = "modified by an inplace operation"


def _layer(dev, n=7, bits=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n,), dtype=torch.uint8, generator=g)
    sign = fk.pack_codes(torch.randint(0, 2, (n,), dtype=torch.uint8, generator=g), 1)
    return codes.to(dev), sign.to(dev), torch.zeros(bits, n, dtype=torch.uint8, device=dev), torch.zeros(1, device=dev)


def _step_args(codes, sign, mom, gs, bits=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    dev = codes.device
    return (codes, sign, mom, gs, torch.randn(codes.numel(), generator=g).to(dev), torch.zeros(bits, device=dev),
            torch.tensor(1.0, device=dev), bits, 0.5, 0.9)


def _saved(codes, sign, bits=3):
    """A weight made from codes and sign, its graph holding them for the backward."""
    scale = torch.tensor(1.0, device=codes.device, requires_grad=True)
    return fk.dequantize(codes, sign, scale, bits, fk.sink_like((codes.numel(),), codes.device)).sum()


@pytest.mark.parametrize("call", ["public", "op"])
def test_a_step_between_forward_and_backward_is_refused_not_a_wrong_gradient(backend, call):
    codes, sign, mom, gs = _layer(backend.device)
    with backend.active():
        loss = _saved(codes, sign)
        versions = [t._version for t in (codes, sign, mom, gs)]
        step = fk.bitplane_step if call == "public" else torch.ops.fedmpq.bitplane_step
        step(*_step_args(codes, sign, mom, gs), 5)
    # the public call bumps what a graph can hold (codes, sign), the op every mutated argument
    bumped = (codes, sign) if call == "public" else (codes, sign, mom, gs)
    assert all(t._version > v for t, v in zip(bumped, versions))
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


@pytest.mark.parametrize("general", [False, True], ids=["usual", "general"])
def test_a_many_layer_step_bumps_every_layers_state(backend, general):
    dev = backend.device
    layers = [_layer(dev, n, seed=n) for n in (5, 9, 33)]
    args = [list(x) for x in zip(*[_step_args(*state, seed=i)[:8] for i, state in enumerate(layers)])]
    # keys in a tensor: the general path (the checks that name things), not the CPU one-pass one
    keys = torch.tensor([1, 2, 3], device=dev) if general else [1, 2, 3]
    before = [t._version for state in layers for t in state[:2]]  # codes and sign
    with backend.active():
        loss = _saved(layers[1][0], layers[1][1])
        fk.bitplane_step_layers(*args, 0.5, 0.9, keys)
    assert all(t._version > v for t, v in zip((t for state in layers for t in state[:2]), before))
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


@pytest.mark.parametrize("call", ["public", "op", "layers"])
def test_an_accumulation_into_a_saved_tensor_is_refused_at_backward(backend, call):
    dev = backend.device
    planes = fk.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).to(dev)
    w = torch.ones(4, device=dev, requires_grad=True)
    acc = torch.ones(4, device=dev)
    loss = (w * acc).sum()  # saves acc
    with backend.active():
        if call == "public":
            fk.dequant_accumulate(acc, planes, None, 2, 3.0)
        elif call == "op":
            torch.ops.fedmpq.dequant_accumulate(acc, planes, None, 2, 1.0)
        else:
            payload = torch.cat([planes, torch.zeros(4, dtype=torch.uint8, device=dev)])  # planes, then the sign map
            fk.dequant_accumulate_layers(acc, payload, torch.tensor([[0, 4, 2, 0]]), torch.tensor([1.0]))
    assert acc.tolist() == [2.0, 3.0, 4.0, 1.0]  # 1 + q (scale 3 over 3 levels, or coef 1)
    with pytest.raises(RuntimeError, match=MODIFIED):
        loss.backward()


def test_an_accumulator_that_requires_grad_is_refused(backend):
    """Accumulated into in place, outside autograd, it got no gradient for the addition: its
    gradient came out as if nothing had been added."""
    dev = backend.device
    planes = fk.pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).to(dev)
    leaf = torch.ones(4, device=dev, requires_grad=True)
    with backend.active():
        for acc in (leaf, leaf * 1.0):
            with pytest.raises(ValueError, match="^acc requires grad: the accumulation is not differentiable"):
                fk.dequant_accumulate(acc, planes, None, 2, 3.0)
        with torch.no_grad():
            fk.dequant_accumulate(leaf, planes, None, 2, 3.0)
    assert leaf.detach().tolist() == [2.0, 3.0, 4.0, 1.0]
