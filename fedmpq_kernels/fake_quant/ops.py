"""Fake-quant's ops: torch.library schemas, fake (meta) impls, autograd, and the public
:func:`fake_quant`. The math and bitmap layout are in :mod:`.reference`. The device impl
asks the registry which backend runs (reference / cpu / cuda / triton).
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from .. import registry
from .._checks import bitmap_nbytes, check_bits, check_float_tensor, check_scale_value, check_ste
from .._library import _eager, lib

Tensor = torch.Tensor

# mode: 0 = identity STE (no bitmaps), 1 = clipped STE (pass bitmap),
#       2 = clipped STE with a scale gradient (pass and hi bitmaps).
lib.define("fake_quant(Tensor x, int bits, Tensor? scale, int mode) -> (Tensor, Tensor, Tensor)")
lib.define("fake_quant_backward(Tensor grad, Tensor pass_bits, Tensor hi_bits, bool scale_grad) -> (Tensor, Tensor)")


def _fake_quant_impl(x: Tensor, bits: int, scale: Optional[Tensor], mode: int):
    if scale is not None and scale.device.type == "cpu":
        # Free to read on the CPU; a device scale is checked by the kernels (NaN output)
        # so that no call synchronizes.
        check_scale_value(float(scale))
    return registry.get("fake_quant", "fake_quant", x.device.type)(x, bits, scale, mode)


def _fake_quant_backward_impl(grad: Tensor, pass_bits: Tensor, hi_bits: Tensor, scale_grad: bool):
    return registry.get("fake_quant", "fake_quant_backward", grad.device.type)(grad, pass_bits, hi_bits, scale_grad)


lib.impl("fake_quant", _fake_quant_impl, "CompositeExplicitAutograd")
lib.impl("fake_quant_backward", _fake_quant_backward_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fedmpq::fake_quant")
def _fake_quant_fake(x, bits, scale, mode):
    nb = bitmap_nbytes(x.numel())
    return (
        x.new_empty(x.shape),
        x.new_empty((nb if mode >= 1 else 0,), dtype=torch.uint8),
        x.new_empty((nb if mode == 2 else 0,), dtype=torch.uint8),
    )


@torch.library.register_fake("fedmpq::fake_quant_backward")
def _fake_quant_backward_fake(grad, pass_bits, hi_bits, scale_grad):
    return grad.new_empty(grad.shape), grad.new_empty((), dtype=torch.float32)


def _fq_setup_context(ctx, inputs, output):
    _, _, scale, mode = inputs
    _, pass_bits, hi_bits = output
    ctx.mode = mode
    ctx.scale_grad = mode == 2 and scale is not None
    if mode:
        ctx.save_for_backward(pass_bits, hi_bits)


def _fq_grads(ctx, grad_y, backward):
    """The gradient rule, shared by both autograd paths; ``backward`` runs the kernel."""
    if ctx.mode == 0:  # identity STE: the incoming gradient, unchanged
        return grad_y, None, None, None
    pass_bits, hi_bits = ctx.saved_tensors
    grad_x, grad_scale = backward(grad_y, pass_bits, hi_bits, ctx.scale_grad)
    return grad_x, None, (grad_scale if ctx.scale_grad else None), None


def _fq_backward(ctx, grad_y, _grad_pass, _grad_hi):
    return _fq_grads(ctx, grad_y, torch.ops.fedmpq.fake_quant_backward)


torch.library.register_autograd("fedmpq::fake_quant", _fq_backward, setup_context=_fq_setup_context, lib=lib)


class _FakeQuantEager(torch.autograd.Function):
    """The same autograd rule as the registered op, for plain eager tensors: it skips the
    dispatcher round trip and torch.library's generic autograd wrapper, which cost about
    a hundred microseconds a call (a client step makes ~100 calls). Anything traced
    (torch.compile, fake or subclass tensors) goes through ``torch.ops.fedmpq``."""

    @staticmethod
    def forward(ctx, x, bits, scale, mode):
        y, pass_bits, hi_bits = _fake_quant_impl(x, bits, scale, mode)
        _fq_setup_context(ctx, (x, bits, scale, mode), (y, pass_bits, hi_bits))
        ctx.mark_non_differentiable(pass_bits, hi_bits)
        return y, pass_bits, hi_bits

    @staticmethod
    def backward(ctx, grad_y, grad_pass, grad_hi):
        return _fq_grads(ctx, grad_y, _fake_quant_backward_impl)


def _scale_tensor(scale, x: Tensor) -> Optional[Tensor]:
    if scale is None:
        return None
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"scale must be a floating-point tensor, got {scale.dtype}")
        if scale.numel() != 1:
            raise ValueError(f"scale must hold one value (a 0-dim tensor), got shape {tuple(scale.shape)}")
        if scale.device != x.device:
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
            float32 and returned in their dtype); empty tensors work; NaN propagates
            (a NaN anywhere makes a dynamic S, hence every output, NaN).
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
        Tensor of x's shape and dtype (contiguous).

    Raises:
        TypeError: x not a float tensor, bits not an int, scale of a wrong type.
        ValueError: bits outside 1..8/16, scale <= 0 / NaN / inf / not one value / on
            another device, unknown ``ste``.
    """
    check_float_tensor(x)
    bits = check_bits(bits, float_ok=True)
    check_ste(ste)
    s = _scale_tensor(scale, x)
    grad = torch.is_grad_enabled() and (x.requires_grad or (s is not None and s.requires_grad))
    mode = 0
    if grad and ste == "clipped" and s is not None:
        mode = 2 if s.requires_grad else 1
    if _eager(x):
        if not grad:
            return _fake_quant_impl(x, bits, s, 0)[0]
        return _FakeQuantEager.apply(x, bits, s, mode)[0]
    return torch.ops.fedmpq.fake_quant(x, bits, s, mode)[0]


# ---- ReLU6 fused with the dynamic-scale quantizer (the activations of a quantized model) ----
lib.define("relu6_fake_quant(Tensor x, int bits) -> (Tensor, Tensor)")


def _relu6_fake_quant_impl(x: Tensor, bits: int):
    return registry.get("fake_quant", "relu6_fake_quant", x.device.type)(x, bits)


lib.impl("relu6_fake_quant", _relu6_fake_quant_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fedmpq::relu6_fake_quant")
def _relu6_fake_quant_fake(x, bits):
    return x.new_empty(x.shape), x.new_empty((bitmap_nbytes(x.numel()),), dtype=torch.uint8)


def _r6_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _r6_backward(ctx, grad_y, _grad_mask):
    (mask,) = ctx.saved_tensors
    return torch.ops.fedmpq.fake_quant_backward(grad_y, mask, mask, False)[0], None


torch.library.register_autograd("fedmpq::relu6_fake_quant", _r6_backward, setup_context=_r6_setup_context, lib=lib)


class _Relu6FakeQuantEager(torch.autograd.Function):
    """The registered op's autograd rule for plain eager tensors (see _FakeQuantEager)."""

    @staticmethod
    def forward(ctx, x, bits):
        y, mask = _relu6_fake_quant_impl(x, bits)
        ctx.save_for_backward(mask)
        ctx.mark_non_differentiable(mask)
        return y, mask

    @staticmethod
    def backward(ctx, grad_y, _grad_mask):
        (mask,) = ctx.saved_tensors
        return _fake_quant_backward_impl(grad_y, mask, mask, False)[0], None


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
        Tensor of x's shape and dtype (contiguous).
    """
    check_float_tensor(x)
    bits = check_bits(bits, float_ok=True)
    if _eager(x):
        if torch.is_grad_enabled() and x.requires_grad:
            return _Relu6FakeQuantEager.apply(x, bits)[0]
        return _relu6_fake_quant_impl(x, bits)[0]
    return torch.ops.fedmpq.relu6_fake_quant(x, bits)[0]
