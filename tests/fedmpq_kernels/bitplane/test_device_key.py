"""bitplane_step's key on the device (a one-element int64 tensor, low 32 bits used) against
the same key as an int, bit for bit on every backend, through the public function, the
registered op and opcheck; step_keys against step_key; the errors of bad key tensors; and,
where a CUDA device is present, a step with a device key captured in a CUDA graph."""
from __future__ import annotations

import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels.bitplane import reference as R

from .helpers import assert_state_equal, bits_of, fresh_state, kernels, step_args

K_HIGH = 0xDEADBEEF  # >= 2^31: the int32 bit pattern is negative


def _key_tensors(k: int, dev):
    """(name, tensor) pairs holding key k in every form a caller may pass."""
    wide = torch.arange(12, dtype=torch.int64, device=dev) * 1000
    wide[2] = k  # wide[::2][1]: a 0-dim view at an offset, into a strided tensor
    yield "0-dim", torch.tensor(k, dtype=torch.int64, device=dev)
    yield "shape (1,)", torch.tensor([k], dtype=torch.int64, device=dev)
    yield "k + 5 * 2^32", torch.tensor(k + 5 * 2**32, dtype=torch.int64, device=dev)
    yield "k - 2^32 (negative)", torch.tensor(k - 2**32, dtype=torch.int64, device=dev)
    yield "view keys[::2][1]", wide[::2][1]
    yield "view keys[2:3] of (1,)", wide[2:3]


def _state(n, bits, dev, seed=0):
    """A layer with random momentum codes and gs, so that step 1 (momentum) and the
    stochastic part (step 4) are both exercised."""
    (codes, sign, mom, gs), scale = fresh_state(n, bits, dev, seed)
    g = torch.Generator().manual_seed(n * 7 + bits)
    mom.copy_(torch.randint(0, 256, (bits, n), generator=g, dtype=torch.int32).to(torch.uint8))
    gs.fill_(0.01)
    grad = (torch.randn(n, generator=g) * 0.1).to(dev)
    coef = (torch.rand(bits, generator=g) * 1e-3).to(dev)
    return [codes, sign, mom, gs], scale, grad, coef


def _run(step, state, scale, grad, coef, bits, key):
    s = [t.clone() for t in state]
    out = step(*s, grad, coef, scale, bits, 0.5, 0.9, key)
    return s, out


def _same(a, b, where):
    (sa, oa), (sb, ob) = a, b
    assert_state_equal(sa, [t.cpu() for t in sb], where)
    assert oa.shape == ob.shape == () and torch.equal(bits_of(oa), bits_of(ob)), f"{where}: g_s differs"


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("numel", [0, 1, 33, 1007])
def test_tensor_key_matches_int_key(backend, numel, bits):
    kernels(backend)
    if backend.interpreted and numel >= 1000 and bits not in (1, 8):
        # 28 steps of four programs each, 5 s a width: the narrowest and widest take the many
        # programs' case there, every width the one program's
        pytest.skip("the Triton interpreter takes 1,007 weights at 1 and 8 bits")
    dev = backend.device
    state, scale, grad, coef = _state(numel, bits, dev)
    with backend.active():
        for k in (0, 12345, K_HIGH, 0xFFFFFFFF):
            want = _run(fk.bitplane_step, state, scale, grad, coef, bits, k)
            forms = list(_key_tensors(k, dev))
            for name, kt in (forms if k in (12345, K_HIGH) else forms[:1]):  # every form of two keys
                _same(_run(fk.bitplane_step, state, scale, grad, coef, bits, kt), want, f"key {k:#x} as {name}")
            # the registered op (the path of traced, compiled and functorch calls): the int
            # key is ignored when key_tensor is given
            op = lambda *a: torch.ops.fedmpq.bitplane_step(*a[:-1], 777, a[-1])  # noqa: E731
            _same(_run(op, state, scale, grad.float(), coef.float(), bits, torch.tensor(k + 2**32, device=dev)), want,
                  f"key {k:#x} through torch.ops")
        if numel >= 1000:  # the key is really used: another key draws other numbers
            a = _run(fk.bitplane_step, state, scale, grad, coef, bits, torch.tensor(K_HIGH, device=dev))
            b = _run(fk.bitplane_step, state, scale, grad, coef, bits, torch.tensor(K_HIGH ^ 1, device=dev))
            assert not torch.equal(a[0][2], b[0][2])
    # and both equal the reference's step (the oracle, with the int key)
    ref = [t.cpu().clone() for t in state]
    want = R.bitplane_step(*ref, grad.cpu(), coef.cpu(), scale.cpu(), bits, 0.5, 0.9, 12345)
    with backend.active():
        _same(_run(fk.bitplane_step, state, scale, grad, coef, bits, torch.tensor(12345, device=dev)), (ref, want),
              "against the reference")


def test_tensor_key_through_the_registered_op_with_opcheck(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 77, 4
    state, scale, grad, coef = _state(n, bits, dev)
    with backend.active():
        for kt in (torch.tensor(K_HIGH, device=dev), torch.tensor([3, K_HIGH + 2**33], device=dev)[1:]):
            torch.library.opcheck(torch.ops.fedmpq.bitplane_step.default,
                                  (*[t.clone() for t in state], grad, coef, scale, bits, 0.5, 0.9, 0, kt))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device")])])
@pytest.mark.parametrize("seed", [0, 1, 1234, 2**31 + 5, 2**32 - 1, 2**40 + 3, -7])
def test_step_keys_equal_step_key(device, seed):
    for s in (0, 1, 7, 999_999, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 123, -1):
        want = [R.step_key(seed, s, l) for l in range(6)]
        assert want == [R.step_key(seed, s % 2**32, l) for l in range(6)]  # step is taken mod 2^32
        for step in (torch.tensor(s, device=device), torch.tensor([s], device=device),
                     torch.tensor([5, s], device=device)[1:]):
            keys = fk.step_keys(seed, step, 6)
            assert keys.dtype == torch.int64 and keys.shape == (6,) and keys.device == step.device
            assert keys.tolist() == want, (seed, s)
            assert fk.step_keys(seed, step, 0).shape == (0,)
            assert fk.step_keys(seed, step, 1).tolist() == want[:1]


def test_step_keys_drive_bitplane_step(backend):
    """The optimizer's use: keys = step_keys(seed, step, L) on the device, keys[l] per layer."""
    kernels(backend)
    dev = backend.device
    n, bits, seed = 300, 3, 99
    state, scale, grad, coef = _state(n, bits, dev)
    with backend.active():
        for s in (0, 5, 2**32 + 1):
            keys = fk.step_keys(seed, torch.tensor(s, device=dev), 4)
            for layer in range(4):
                _same(_run(fk.bitplane_step, state, scale, grad, coef, bits, keys[layer]),
                      _run(fk.bitplane_step, state, scale, grad, coef, bits, fk.step_key(seed, s, layer)),
                      f"step {s} layer {layer}")


@pytest.mark.parametrize(
    "key, exc, match",
    [
        (torch.tensor(5.0), TypeError, r"key must be an int or a one-element torch.int64 tensor, got a tensor of torch.float32"),
        (torch.tensor(5, dtype=torch.int32), TypeError, r"key .* got a tensor of torch.int32"),
        (torch.tensor(5, dtype=torch.uint8), TypeError, r"key .* got a tensor of torch.uint8"),
        (torch.tensor(True), TypeError, r"key .* got a tensor of torch.bool"),
        (torch.tensor(5, device="meta"), ValueError, r"key is on meta, expected cpu"),
        (torch.tensor([5, 6]), ValueError, r"key must be a one-element tensor, got shape \(2,\)"),
        (torch.zeros(0, dtype=torch.int64), ValueError, r"key must be a one-element tensor, got shape \(0,\)"),
        (torch.tensor([[5]]).expand(1, 2), ValueError, r"key must be a one-element tensor"),
        (True, ValueError, "key must be a uint32"),
        (2**32, ValueError, "key must be a uint32"),
    ],
    ids=["float32", "int32", "uint8", "bool-tensor", "meta", "numel-2", "numel-0", "expanded", "bool", "int-2^32"],
)
def test_bad_key_tensors_raise_and_leave_the_state_untouched(key, exc, match):
    a = step_args(codes=torch.full((40,), 3, dtype=torch.uint8), grad=torch.ones(40), key=key)
    before = [a[k].clone() for k in ("codes", "sign", "mom", "gs")]
    with pytest.raises(exc, match=match):
        fk.bitplane_step(**a)
    assert_state_equal([a[k] for k in ("codes", "sign", "mom", "gs")], before, "after the error")


@pytest.mark.parametrize(
    "args, exc, match",
    [
        ((1.0, torch.tensor(0), 2), TypeError, "seed must be an int"),
        ((True, torch.tensor(0), 2), TypeError, "seed must be an int"),
        ((1, 0, 2), TypeError, "step must be a torch.Tensor"),
        ((1, torch.tensor(0, dtype=torch.int32), 2), TypeError, "step must be torch.int64"),
        ((1, torch.tensor(0.0), 2), TypeError, "step must be torch.int64"),
        ((1, torch.tensor([0, 1]), 2), ValueError, "step must be a one-element tensor"),
        ((1, torch.tensor(0), -1), ValueError, "layers must be >= 0"),
        ((1, torch.tensor(0), 2.0), TypeError, "layers must be an int"),
        ((1, torch.tensor(0), True), TypeError, "layers must be an int"),
    ],
)
def test_step_keys_raise_clear_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        fk.step_keys(*args)


def test_device_key_step_replays_in_a_cuda_graph(backend):
    """A step with its key from step_keys on a device step counter, captured in a CUDA graph:
    each replay, after the counter moved, draws the numbers of that step (as the int key)."""
    if backend.device != "cuda" or backend.name == "reference":
        pytest.skip("needs a GPU kernel backend on CUDA (the reference reads g_s on the host: no graph)")
    kernels(backend)
    dev = backend.device
    n, bits, seed = 5000, 4, 42
    state, scale, grad, coef = _state(n, bits, dev)
    work = [t.clone() for t in state]
    step = torch.zeros((), dtype=torch.int64, device=dev)
    with backend.active():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compiles) outside the capture
            for _ in range(2):
                fk.bitplane_step(*[t.clone() for t in state], grad, coef, scale, bits, 0.5, 0.9,
                                 fk.step_keys(seed, step, 3)[2])
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fk.bitplane_step(*work, grad, coef, scale, bits, 0.5, 0.9, fk.step_keys(seed, step, 3)[2])
        moms = []
        for s in (0, 1, 2**32 + 7):
            for w, t in zip(work, state):
                w.copy_(t)
            step.fill_(s)
            graph.replay()
            torch.cuda.synchronize()
            _same(([t.clone() for t in work], out.clone()),
                  _run(fk.bitplane_step, state, scale, grad, coef, bits, fk.step_key(seed, s, 2)), f"replay at step {s}")
            moms.append(work[2].clone())
        assert not torch.equal(moms[0], moms[1])  # new numbers on each replay


def test_int_keys_at_the_int32_boundary(backend):
    """An int key reaches the kernels as its low 32 bits' int32 bit pattern: 2^31 (the first
    pattern that is negative) and 2^31 - 1 draw the same numbers as the reference's and as
    the same key in a tensor (also with 2^32 added there: its low 32 bits are used). K_HIGH and 0xFFFFFFFF do not reach 2^31
    itself, where a ``> 2^31`` for ``>= 2^31`` passes an int64 the kernel must not get."""
    kernels(backend)
    dev = backend.device
    n, bits = 1007, 2
    state, scale, grad, coef = _state(n, bits, dev)
    for k in (2**31, 2**31 - 1):
        ref = [t.cpu().clone() for t in state]
        want = R.bitplane_step(*ref, grad.cpu(), coef.cpu(), scale.cpu(), bits, 0.5, 0.9, k)
        with backend.active():
            _same(_run(fk.bitplane_step, state, scale, grad, coef, bits, k), (ref, want), f"key {k:#x}")
            for kt in (k, k + 2**32):
                _same(_run(fk.bitplane_step, state, scale, grad, coef, bits, torch.tensor(kt, device=dev)), (ref, want),
                      f"key {kt:#x} as a tensor")
