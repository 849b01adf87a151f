"""Fake-quant's ops: torch.library schemas, fake (meta) impls, autograd, and the public
:func:`fake_quant`. The math and bitmap layout are in :mod:`.reference`. The device impl
asks the registry which backend runs (reference / cpu / cuda / triton).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Union

import torch

from .. import registry
from .._checks import (ALLOWED_BITS, FLOAT_DTYPES, bitmap_nbytes, check_bits, check_float_tensor,
                       check_same_device, check_scale_value, check_ste)
from .._library import PLAIN, _dispatch_modes, _eager, _functorch_active, _is_wrapped, direct_apply, lib
from . import reference as _ref

Tensor = torch.Tensor

# mode: 0 = identity STE (no bitmaps), 1 = clipped STE (pass bitmap),
#       2 = clipped STE with a scale gradient (pass and hi bitmaps).
# The forward returns (y, bitmaps): `mode` bitmaps of bitmap_nbytes(n) bytes back to back in
# one uint8 tensor (the pass bitmap, then the hi bitmap), one allocation and one saved tensor.
lib.define("fake_quant(Tensor x, int bits, Tensor? scale, int mode) -> (Tensor, Tensor)")
lib.define("fake_quant_backward(Tensor grad, Tensor bitmaps, bool scale_grad) -> (Tensor, Tensor)")


# The registered ops' impls check their arguments themselves: the public functions call the
# backends directly (after their own checks, below), so these run only for a direct call of
# torch.ops.fedmpq.* or a compiled graph, and no backend is handed a width, mode or scale it
# would misread.
def _check_op_scale(scale: Optional[Tensor], x: Tensor, mode: int) -> None:
    if mode not in (0, 1, 2):
        raise ValueError(f"mode must be 0 (identity STE), 1 (clipped) or 2 (clipped, scale gradient), got {mode}")
    if scale is None:  # a dynamic scale clips nothing: modes 1 and 2 give all-pass bitmaps
        return
    if not scale.is_floating_point() or scale.numel() != 1:
        raise ValueError(f"scale must be a one-element floating-point tensor, got {scale.dtype} of shape "
                         f"{tuple(scale.shape)}")
    check_same_device(x.device, "x", scale=scale)
    if scale.device.type == "cpu":
        # Free to read on the CPU; a device scale is checked by the kernels (NaN output)
        # so that no call synchronizes.
        check_scale_value(float(scale))


def _fake_quant_impl(x: Tensor, bits: int, scale: Optional[Tensor], mode: int):
    check_float_tensor(x)
    check_bits(bits, float_ok=True)
    _check_op_scale(scale, x, mode)
    y, bitmaps = registry.get("fake_quant", "fake_quant", x.device.type)(x, bits, scale, mode)
    if mode == 0:  # a backend may share one empty tensor for them; an op's outputs are fresh
        bitmaps = x.new_empty(0, dtype=torch.uint8)
    return y, bitmaps


def _fake_quant_backward_impl(grad: Tensor, bitmaps: Tensor, scale_grad: bool):
    check_float_tensor(grad, "grad")  # the bitmaps: every backend takes them through bitmap_arg
    return registry.get("fake_quant", "fake_quant_backward", grad.device.type)(grad, bitmaps, scale_grad)


lib.impl("fake_quant", _fake_quant_impl, "CompositeExplicitAutograd")
lib.impl("fake_quant_backward", _fake_quant_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fedmpq::fake_quant")
def _fake_quant_fake(x, bits, scale, mode):
    check_same_device(x.device, "x", scale=scale)
    return x.new_empty(x.shape), x.new_empty((bitmap_nbytes(x.numel()) * mode,), dtype=torch.uint8)


@torch.library.register_fake("fedmpq::fake_quant_backward")
def _fake_quant_backward_fake(grad, bitmaps, scale_grad):
    check_same_device(grad.device, "grad", bitmaps=bitmaps)
    return grad.new_empty(grad.shape), grad.new_empty((), dtype=torch.float32)


def _fq_setup_context(ctx, inputs, output):
    _, _, scale, mode = inputs
    # The bitmaps are a uint8 output without a gradient: no zero-filled tensor made for it.
    ctx.set_materialize_grads(False)
    ctx.mode = mode
    ctx.scale_grad = mode == 2 and scale is not None
    if mode:
        ctx.save_for_backward(output[1])


def _fq_grads(ctx, grad_y, backward):
    """The gradient rule, shared by both autograd paths; ``backward`` runs the kernel.
    grad_y is None when y was not used (grads are not materialized)."""
    if grad_y is None or ctx.mode == 0:  # identity STE: the incoming gradient, unchanged
        return grad_y, None, None, None
    (bitmaps,) = ctx.saved_tensors
    if grad_y.requires_grad:  # create_graph: a backward differentiable in grad_y (see _FakeQuantEager)
        backward = _ref.fake_quant_backward
    grad_x, grad_scale = backward(grad_y, bitmaps, ctx.scale_grad)
    return grad_x, None, (grad_scale if ctx.scale_grad else None), None


def _fq_backward(ctx, grad_y, _grad_bitmaps):
    return _fq_grads(ctx, grad_y, torch.ops.fedmpq.fake_quant_backward)


torch.library.register_autograd("fedmpq::fake_quant", _fq_backward, setup_context=_fq_setup_context, lib=lib)


# ---- channels-last tensors: computed in their memory order, returned in their layout -----
# A 4-d channels_last (5-d channels_last_3d) tensor that is not also contiguous is, permuted to
# (N, H, W, C), a contiguous view: the backends, which read and write in memory order, take it
# without the copy .contiguous() would make, and the output permuted back has x's layout (a
# conv net run channels-last stays so, as it does through torch's own elementwise ops). The
# bitmaps are then in that memory order, so the backward permutes its gradient the same way.
# Only the eager paths do this: the registered ops keep their contiguous outputs (their fake
# impls say so to torch.compile).
_CL, _CL3 = torch.channels_last, torch.channels_last_3d
_TO_LAST = (None, None, None, None, (0, 2, 3, 1), (0, 2, 3, 4, 1))
_FROM_LAST = (None, None, None, None, (0, 3, 1, 2), (0, 4, 1, 2, 3))


def _channels_last(x: Tensor) -> int:
    """x's dimension count (4 or 5) when x is channels-last and not contiguous, else 0. Called
    once ``x.is_contiguous()`` is False: a contiguous tensor costs one check."""
    d = x.dim()
    if d == 4:
        return 4 if x.is_contiguous(memory_format=_CL) else 0
    if d == 5:
        return 5 if x.is_contiguous(memory_format=_CL3) else 0
    return 0


def _last(t: Tensor, d: int) -> Tensor:
    """t (d-dim, x's shape) as the (N, ..., C) view whose logical order is x's memory order."""
    return t.permute(_TO_LAST[d])


def _back(t: Tensor, d: int) -> Tensor:
    """A result computed on :func:`_last`'s view, in x's shape and layout. Detached: a tensor
    of its own to autograd, not a view (an in-place op on the output stays allowed)."""
    return t.permute(_FROM_LAST[d]).detach()


def _eager_function(fwd, bwd, mode: int, as_tensor=None):
    """The same autograd rule as the registered op, for plain eager tensors, at the least
    host cost per call (a client step makes ~100 calls): ``apply(x, scale, bits) -> y`` of an
    autograd.Function over one backend's forward ``fwd`` and backward ``bwd`` in ``mode``.
    No dispatcher round trip and no torch.library autograd wrapper; one output (the bitmaps
    stay inside, so autograd has no uint8 outputs to materialize zero gradients for); the
    backend functions and the mode are closed over, not passed and kept per call (two
    arguments and a ctx attribute fewer: about 1 µs of a 1-element forward+backward).
    ``as_tensor`` given: ``fwd``/``bwd`` are a backend's kept forms (cpu.py), whose bitmaps
    are not a tensor but an object kept on ctx, and ``as_tensor`` makes a uint8 tensor of it
    for the reference rule; else the bitmaps are a uint8 tensor saved for backward.
    Anything traced (torch.compile, fake or subclass tensors, functorch) goes through
    ``torch.ops.fedmpq``."""
    scale_grad = mode == 2  # chosen because the scale requires grad
    on_ctx = as_tensor is not None

    class _FakeQuantEager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, scale, bits):
            d = 0 if x.is_contiguous() else _channels_last(x)
            y, bitmaps = fwd(_last(x, d) if d else x, bits, scale, mode)
            if mode:
                ctx.last = d  # the bitmaps' order: x's memory order
                if on_ctx:
                    ctx.kept = bitmaps
                else:
                    ctx.save_for_backward(bitmaps)
            return _back(y, d) if d else y

        @staticmethod
        def backward(ctx, grad_y):
            # One output, so grad_y is always a tensor (nothing to materialize).
            if not mode:  # identity STE: the incoming gradient, unchanged
                return grad_y, None, None
            bitmaps = ctx.kept if on_ctx else ctx.saved_tensors[0]
            d = ctx.last
            g = _last(grad_y, d) if d else grad_y  # in the bitmaps' order
            if grad_y.requires_grad:
                # create_graph (a gradient penalty, second-order methods): the kernels' outputs
                # carry no graph, so the pure-torch rule, differentiable in grad_y, runs instead.
                grad_x, grad_scale = _ref.fake_quant_backward(g, as_tensor(bitmaps) if on_ctx else bitmaps, scale_grad)
            else:
                grad_x, grad_scale = bwd(g, bitmaps, scale_grad)
            if d:  # back to x's shape (a plain permute: under create_graph it stays differentiable)
                grad_x = grad_x.permute(_FROM_LAST[d])
            return grad_x, (grad_scale if scale_grad else None), None

    return direct_apply(_FakeQuantEager)


# device type -> (the backend's forward, the eager Function's apply in mode 0, 1, 2): one
# dict lookup per call after the first.
_EAGER = registry.derived_cache()
# A backend's kept forms (registry.companions): modes 1 and 2 (a given scale) and ReLU6.
_FQ_KEPT = ("fake_quant_kept", "fake_quant_backward_kept", "kept_tensor")
_R6_KEPT = ("relu6_fake_quant_kept", "fake_quant_backward_kept", "kept_tensor")
_R6_VALUES = ("relu6_fake_quant_values",)  # y alone, no mask written: a backend's form for no gradient


def _eager_for(device_type: str):
    def make():
        fns = fwd, bwd = registry.get_many("fake_quant", _FQ_OPS, device_type)
        kept = registry.companions(fns, _FQ_KEPT)
        clipped = [_eager_function(fwd, bwd, m) if kept is None else _eager_function(*kept[:2], m, kept[2])
                   for m in (1, 2)]
        return (fwd, _eager_function(fwd, bwd, 0), *clipped)

    return registry.remember(_EAGER, device_type, make)


_FQ_OPS = ("fake_quant", "fake_quant_backward")
_BITS_OK = frozenset(ALLOWED_BITS)
_FLOAT_SET = frozenset(FLOAT_DTYPES)
_F32 = torch.float32
_grad_enabled = torch.is_grad_enabled
_is_compiling = torch.compiler.is_compiling


def _fq_values(fwd, x: Tensor, bits: int, s: Optional[Tensor]) -> Tensor:
    """The backend forward ``fwd``'s y alone (no bitmaps: mode 0), in x's layout."""
    if x.is_contiguous() or not (d := _channels_last(x)):
        return fwd(x, bits, s, 0)[0]
    return _back(fwd(_last(x, d), bits, s, 0)[0], d)


def _scale_tensor(scale, x: Tensor) -> Optional[Tensor]:
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
        if scale.numel() != 1:
            raise ValueError(f"scale must hold one value (a 0-dim tensor), got shape {tuple(scale.shape)}")
        if not (scale.is_cpu and x.is_cpu) and scale.device != x.device:  # is_cpu: no device objects
            raise ValueError(f"scale is on {scale.device} but x is on {x.device}")
        if scale.dim() == 0 and scale.dtype == torch.float32:
            return scale  # the common case: no reshape/convert nodes per call
        return scale.reshape(()).to(torch.float32)  # differentiable: grads flow back to the caller's tensor
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None, a float or a 0-dim tensor, got {type(scale).__name__}")
    check_scale_value(float(scale))
    return torch.full((), float(scale), dtype=torch.float32, device=x.device)


def fake_quant(x: Tensor, bits: int, scale: Union[None, float, Tensor] = None, *, ste: str = "identity") -> Tensor:
    """FedMPQ's sign-magnitude symmetric fake-quantizer (ALGORITHM.md, "Activations").

    ``y = S * round(|x| * (2^b - 1) / S) / (2^b - 1) * sign(x)``, rounding half to even,
    with ``S = max|x|`` over the whole tensor when ``scale`` is None (S = 0 gives zeros),
    else ``S = scale`` and ``|x|`` clamped to S first. Computed in float32.

    Args:
        x: float32 tensor of any shape and strides (float16/bfloat16 are computed in
            float32 and returned in their dtype: a value the grid puts beyond float16's
            65504, under a given scale above it, narrows to +-inf); empty tensors work; NaN
            propagates (a NaN anywhere makes a dynamic S, hence every output, NaN). At the
            edges of float32's range the float32 order shows: S = FLT_MAX gives +-inf at
            5, 7 and 16 bits (S / L rounds up), on every backend alike. An S below 2^-100
            (however small: down to 2^-149) keeps its grid: it is computed on S * 2^100 and
            scaled back (``L / S`` itself would overflow float32 below about 4e-38).
        bits: 1..8, or 16 for float-like evaluation.
        scale: None (dynamic), a Python float > 0, or a one-element floating tensor on
            x's device (finite, > 0; a CUDA scale is not read on the host, which would
            synchronize: a bad value there gives NaN outputs instead of an exception).
        ste: gradient rule.
            ``"identity"``: ``dL/dx = dL/dy`` (FedMPQ's rule); the scale gets no gradient.
            ``"clipped"``: ``dL/dx = dL/dy * [-S <= x <= S]`` (NaN counts as not clipped),
            from a 1-bit-per-element mask kept for backward; a scale tensor that requires
            grad receives PACT's clip-value gradient
            ``dL/dS = sum(dL/dy where x > S) - sum(dL/dy where x < -S)``
            (rounding is straight-through, so unclipped elements contribute nothing), for
            which a second bitmap (which side clipped) is kept. With a dynamic scale
            nothing is clipped and ``"clipped"`` equals ``"identity"``.

    Returns:
        Tensor of x's shape and dtype: channels-last when x is (4-d channels_last, 5-d
        channels_last_3d; computed in x's memory order, no copy), else contiguous. (The
        registered op, ``torch.ops.fedmpq.*``, always gives a contiguous one.)

    Raises:
        TypeError: x not a float tensor, bits not an int, scale of a wrong type.
        ValueError: bits outside 1..8/16, scale <= 0 / NaN / inf / not one value / on
            another device, unknown ``ste``.
    """
    # The common case first: plain eager tensors (not traced, no functorch or dispatch mode), a 0-dim
    # float32 scale tensor on x's device or None, its checks in their cheapest form. Anything
    # else takes the general path below, with the full checks and their messages.
    if (type(x) in PLAIN and x.dtype in _FLOAT_SET and type(bits) is int and bits in _BITS_OK
            and (ste == "identity" or ste == "clipped") and not _is_compiling() and not _dispatch_modes()
            and not _functorch_active() and not _is_wrapped(x)):
        on_cpu = x.is_cpu  # each tensor attribute read is ~0.1 µs: every one is read once
        if scale is None:
            s, s_grad = None, False
        elif (type(scale) in PLAIN and scale.dtype is _F32 and scale.dim() == 0 and not _is_wrapped(scale)
              and (scale.is_cpu if on_cpu else scale.device == x.device)):
            s, s_grad = scale, scale.requires_grad
            if on_cpu:
                v = s.item()  # free on the CPU (see _fake_quant_impl); item(), not float(): no warning
                if not 0.0 < v < math.inf:  # False for NaN too
                    check_scale_value(v)
        else:
            s = False  # not the common case
        if s is not False:
            dt = "cpu" if on_cpu else x.device.type
            e = _EAGER.get(dt) or _eager_for(dt)
            if not ((s_grad or x.requires_grad) and _grad_enabled()):
                return _fq_values(e[0], x, bits, s)
            if ste == "identity" or s is None:
                return e[1](x, s, bits)
            return e[3 if s_grad else 2](x, s, bits)

    check_float_tensor(x)
    bits = check_bits(bits, float_ok=True)
    check_ste(ste)
    s = _scale_tensor(scale, x)
    grad = torch.is_grad_enabled() and (x.requires_grad or (s is not None and s.requires_grad))
    mode = 0
    if ste == "clipped" and s is not None and torch.is_grad_enabled():
        if not _is_compiling() and (_functorch_active() or _is_wrapped(x) or _is_wrapped(s)):
            # A functorch wrapper (vmap's batched tensor) reports requires_grad False even
            # when the tensor it wraps requires grad, for autograd outside the transform:
            # keep both bitmaps, or the clipped STE would silently become the identity
            # (is_compiling first: dynamo cannot trace the two checks).
            mode = 2
        elif grad:
            mode = 2 if s.requires_grad else 1
    if _eager(x) and (s is None or not _is_wrapped(s)):
        e = _EAGER.get(x.device.type) or _eager_for(x.device.type)
        if s is not None and s.is_cpu:
            check_scale_value(s.item())
        if not grad:
            return _fq_values(e[0], x, bits, s)
        return e[1 + mode](x, s, bits)
    return torch.ops.fedmpq.fake_quant(x, bits, s, mode)[0]


# ---- ReLU6 fused with the dynamic-scale quantizer (the activations of a quantized model) ----
lib.define("relu6_fake_quant(Tensor x, int bits) -> (Tensor, Tensor)")


def _relu6_fake_quant_impl(x: Tensor, bits: int):
    check_float_tensor(x)
    check_bits(bits, float_ok=True)
    return registry.get("fake_quant", "relu6_fake_quant", x.device.type)(x, bits)


lib.impl("relu6_fake_quant", _relu6_fake_quant_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fedmpq::relu6_fake_quant")
def _relu6_fake_quant_fake(x, bits):
    return x.new_empty(x.shape), x.new_empty((bitmap_nbytes(x.numel()),), dtype=torch.uint8)


def _r6_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # no zero-filled gradient for the uint8 mask
    ctx.save_for_backward(output[1])


def _r6_backward(ctx, grad_y, _grad_mask):
    if grad_y is None:
        return None, None
    (mask,) = ctx.saved_tensors
    if grad_y.requires_grad:  # create_graph: differentiable in grad_y (see _FakeQuantEager)
        return _ref.fake_quant_backward(grad_y, mask, False)[0], None
    return torch.ops.fedmpq.fake_quant_backward(grad_y, mask, False)[0], None


torch.library.register_autograd("fedmpq::relu6_fake_quant", _r6_backward, setup_context=_r6_setup_context, lib=lib)


def _relu6_eager_function(fwd, bwd, as_tensor=None):
    """The registered op's autograd rule for plain eager tensors, ``apply(x, bits) -> y``
    (see :func:`_eager_function`, ``as_tensor`` included): one output, the mask kept inside,
    the backend's functions closed over."""
    on_ctx = as_tensor is not None

    class _Relu6FakeQuantEager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, bits):
            d = ctx.last = 0 if x.is_contiguous() else _channels_last(x)  # see _eager_function
            y, mask = fwd(_last(x, d) if d else x, bits)
            if on_ctx:
                ctx.kept = mask
            else:
                ctx.save_for_backward(mask)
            return _back(y, d) if d else y

        @staticmethod
        def backward(ctx, grad_y):
            mask = ctx.kept if on_ctx else ctx.saved_tensors[0]
            d = ctx.last
            g = _last(grad_y, d) if d else grad_y
            if grad_y.requires_grad:  # create_graph: see _eager_function
                grad_x = _ref.fake_quant_backward(g, as_tensor(mask) if on_ctx else mask, False)[0]
            else:
                grad_x = bwd(g, mask, False)[0]
            return (grad_x.permute(_FROM_LAST[d]) if d else grad_x), None

    return direct_apply(_Relu6FakeQuantEager)


_R6_OPS = ("relu6_fake_quant", "fake_quant_backward")
# as _EAGER: device type -> (y without a mask, for no gradient; the eager Function's apply)
_R6_EAGER = registry.derived_cache()


def _r6_for(device_type: str):
    def make():
        fns = fwd, bwd = registry.get_many("fake_quant", _R6_OPS, device_type)
        kept, values = registry.companions(fns, _R6_KEPT), registry.companions((fwd,), _R6_VALUES)
        return ((lambda x, bits: fwd(x, bits)[0]) if values is None else values[0],
                _relu6_eager_function(fwd, bwd) if kept is None else _relu6_eager_function(*kept))

    return registry.remember(_R6_EAGER, device_type, make)


def relu6_fake_quant(x: Tensor, bits: int = 4) -> Tensor:
    """ReLU6 then FedMPQ's dynamic-scale activation quantizer, in one pass each way.

    Forward: ``a = clamp(x, 0, 6)``, ``S = max a``, ``y = S * round(a * (2^b - 1) / S) /
    (2^b - 1)`` (float32 math, S = 0 gives zeros, NaN propagates). Backward: ReLU6's mask
    and the quantizer's identity STE, ``dL/dx = dL/dy * [0 < x < 6]``, from a 1-bit-per-
    element mask kept by the forward (:func:`fedmpq_kernels.fake_quant.reference.relu6_fake_quant`).

    Args:
        x: float32/float16/bfloat16 tensor, any shape and strides.
        bits: 1..8, or 16 (float in all but name, the server's evaluation).

    Returns:
        Tensor of x's shape and dtype: channels-last when x is (4-d channels_last, 5-d
        channels_last_3d; computed in x's memory order, no copy), else contiguous. (The
        registered op, ``torch.ops.fedmpq.*``, always gives a contiguous one.)
    """
    if type(x) is not Tensor or x.dtype not in FLOAT_DTYPES:
        check_float_tensor(x)
    if type(bits) is not int or bits not in _BITS_OK:
        bits = check_bits(bits, float_ok=True)
    if _eager(x):
        dt = "cpu" if x.is_cpu else x.device.type
        e = _R6_EAGER.get(dt) or _r6_for(dt)
        if x.requires_grad and _grad_enabled():
            return e[1](x, bits)
        if x.is_contiguous() or not (d := _channels_last(x)):
            return e[0](x, bits)
        return _back(e[0](_last(x, d), bits), d)  # in x's layout, as the Function's output
    return torch.ops.fedmpq.relu6_fake_quant(x, bits)[0]
