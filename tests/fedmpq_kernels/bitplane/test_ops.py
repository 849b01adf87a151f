"""The bit-plane op layer: the registry's routing, torch.library registration (opcheck),
and the errors the public functions give bad input (leaving the state untouched)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fedmpq_kernels as fk
from fedmpq_kernels import registry
from fedmpq_kernels._native import native
from fedmpq_kernels.bitplane import reference as R

from .helpers import assert_state_equal, kernels, mid_round_state, step_args as _step_args

OPS = ("binarize", "dequantize", "dequantize_backward", "plane_popcounts", "bitplane_step")


def test_registry_routes_to_the_cpu_backend():
    if native is None:
        pytest.skip("native module not built")
    from fedmpq_kernels.bitplane import cpu as C

    with registry.use_backend("cpu"):
        for op in OPS:
            assert registry.get("bitplane", op, "cpu") is getattr(C, op)


def test_opcheck(backend):
    kernels(backend)
    dev = backend.device
    n, bits = 77, 4
    w = torch.randn(n, device=dev)
    with backend.active():
        q, s, sc = fk.binarize(w, bits)
        torch.library.opcheck(torch.ops.fedmpq.binarize.default, (w, bits))
        torch.library.opcheck(torch.ops.fedmpq.dequantize.default,
                              (q, s, sc.clone().requires_grad_(), bits, torch.zeros(7, 11, device=dev, requires_grad=True)))
        torch.library.opcheck(torch.ops.fedmpq.dequantize_backward.default, (torch.randn(n, device=dev), q, s, bits))
        torch.library.opcheck(torch.ops.fedmpq.plane_popcounts.default, (q, bits))
        torch.library.opcheck(torch.ops.fedmpq.bitplane_step.default,
                              (q.clone(), s.clone(), torch.zeros(bits, n, dtype=torch.uint8, device=dev),
                               torch.zeros(1, device=dev), torch.randn(n, device=dev), torch.rand(bits, device=dev), sc,
                               bits, 0.5, 0.9, R.step_key(1, 2, 3)))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: fk.binarize(torch.randn(5), 0), ValueError, "bits must be in 1..8"),
        (lambda: fk.binarize(torch.randn(5), 9), ValueError, "bits must be in 1..8"),
        (lambda: fk.binarize(torch.randn(5), 2.0), TypeError, "bits must be an int"),
        (lambda: fk.binarize(torch.randn(5), True), TypeError, "bits must be an int"),
        (lambda: fk.binarize(torch.arange(5), 4), TypeError, "w must be a floating-point"),
        (lambda: fk.binarize([1.0], 4), TypeError, "must be a torch.Tensor"),
        (lambda: fk.binarize(torch.tensor([1.0, float("nan")]), 4), ValueError, "NaN or inf"),
        (lambda: fk.binarize(torch.tensor([float("inf")]), 4), ValueError, "NaN or inf"),
        # finite in float64, inf in float32: it was binarized with an inf scale
        (lambda: fk.binarize(torch.tensor([1e50, 1.0], dtype=torch.float64), 4), ValueError,
         "beyond float32's range"),
        (lambda: torch.ops.fedmpq.binarize(torch.tensor([1.0, float("nan")]), 4), ValueError, "NaN or inf"),
        (lambda: torch.ops.fedmpq.binarize(torch.tensor([1e50], dtype=torch.float64), 4), ValueError, "NaN or inf"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.int32), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((5,))), TypeError, "codes must be torch.uint8"),
        (lambda: fk.dequantize(torch.zeros(33, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((33,))), ValueError, "sign has 4 bytes, 8 needed"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.float32), torch.tensor(1.0), 3,
                               fk.sink_like((5,))), TypeError, "sign must be torch.uint8"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8),
                               torch.tensor(1.0, dtype=torch.float64), 3, fk.sink_like((5,))), TypeError, "scale must be"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.ones(2), 3,
                               fk.sink_like((5,))), TypeError, "scale must be a one-element"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((6,))), ValueError, "sink has 6 elements, codes 5"),
        # G comes back in the sink's dtype: float16 made 1e-8 a 0 and 1e5 an inf (the step skipped)
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               fk.sink_like((5,)).half()), TypeError, "sink must be float32 .*got torch.float16"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 3,
                               torch.zeros(5, dtype=torch.bfloat16, requires_grad=True)), TypeError, "sink must be float32"),
        (lambda: fk.dequantize(torch.zeros(5, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.tensor(1.0), 9,
                               fk.sink_like((5,))), ValueError, "bits must be in 1..8"),
        (lambda: fk.plane_popcounts(torch.zeros(5, dtype=torch.uint8), 0), ValueError, "bits must be in 1..8"),
        (lambda: fk.plane_popcounts(torch.zeros(5), 3), TypeError, "codes must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(bits=0)), ValueError, "bits must be in 1..8"),
        (lambda: fk.bitplane_step(**_step_args(bits=9)), ValueError, "bits must be in 1..8"),
        (lambda: fk.bitplane_step(**_step_args(codes=torch.zeros(40))), TypeError, "codes must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(sign=torch.zeros(4, dtype=torch.uint8))), ValueError, "sign has 4 bytes"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(2, 40, dtype=torch.uint8))), ValueError, "mom must be"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(40, 3, dtype=torch.uint8).t())), ValueError, "contiguous"),
        (lambda: fk.bitplane_step(**_step_args(mom=torch.zeros(3, 40))), TypeError, "mom must be torch.uint8"),
        (lambda: fk.bitplane_step(**_step_args(gs=torch.zeros(2))), ValueError, "gs must hold one float32"),
        (lambda: fk.bitplane_step(**_step_args(gs=torch.zeros(1, dtype=torch.float64))), TypeError, "gs must be torch.float32"),
        (lambda: fk.bitplane_step(**_step_args(grad=torch.zeros(41))), ValueError, "grad has 41 elements, codes 40"),
        (lambda: fk.bitplane_step(**_step_args(coef=torch.zeros(2))), ValueError, "coef must hold 3 values"),
        (lambda: fk.bitplane_step(**_step_args(scale=torch.ones(2))), TypeError, "scale must be a one-element"),
        (lambda: fk.bitplane_step(**_step_args(lr=0.0)), ValueError, "lr must be > 0"),
        (lambda: fk.bitplane_step(**_step_args(lr=-1.0)), ValueError, "lr must be > 0"),
        (lambda: fk.bitplane_step(**_step_args(lr=float("nan"))), ValueError, "lr must be a finite number"),
        (lambda: fk.bitplane_step(**_step_args(lr=float("inf"))), ValueError, "lr must be a finite number"),
        (lambda: fk.bitplane_step(**_step_args(momentum=1.0)), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: fk.bitplane_step(**_step_args(momentum=-0.1)), ValueError, r"momentum must be in \[0, 1\)"),
        # as float32 (what every backend steps with) 0 and 1: the step moved no code yet
        # erased the momentum, or kept the momentum undecayed
        (lambda: fk.bitplane_step(**_step_args(lr=1e-46)), ValueError, r"lr must be > 0 \(above 2\*\*-150"),
        (lambda: fk.bitplane_step(**_step_args(lr=2.0**-150)), ValueError, "lr must be > 0"),
        # finite as a double, inf as float32: every step was skipped, silently (g_s = inf)
        (lambda: fk.bitplane_step(**_step_args(lr=3.5e38)), ValueError, r"and below 3.4028235677973366e38"),
        (lambda: fk.bitplane_step(**_step_args(lr=1e300)), ValueError, r"and below 3.4028235677973366e38"),
        (lambda: fk.bitplane_step(**_step_args(momentum=0.99999999)), ValueError, r"momentum must be in \[0, 1\) \(below"),
        (lambda: fk.bitplane_step(**_step_args(momentum=1 - 2.0**-25)), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda: fk.bitplane_step(**_step_args(key=-1)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=2**32)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=1.0)), ValueError, "key must be a uint32"),
        (lambda: fk.bitplane_step(**_step_args(key=True)), ValueError, "key must be a uint32"),
        # an AttributeError ('NoneType' object has no attribute 'device'), int() truncating
        # 2.7 or failing inside torch, torch's "numel: integer multiplication overflow"
        (lambda: fk.bitplane_step(**_step_args(codes=None)), TypeError, "codes must be a torch.Tensor, got NoneType"),
        (lambda: fk.uniform(1, 2.7), TypeError, "n must be an int >= 0, got float"),
        (lambda: fk.uniform(1, -5), ValueError, "n must be an int >= 0, got -5"),
        (lambda: fk.uniform(1, None), TypeError, "n must be an int >= 0, got NoneType"),
        (lambda: fk.sink_like((-1, 3)), ValueError, r"shape must be a sequence of ints >= 0, got \(-1, 3\)"),
        (lambda: fk.sink_like((2.5,)), TypeError, r"shape must be a sequence of ints >= 0, got \(2.5,\)"),
        (lambda: fk.sink_like(7), TypeError, "shape must be a sequence of ints >= 0, got int"),
        (lambda: fk.sink_like(None), TypeError, "shape must be a sequence of ints >= 0, got NoneType"),
        (lambda: fk.sink_like((2**40, 2**40)), ValueError, r"holds 2\^63 elements or more"),
        # a float was "unsupported operand type(s) for &", a tensor seed gave a tensor key
        (lambda: fk.step_key(1.5, 2, 3), TypeError, "^seed must be an int, got float"),
        (lambda: fk.step_key(torch.tensor(1), 2, 3), TypeError, "^seed must be an int, got Tensor"),
        (lambda: fk.step_key(1, 2, None), TypeError, "^layer must be an int, got NoneType"),
        # precision reduction of a NaN scale gave a NaN scale, unsaid
        (lambda: fk.precision_reduction(torch.ones(3, dtype=torch.uint8), torch.tensor(float("nan")), 4, 5.0),
         ValueError, "scale must be finite, got nan"),
    ],
)
def test_public_functions_raise_clear_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_sink_like_and_uniform_take_sizes_of_any_integer_kind():
    """torch.Size, NumPy integers, a list, () and zero sizes are sizes."""
    import numpy as np

    for shape in (torch.Size([3, 4]), [np.int64(3), 4], (), (0, 5)):
        t = fk.sink_like(shape)
        assert t.shape == tuple(int(d) for d in shape) and t.dtype == torch.float32 and set(t.stride()) <= {0}
    assert torch.equal(fk.uniform(7, np.int32(5)), fk.uniform(7, 5)) and fk.uniform(7, 0).shape == (0,)


def test_public_errors_leave_the_state_untouched():
    """A refused momentum runs no step: a state a step with the same arguments would change
    (non-zero gradient and coefficients on a mid-round state: codes, signs, momentum codes
    and gs all set) is left bit for bit as it was."""
    n, bits = 40, 3
    codes, sign, mom, gs = mid_round_state(n, bits, seed=3)
    codes = torch.full((n,), 3, dtype=torch.uint8)  # as before: every code 3
    grad = torch.randn(n, generator=torch.Generator().manual_seed(4))
    coef = torch.tensor([1e-3, 2e-3, 3e-3])
    a = _step_args(codes=codes, sign=sign, mom=mom, gs=gs, grad=grad, coef=coef, lr=1.0, momentum=1.5)
    before = [t.clone() for t in (codes, sign, mom, gs)]
    # the same step with a valid momentum changes every part of the state (so the check below
    # could see a step that ran before the refusal)
    ran = [t.clone() for t in before]
    R.bitplane_step(*ran, grad, coef, a["scale"], bits, a["lr"], 0.9, a["key"])
    assert all(not torch.equal(x, y) for x, y in zip(ran, before))
    with pytest.raises(ValueError, match=r"^momentum must be in \[0, 1\)"):
        fk.bitplane_step(**a)
    assert_state_equal((a["codes"], a["sign"], a["mom"], a["gs"]), before, "after the refused momentum")
    assert int(a["codes"].min()) == 3


def _op_step(dev, **kw):
    a = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in _step_args().items()}
    a.update(kw)
    return torch.ops.fedmpq.bitplane_step(a["codes"], a["sign"], a["mom"], a["gs"], a["grad"], a["coef"], a["scale"],
                                          a["bits"], a["lr"], a["momentum"], a["key"])


def _u8(n, d):
    return torch.zeros(n, dtype=torch.uint8, device=d)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda d: torch.ops.fedmpq.binarize(torch.randn(40, device=d), 0), ValueError, "bits must be in 1..8"),
        (lambda d: torch.ops.fedmpq.binarize(_u8(40, d), 3), TypeError, "w must be a floating-point"),
        (lambda d: torch.ops.fedmpq.dequantize(_u8(40, d), _u8(4, d), torch.tensor(1.0, device=d), 3,
                                               torch.empty(40, device=d)), ValueError, "sign has 4 bytes, 8 needed"),
        (lambda d: torch.ops.fedmpq.dequantize(_u8(40, d), _u8(8, d), torch.tensor(1.0, device=d), 3,
                                               torch.empty(41, device=d)), ValueError, "sink has 41 elements, codes 40"),
        (lambda d: torch.ops.fedmpq.dequantize(_u8(40, d), _u8(8, d), torch.tensor(1.0, device=d), 9,
                                               torch.empty(40, device=d)), ValueError, "bits must be in 1..8"),
        (lambda d: torch.ops.fedmpq.dequantize_backward(torch.ones(5, device=d), _u8(40, d), _u8(8, d), 3),
         ValueError, "grad has 5 elements, codes 40"),
        (lambda d: torch.ops.fedmpq.dequantize_backward(torch.ones(1, device=d), _u8(40, d), _u8(8, d), 3),
         ValueError, "grad has 1 elements, codes 40"),  # the reference would broadcast it
        (lambda d: torch.ops.fedmpq.dequantize_backward(torch.ones(40, device=d), _u8(40, d), _u8(4, d), 3),
         ValueError, "sign has 4 bytes"),
        (lambda d: torch.ops.fedmpq.plane_popcounts(_u8(40, d), 9), ValueError, "bits must be in 1..8"),
        (lambda d: torch.ops.fedmpq.plane_popcounts(_u8(40, d), 0), ValueError, "bits must be in 1..8"),
        (lambda d: _op_step(d, grad=torch.zeros(5, device=d)), ValueError, "grad has 5 elements, codes 40"),
        (lambda d: _op_step(d, mom=_u8(10, d)), ValueError, "mom must be a contiguous uint8 tensor of 3\\*40"),
        (lambda d: _op_step(d, coef=torch.zeros(1, device=d)), ValueError, "coef must hold 3 values"),
        (lambda d: _op_step(d, sign=_u8(1, d)), ValueError, "sign has 1 bytes"),
        (lambda d: _op_step(d, bits=9), ValueError, "bits must be in 1..8"),
        (lambda d: _op_step(d, lr=float("nan")), ValueError, "lr must be a finite number"),
        (lambda d: _op_step(d, momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
        (lambda d: _op_step(d, key=-1), ValueError, "key must be a uint32"),
    ],
)
def test_registered_ops_called_directly_refuse_bad_arguments(backend, call, exc, match):
    """torch.ops.fedmpq.* called directly (not through the public functions) checks its
    arguments on every backend before a kernel sees them: before, the Triton and reference
    backends took a short grad, mom or sign (a short mom crashed the Triton interpreter) and
    a width out of range, and the CPU step read past a short grad."""
    kernels(backend)
    with backend.active(), pytest.raises(exc, match=match):
        call(backend.device)


@pytest.mark.parametrize("codes, theta, match", [
    ([1, 8], 10.0, r"a code is >= 2\^3"),  # 2^N itself does not fit in N = 3 bits
    ([1, 200], 10.0, r"a code is >= 2\^3"),
    ([1, 3], float("nan"), "theta must be a finite number >= 0"),
    ([1, 3], float("inf"), "theta must be a finite number >= 0"),  # would drop every plane it can
    ([1, 3], -1.0, "theta must be a finite number >= 0"),
    ([1, 3], True, "theta must be a finite number >= 0"),
])
def test_precision_reduction_refuses_codes_that_do_not_fit_and_a_bad_theta(codes, theta, match):
    """precision_reduction counts set bits of the N planes: a code of 2^N or more has bits
    above them (it would be silently cut), and theta is a finite percentage (NaN compared
    false everywhere and kept every plane; inf dropped planes that are set)."""
    with pytest.raises(ValueError, match=match):
        fk.precision_reduction(torch.tensor(codes, dtype=torch.uint8), torch.tensor(1.0), 3, theta)
    n, c, s = fk.precision_reduction(torch.tensor([1, 7], dtype=torch.uint8), torch.tensor(1.0), 3, 10.0)
    assert (n, c.tolist()) == (3, [1, 7])  # 2^N - 1 fits; both planes' bits above theta: nothing dropped


def test_group_lasso_refuses_popcounts_of_another_width_and_a_bad_n():
    """popcounts of 4 planes with bits=3 gave a (4,) coefficient and a wrong R, and a
    negative n a negative R, silently."""
    pc = torch.tensor([3, 1, 4, 1])
    R, c = fk.group_lasso(pc, 10, 4)
    assert R.shape == () and c.shape == (4,)
    with pytest.raises(ValueError, match="popcounts must hold 3 values"):
        fk.group_lasso(pc, 10, 3)
    with pytest.raises(ValueError, match="n must be an int >= 0, got -1"):
        fk.group_lasso(pc, -1, 4)
    for n in (2.5, True):
        with pytest.raises(TypeError, match="n must be an int >= 0, got"):
            fk.group_lasso(pc, n, 4)
    with pytest.raises(TypeError, match="popcounts must be a torch.Tensor"):
        fk.group_lasso([3, 1, 4, 1], 10, 4)
    # counts only: float ones took NaN and inf (a NaN coefficient skips every later step of
    # the layer), a bool True counted 1; a (2, 2) tensor gave (2, 2) coefficients; a huge n
    # was a bare OverflowError
    for bad in (torch.tensor([3.0, float("nan")]), torch.tensor([3.0, 1.0]), torch.tensor([1 + 0j, 2 + 0j]),
                torch.tensor([True, False])):
        with pytest.raises(TypeError, match="popcounts must be an integer tensor"):
            fk.group_lasso(bad, 10, 2)
    with pytest.raises(ValueError, match=r"popcounts must hold 4 values \(one per plane\) in one dimension"):
        fk.group_lasso(pc.reshape(2, 2), 10, 4)
    with pytest.raises(ValueError, match="n must be below 2\\*\\*63"):
        fk.group_lasso(pc, 10**400, 4)
    for dt in (torch.int32, torch.uint8, torch.int16):  # any integer dtype: the same result
        assert torch.equal(fk.group_lasso(pc.to(dt), 10, 4)[1], c)


def test_binarize_compiles_with_fullgraph_and_its_op_still_refuses_nan():
    """The public function's host read of w's values was a data-dependent branch: torch.compile
    with fullgraph=True stopped on it. The registered op checks the scale when it runs."""
    torch._dynamo.reset()
    cf = torch.compile(lambda w: fk.binarize(w * 2, 4), fullgraph=True, backend="aot_eager")
    w = torch.tensor([0.25, -0.5, 0.125, 0.0, -0.0625])
    for got, want in zip(cf(w), fk.binarize(w * 2, 4)):
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="NaN or inf"):
        cf(torch.tensor([0.25, float("nan"), 0.125, 0.0, 1.0]))


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, torch.complex64])
def test_a_step_refuses_a_grad_or_coef_that_is_not_floating_point(bad):
    """.float() took ints and bools as gradients and a complex one's real part (a warning)."""
    n, bits = 5, 2
    state = [torch.zeros(n, dtype=torch.uint8), torch.zeros(4, dtype=torch.uint8), torch.zeros(bits, n, dtype=torch.uint8),
             torch.zeros(1)]
    with pytest.raises(TypeError, match=f"^grad must be a floating-point tensor, got {bad}"):
        fk.bitplane_step(*state, torch.ones(n, dtype=bad), torch.zeros(bits), torch.tensor(1.0), bits, 0.5, 0.9, 1)
    with pytest.raises(TypeError, match=f"^coef must be a floating-point tensor, got {bad}"):
        fk.bitplane_step(*state, torch.ones(n), torch.zeros(bits, dtype=bad), torch.tensor(1.0), bits, 0.5, 0.9, 1)


def test_precision_reduction_returns_codes_of_n_whatever_their_shape_and_takes_a_negative_scale():
    """Codes (0, 3) came back (0, 3), not (n,) as documented. A trained scale may be negative
    (the wire folds its sign into the signs): reduced as the reference reduces a positive one."""
    assert fk.precision_reduction(torch.zeros(0, 3, dtype=torch.uint8), torch.tensor(1.0), 4, 5.0)[1].shape == (0,)
    codes = torch.tensor([[1, 3], [2, 0]], dtype=torch.uint8)
    got = fk.precision_reduction(codes, torch.tensor(1.0), 4, 5.0)
    # by hand: planes 3 and 2 are empty (dropped), plane 1 holds 2 of 4 codes (50 % >= 5 %:
    # kept), plane 0 too; the codes stay, the scale becomes 1 * 3 / 15
    assert got[0] == 2 and got[1].tolist() == [1, 3, 2, 0]
    assert float(got[2]) == float(torch.tensor(3.0) / torch.tensor(15.0))
    n, c, s = fk.precision_reduction(codes, torch.tensor(-2.0), 4, 5.0)
    n2, c2, s2 = fk.precision_reduction(codes, torch.tensor(2.0), 4, 5.0)
    assert n == n2 and torch.equal(c, c2) and float(s) == -float(s2)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_precision_reduction_keeps_a_huge_scale_finite(sign):
    """The float32 order s * 2^k * (2^N - 1) / (2^N0 - 1) passed float32's range for a scale
    above ~1.3e36 at 8 bits: an inf scale from a finite state, nothing dropped or the LSB
    dropped. The result is at most |s|: float64 then, rounded to float32; a scale the float32
    order keeps finite keeps its bits."""
    full = torch.tensor([255, 1, 3, 7], dtype=torch.uint8)  # every plane set somewhere: nothing dropped
    for s in (2e36, 1e38, 3.4e38):
        n, c, out = fk.precision_reduction(full, torch.tensor(sign * s), 8, 0.0)
        assert n == 8 and torch.equal(c, full) and float(out) == float(torch.tensor(sign * s))
    even = torch.tensor([14, 2, 4, 6], dtype=torch.uint8)  # the LSB plane empty: dropped, s doubled
    n, c, out = fk.precision_reduction(even, torch.tensor(sign * 2e38), 4, 0.0)
    assert n == 3 and c.tolist() == [7, 1, 2, 3]
    assert float(out) == float(torch.tensor(sign * 2e38 * 2 * 7 / 15))
    n, c, out = fk.precision_reduction(even, torch.tensor(sign * 1e30), 4, 0.0)  # finite in float32: its order
    assert float(out) == float((torch.tensor(sign * 1e30) * 2 * 7.0) / torch.tensor(15.0))


def test_step_key_takes_integers_of_any_kind_mod_2_32():
    want = fk.step_key(7, 2**32 + 5, 3)
    assert want == fk.step_key(np.int64(7), np.uint16(5), np.int8(3)) == fk.step_key(7 - 2**32, 5, 3)
    assert type(fk.step_key(np.int64(7), 5, 3)) is int


def test_step_takes_the_float32_edges_of_lr_and_momentum():
    """The smallest lr float32 keeps (2**-149) and the largest momentum below 1 float32 has
    (1 - 2**-24) are accepted by the single-layer step and the layers' step, on their usual
    (fast) paths and through the general one (a NumPy float); just beyond them is refused
    (test_op_checks' cases)."""
    import numpy as np
    for lr, momentum in ((2.0**-149, 0.0), (0.1, 1 - 2.0**-24), (np.float64(2.0**-149), np.float64(1 - 2.0**-24))):
        a = _step_args(lr=lr, momentum=momentum)
        assert fk.bitplane_step(**a).shape == ()
        out = fk.bitplane_step_layers([a["codes"]], [a["sign"]], [a["mom"]], [a["gs"]], [a["grad"]], [a["coef"]],
                                      [a["scale"]], [a["bits"]], lr, momentum, [5])
        assert out.shape == (1,)
