"""Bit-plane training's ops: torch.library schemas, fake (meta) impls, the autograd of
:func:`dequantize`, and the public functions. The math, the storage and the float32 order of
every step are stated in :mod:`.reference`.
"""
from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Mapping
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .. import registry
from .._checks import F32_INF_FROM, F32_POSITIVE_FROM, bitmap_nbytes, check_bits, check_same_device
from .._library import (PLAIN, _dispatch_modes, _eager, _functorch_active, _is_wrapped, bump_versions, direct_apply, lib,
                        register_inplace)
from . import reference as _ref

Tensor = torch.Tensor

lib.define("binarize(Tensor w, int bits) -> (Tensor, Tensor, Tensor)")
lib.define("dequantize(Tensor codes, Tensor sign, Tensor scale, int bits, Tensor sink) -> Tensor")
lib.define("dequantize_backward(Tensor grad, Tensor codes, Tensor sign, int bits) -> Tensor")
lib.define("plane_popcounts(Tensor codes, int bits) -> Tensor")
# key_tensor: the key on the device (a one-element int64 tensor, its low 32 bits); when
# given, the int key is ignored (the public function passes 0).
lib.define(
    "bitplane_step(Tensor(a!) codes, Tensor(b!) sign, Tensor(c!) mom, Tensor(d!) gs, Tensor grad, Tensor coef, "
    "Tensor scale, int bits, float lr, float momentum, int key, Tensor? key_tensor=None) -> Tensor"
)


def _get(op: str, t: Tensor):
    # is_cpu first: t.device.type makes a device object and a str (~0.4 µs)
    return registry.get("bitplane", op, "cpu" if t.is_cpu else t.device.type)


_U8, _F32 = torch.uint8, torch.float32
_grad_enabled = torch.is_grad_enabled
_requires_grad = operator.attrgetter("requires_grad")
_is_compiling = torch.compiler.is_compiling
_isfinite = math.isfinite
# op -> the CPU backend's function, the public functions' fast paths' lookup (one dict
# subscript instead of a registry.get call); emptied with every backend change.
_CPU_FN = registry.derived_cache()
_FLOATS = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _cpu_fn(op: str):
    return registry.remember(_CPU_FN, op, lambda: registry.get("bitplane", op, "cpu"))


def _cpu_usual(name: str, op: str):
    """The CPU backend's one-pass function ``name`` for the usual call of a many-layer op (in
    the module of its ``op``; False where that backend has none), kept in :data:`_CPU_FN`."""
    fn = _CPU_FN.get(name)
    if fn is None:
        fn = registry.remember(_CPU_FN, name, lambda: _layers_impl(registry.get("bitplane", op, "cpu"), name) or False)
    return fn


_SEQS = (list, tuple)  # the many-layer ops' fast paths take these lists; anything else goes through _layer_count


def _layer_count(codes, **lists) -> int:
    """L, the layers of a many-layer op's ``codes`` and ``lists`` (one entry per layer each):
    TypeError naming one that is not a sequence (``len()`` said "object of type 'NoneType'
    has no len()"), ValueError naming one of another length than codes."""
    for name, v in (("codes", codes), *lists.items()):
        if isinstance(v, (str, bytes, Mapping)) or not (hasattr(v, "__len__") and hasattr(v, "__getitem__")):
            raise TypeError(f"{name} must be a list or tuple, one entry per layer, got {type(v).__name__}")
    L = len(codes)
    for name, v in lists.items():
        if len(v) != L:
            raise ValueError(f"{name} has {len(v)} entries, codes {L}")
    return L


def _binarize_impl(w: Tensor, bits: int):
    return _get("binarize", w)(w, bits)


def _dequantize_impl(codes: Tensor, sign: Tensor, scale: Tensor, bits: int, sink: Tensor) -> Tensor:
    return _get("dequantize", codes)(codes, sign, scale, bits).view(sink.shape)


def _dequantize_backward_impl(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    return _get("dequantize_backward", codes)(grad, codes, sign, bits)


def _plane_popcounts_impl(codes: Tensor, bits: int) -> Tensor:
    return _get("plane_popcounts", codes)(codes, bits)


def _bitplane_step_impl(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor=None) -> Tensor:
    return _get("bitplane_step", codes)(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor)


# The registered ops check their arguments with the public functions' checks (below): those
# call the _impl functions directly, so these run only for a direct call of torch.ops.fedmpq.*
# or a compiled graph, and no backend is handed a buffer shorter than the sizes it is told.
def _binarize_op(w: Tensor, bits: int):
    bits = _check_binarize(w, bits)
    # a compiled graph's call too: it runs here, on real tensors
    return _binarized(_binarize_impl(w, bits), w, bits, _binarize_impl)


# Below this max|w|, L / max|w| may overflow float32 (at 8 bits; fewer bits, lower bounds).
_LIFT_BELOW = 255 / F32_INF_FROM
_LIFT = 2.0 ** 64


def _binarized(r, w: Tensor, bits: int, run):
    """binarize's results ``r`` of ``w``, checked, and made again where w is too small for the
    kernels' float32 order; ``run(w, bits)`` is the backend function that made them.

    The scale, max|w| in float32 with NaN propagated on every backend, is finite exactly when
    w is, as float32: one host read (torch.isfinite(w).all() was three ops on w and passed a
    float64 value beyond float32's range, binarized with an inf scale). Where L / max|w|
    overflows float32 (max|w| below about 7.5e-37 at 8 bits), every nonzero weight would get
    the top code: the codes and signs are those of w * 2^64 instead (a power of two: the same
    quotients |w| / max|w| exactly, in float32's normal range), the scale w's own."""
    v = r[2].item()
    if not _isfinite(v):
        raise ValueError("w holds NaN or inf (or a value beyond float32's range): it cannot be binarized")
    if 0.0 < v < _LIFT_BELOW and ((1 << bits) - 1) / v >= F32_INF_FROM:
        codes, sign, _ = run(w.detach().float() * _LIFT, bits)
        return codes, sign, r[2]
    return r


def _dequantize_op(codes: Tensor, sign: Tensor, scale: Tensor, bits: int, sink: Tensor) -> Tensor:
    return _dequantize_impl(codes, sign, scale, _check_dequantize(codes, sign, scale, bits, sink), sink)


def _dequantize_backward_op(grad: Tensor, codes: Tensor, sign: Tensor, bits: int) -> Tensor:
    n, bits = _state(codes, sign, bits)
    _tensor(grad, "grad", device=codes.device)
    if grad.numel() != n:
        raise ValueError(f"grad has {grad.numel()} elements, codes {n}")
    return _dequantize_backward_impl(grad, codes, sign, bits)


def _plane_popcounts_op(codes: Tensor, bits: int) -> Tensor:
    _tensor(codes, "codes", torch.uint8)
    return _plane_popcounts_impl(codes, check_bits(bits))


def _bitplane_step_op(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor=None) -> Tensor:
    bits, grad, coef = _step_layer(codes, sign, mom, gs, grad, coef, scale, bits, codes.device)
    _step_scalars(lr, momentum)
    key, key_tensor = _step_key(key if key_tensor is None else key_tensor, codes.device)
    return _bitplane_step_impl(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor)


for _name, _fn in [("binarize", _binarize_op), ("dequantize", _dequantize_op),
                   ("dequantize_backward", _dequantize_backward_op), ("plane_popcounts", _plane_popcounts_op),
                   ("bitplane_step", _bitplane_step_op)]:
    lib.impl(_name, _fn, "CompositeExplicitAutograd")
register_inplace("bitplane_step", ("codes", "sign", "mom", "gs"))
# The public functions' direct paths bump the codes and signs only: the state dequantize saves
# for its backward, the one an autograd graph holds (1.2 % more instructions in a 20-layer
# model's step). mom and gs are the optimizer's own; their bumps would cost as much again.


@torch.library.register_fake("fedmpq::binarize")
def _binarize_fake(w, bits):
    n = w.numel()
    return (w.new_empty((n,), dtype=torch.uint8), w.new_empty((bitmap_nbytes(n),), dtype=torch.uint8),
            w.new_empty((), dtype=torch.float32))


@torch.library.register_fake("fedmpq::dequantize")
def _dequantize_fake(codes, sign, scale, bits, sink):
    check_same_device(codes.device, "codes", sign=sign, scale=scale, sink=sink)
    return sink.new_empty(sink.shape, dtype=torch.float32)


@torch.library.register_fake("fedmpq::dequantize_backward")
def _dequantize_backward_fake(grad, codes, sign, bits):
    check_same_device(codes.device, "codes", grad=grad, sign=sign)
    return grad.new_empty((), dtype=torch.float32)


@torch.library.register_fake("fedmpq::plane_popcounts")
def _plane_popcounts_fake(codes, bits):
    return codes.new_empty((bits,), dtype=torch.int64)


@torch.library.register_fake("fedmpq::bitplane_step")
def _bitplane_step_fake(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key, key_tensor=None):
    check_same_device(codes.device, "codes", sign=sign, mom=mom, gs=gs, grad=grad, coef=coef, scale=scale,
                      key_tensor=key_tensor)
    return grad.new_empty((), dtype=torch.float32)


# ---- autograd of dequantize: the scale's gradient and the weight gradient G for the sink --
def _dq_setup_context(ctx, inputs, output):
    codes, sign, scale, bits, _sink = inputs
    ctx.bits, ctx.scale_shape = bits, scale.shape
    ctx.save_for_backward(codes, sign)


def _dq_grads(ctx, grad_w, backward):
    codes, sign = ctx.saved_tensors
    if grad_w.requires_grad:
        # create_graph (a gradient penalty, second-order methods): the kernels' dL/ds carries
        # no graph, so the pure-torch rule, differentiable in grad_w, runs instead.
        backward = _ref.dequantize_backward
    gscale = backward(grad_w.reshape(-1), codes, sign, ctx.bits) if ctx.needs_input_grad[2] else None
    if gscale is not None and ctx.scale_shape:  # a (1,)-shaped scale: dL/ds in its own shape, not 0-dim
        gscale = gscale.view(ctx.scale_shape)
    # The sink's gradient is G itself: the optimizer forms the per-plane gradients from it
    # in closed form (no N float plane-gradients are ever made).
    return None, None, gscale, None, (grad_w if ctx.needs_input_grad[4] else None)


def _dq_backward(ctx, grad_w):
    return _dq_grads(ctx, grad_w, torch.ops.fedmpq.dequantize_backward)


torch.library.register_autograd("fedmpq::dequantize", _dq_backward, setup_context=_dq_setup_context, lib=lib)


class _DequantizeEager(torch.autograd.Function):
    """The registered op's autograd rule for plain eager tensors, without the dispatcher
    round trip (see fake_quant/ops.py)."""

    @staticmethod
    def forward(ctx, codes, sign, scale, bits, sink):
        w = _dequantize_impl(codes, sign, scale, bits, sink)
        _dq_setup_context(ctx, (codes, sign, scale, bits, sink), w)
        return w

    @staticmethod
    def backward(ctx, grad_w):
        return _dq_grads(ctx, grad_w, _dequantize_backward_impl)


_dq_apply = direct_apply(_DequantizeEager)  # without Function.apply's wrapper (see _library)


def _dequantize_function(fwd, bwd, bits: int):
    """The same autograd rule, for the public function's fast path (plain eager CPU tensors,
    a 0-dim scale), at the least host cost: ``apply(codes, sign, scale, sink) -> w`` of a
    Function over one backend's forward ``fwd`` and backward ``bwd`` at width ``bits``,
    all three closed over (no ctx attribute, one argument fewer; the scale's gradient is
    0-dim, no shape to keep)."""

    class _DequantizeEager(torch.autograd.Function):  # the general one's name: the same node to a reader
        @staticmethod
        def forward(ctx, codes, sign, scale, sink):
            ctx.save_for_backward(codes, sign)
            w = fwd(codes, sign, scale, bits)  # (n,): a 1-D sink's shape already (a view costs ~1.5 µs)
            shape = sink.shape
            return w if len(shape) == 1 else w.view(shape)

        @staticmethod
        def backward(ctx, grad_w):
            need = ctx.needs_input_grad
            gscale = None
            if need[2]:
                codes, sign = ctx.saved_tensors
                # create_graph: the pure-torch rule, differentiable in grad_w (see _dq_grads)
                run = _ref.dequantize_backward if grad_w.requires_grad else bwd
                gscale = run(grad_w if grad_w.dim() == 1 else grad_w.reshape(-1), codes, sign, bits)
            return None, None, gscale, (grad_w if need[3] else None)

    return direct_apply(_DequantizeEager)


# bits -> (the CPU backend's dequantize, the fast path's Function's apply at that width)
_DQ_CPU = registry.derived_cache()


def _dq_cpu(bits: int):
    def make():
        fwd, bwd = registry.get_many("bitplane", ("dequantize", "dequantize_backward"), "cpu")  # one choice for both
        return fwd, _dequantize_function(fwd, bwd, bits)

    return registry.remember(_DQ_CPU, bits, make)


# ---- dequantize over many layers: one autograd node for a model's weights ------------------
def _dequantize_layers_impl(codes, sign, scale, bits, sink) -> list:
    """Every layer's weight, in its sink's shape, through the backend's op over many layers
    where it has one, else layer by layer."""
    single = _get("dequantize", codes[0])
    many = _layers_impl(single, "dequantize_layers")
    if many is not None:
        return many(codes, sign, scale, bits, [s.shape for s in sink])
    return [single(c, sg, sc, b).view(sk.shape) for c, sg, sc, b, sk in zip(codes, sign, scale, bits, sink)]


def _dequantize_backward_layers_impl(grads, codes, sign, bits) -> list:
    """dL/ds of every layer whose grads entry is a tensor (None elsewhere)."""
    live = [i for i, g in enumerate(grads) if g is not None]
    out = [None] * len(grads)
    if not live:
        return out
    single = _get("dequantize_backward", codes[0])
    many = _layers_impl(single, "dequantize_backward_layers")
    if many is not None:
        got = many([grads[i] for i in live], [codes[i] for i in live], [sign[i] for i in live], [bits[i] for i in live])
    else:
        got = [single(grads[i].reshape(-1), codes[i], sign[i], bits[i]) for i in live]
    for i, g in zip(live, got):
        out[i] = g
    return out


class _DequantizeLayersEager(torch.autograd.Function):
    """:func:`dequantize` of L layers as one autograd node (inputs: L, the widths, the weights
    when already made (a list, not an input: the CPU's one-pass check makes them) or None,
    then the codes, signs, scales and sinks of every layer): one Python forward and one
    backward for a model's weights instead of one each per layer. Outputs that get no
    gradient stay None in backward (no zero-filled gradients)."""

    @staticmethod
    def forward(ctx, L, bits, made, *t):
        codes, sign = t[:L], t[L:2 * L]
        ctx.set_materialize_grads(False)
        ctx.L, ctx.bits = L, bits
        ctx.save_for_backward(*codes, *sign)
        if made is not None:
            return tuple(made)
        return tuple(_dequantize_layers_impl(codes, sign, t[2 * L:3 * L], bits, t[3 * L:]))

    @staticmethod
    def backward(ctx, *grads):
        L = ctx.L
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        wanted = [g if need[3 + 2 * L + i] else None for i, g in enumerate(grads)]
        if torch.is_grad_enabled():  # create_graph: differentiable in the grads (see _dq_grads)
            gscale = [None if g is None else _ref.dequantize_backward(g, c, sg, b)
                      for g, c, sg, b in zip(wanted, saved[:L], saved[L:], ctx.bits)]
        else:
            gscale = _dequantize_backward_layers_impl(wanted, saved[:L], saved[L:], ctx.bits)
        gsink = [g if need[3 + 3 * L + i] else None for i, g in enumerate(grads)]
        return (None, None, None, *([None] * (2 * L)), *gscale, *gsink)


_dql_apply = direct_apply(_DequantizeLayersEager)


# ---- argument checks ---------------------------------------------------------------------
def _tensor(t, name: str, dtype=None, device=None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t


def _count(v, name: str) -> int:
    """An element count: an int (or NumPy integer) >= 0, not a bool; TypeError / ValueError
    naming ``name`` (int() truncated 2.7 to 2, and a negative one failed inside torch)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 0, got {type(v).__name__}")
    if v < 0:
        raise ValueError(f"{name} must be an int >= 0, got {v}")
    if v >= 1 << 63:  # torch's counts are int64 (10**400 was a bare OverflowError later)
        raise ValueError(f"{name} must be below 2**63, got {v}")
    return int(v)


def _key(key, hint: str = "") -> int:
    """A generator key (:func:`step_key`): an int in 0..2^32-1."""
    if not (type(key) is int or (not isinstance(key, bool) and isinstance(key, numbers.Integral))) \
            or not 0 <= key <= 0xFFFFFFFF:
        raise ValueError(f"key must be a uint32{hint}, got {key!r}")
    return int(key)


def _step_key(key, device) -> Tuple[int, Optional[Tensor]]:
    """bitplane_step's key: (the int key, None) or, for a key on the device, (0, the tensor)."""
    if isinstance(key, Tensor):
        if key.dtype != torch.int64:
            raise TypeError(f"key must be an int or a one-element torch.int64 tensor, got a tensor of {key.dtype}")
        if key.device != device:
            raise ValueError(f"key is on {key.device}, expected {device} (codes' device)")
        if key.numel() != 1:
            raise ValueError(f"key must be a one-element tensor, got shape {tuple(key.shape)}")
        return 0, key
    return _key(key, " (see step_key)"), None


def _state(codes, sign, bits) -> Tuple[int, int]:
    """Checks the (codes, sign) pair of one layer; returns (n, bits)."""
    _tensor(codes, "codes", torch.uint8)
    bits = check_bits(bits)
    n = codes.numel()
    _tensor(sign, "sign", torch.uint8, codes.device)
    if sign.numel() < bitmap_nbytes(n):
        raise ValueError(f"sign has {sign.numel()} bytes, {bitmap_nbytes(n)} needed for {n} weights")
    return n, bits


def _check_binarize(w, bits) -> int:
    """Checks binarize's arguments (not w's values); returns bits."""
    _tensor(w, "w")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    return check_bits(bits)


def _check_dequantize(codes, sign, scale, bits, sink) -> int:
    """Checks dequantize's arguments; returns bits."""
    n, bits = _state(codes, sign, bits)
    _scale(scale, codes.device)
    _sink(sink, n, codes.device)
    return bits


def _sink(sink, n: int, device) -> None:
    _tensor(sink, "sink", device=device)
    if sink.dtype != torch.float32:  # autograd would round G, sink.grad, to the sink's dtype
        raise TypeError(f"sink must be float32 (its gradient is the weight's gradient G), got {sink.dtype}")
    if sink.numel() != n:
        raise ValueError(f"sink has {sink.numel()} elements, codes {n}")


def _scale(scale, device) -> Tensor:
    _tensor(scale, "scale", device=device)
    if scale.dtype != torch.float32 or scale.numel() != 1:
        raise TypeError(f"scale must be a one-element float32 tensor, got {scale.dtype} of shape {tuple(scale.shape)}")
    return scale


def _step_layer(codes, sign, mom, gs, grad, coef, scale, bits, dev) -> Tuple[int, Tensor, Tensor]:
    """Checks one layer's arguments of :func:`bitplane_step` on ``dev``; returns (bits, grad
    as float32, coef as float32 (bits,))."""
    n, bits = _state(codes, sign, bits)
    if codes.device != dev:
        raise ValueError(f"codes is on {codes.device}, expected {dev}")
    _tensor(mom, "mom", torch.uint8, dev)
    if mom.numel() != bits * n or not mom.is_contiguous():
        raise ValueError(f"mom must be a contiguous uint8 tensor of {bits}*{n} elements, got {tuple(mom.shape)}")
    _tensor(gs, "gs", torch.float32, dev)
    if gs.numel() != 1:
        raise ValueError("gs must hold one float32")
    _tensor(grad, "grad", device=dev)
    if grad.numel() != n:
        raise ValueError(f"grad has {grad.numel()} elements, codes {n}")
    _tensor(coef, "coef", device=dev)
    if coef.numel() != bits:
        raise ValueError(f"coef must hold {bits} values (one per plane), got {coef.numel()}")
    if not (grad.is_floating_point() and coef.is_floating_point()):  # .float() took ints, bools, complex's real part
        name, t = ("grad", grad) if not grad.is_floating_point() else ("coef", coef)
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    _scale(scale, dev)
    if n >= 1 << 32:
        raise ValueError("a layer of 2^32 weights or more is not supported (the generator counts in 32 bits)")
    # grad keeps its shape (a layer's weight shape): every backend takes its n elements in
    # order (a reshape costs about 0.9 µs); coef is indexed by plane, so it is made 1-D
    if grad.dtype != torch.float32:
        grad = grad.float()
    if coef.dim() != 1:
        coef = coef.reshape(-1)
    if coef.dtype != torch.float32:
        coef = coef.float()
    return bits, grad, coef


# Every backend steps with float32(lr) and float32(momentum): an lr at or below 2^-150 is 0
# there (the step would move no code yet erase the momentum), a momentum at or above
# 1 - 2^-25 exactly 1 (no decay), an lr from F32_INF_FROM up inf (every step skipped). The
# checks hold the float32 values to the stated ranges (F32_POSITIVE_FROM < lr < F32_INF_FROM).
_MOMENTUM_MAX = 1.0 - 2.0 ** -25


def _step_scalars(lr, momentum) -> None:
    for name, v in (("lr", lr), ("momentum", momentum)):
        # type() first: an ABC isinstance costs about 0.3 µs
        if not (type(v) is float or (not isinstance(v, bool) and isinstance(v, numbers.Real))) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not F32_POSITIVE_FROM < lr < F32_INF_FROM:
        raise ValueError(f"lr must be > 0 (above 2**-150, which float32 rounds to 0) and below "
                         f"3.4028235677973366e38 (which it rounds to inf), got {lr}")
    if not 0 <= momentum < _MOMENTUM_MAX:
        raise ValueError(f"momentum must be in [0, 1) (below 1 - 2**-25, which float32 rounds to 1), got {momentum}")


# ---- public functions ----------------------------------------------------------------------
def binarize(w: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Binarize a float weight into ``bits`` bits (ALGORITHM.md, "Local representation").

    Args:
        w: float tensor (float32/16/bf16, any shape and strides), finite.
        bits: N, 1..8.

    Returns:
        (codes uint8 (n,), sign bitmap uint8 (4*ceil(n/32),) with bit set = negative, scale
        float32 0-dim = max|w|), on w's device. Bit for bit
        :meth:`fedmpq.wire.QuantizedTensor.from_float`. A w whose max|w| is so small that
        ``(2^N - 1) / max|w|`` overflows float32 (below about 7.5e-37 at 8 bits) gets the
        codes of ``w * 2^64`` (the same ratios to max|w|), not every nonzero weight the top
        code.

    Raises:
        TypeError / ValueError: w not a float tensor, bits outside 1..8, w not finite as
        float32 (NaN, inf, or a float64 value beyond float32's range).
    """
    if (type(w) in PLAIN and type(bits) is int and 0 < bits <= 8 and w.is_cpu and w.dtype in _FLOATS
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active() and not _is_wrapped(w)):
        # The usual call: every backend's scale is max|w| with NaN propagated (NaN or inf
        # exactly when w holds one), so that read (free on the CPU) stands for torch.isfinite's
        # three ops; the results are fresh tensors, dropped on error.
        run = _CPU_FN.get("binarize") or _cpu_fn("binarize")
        return _binarized(run(w, bits), w, bits, run)
    bits = _check_binarize(w, bits)
    if _eager(w):
        return _binarized(_binarize_impl(w, bits), w, bits, _binarize_impl)
    # the registered op checks the scale when it runs: traced here (torch.compile), a host
    # read of w's values could not be (a data-dependent branch broke fullgraph=True)
    return torch.ops.fedmpq.binarize(w, bits)


def dequantize(codes: Tensor, sign: Tensor, scale: Tensor, bits: int, sink: Tensor) -> Tensor:
    """The effective weight ``W = sigma * q * (s / (2^N - 1))``, float32, in ``sink``'s shape.

    Differentiable in ``scale`` (``dL/ds = sum sigma q G / (2^N - 1)``) and in ``sink``,
    whose gradient is G = dL/dW itself: a bit-plane layer passes a zero-stride
    ``sink`` parameter (4 bytes, :func:`sink_like`) and the optimizer reads ``sink.grad``.

    Args:
        codes: uint8 (n,), values < 2^N.  sign: sign bitmap (bit set = negative).
        scale: float32 one-element tensor of any shape (its gradient comes in that shape).
        bits: N, 1..8.  sink: float32, n elements.
    """
    # The usual call (plain eager CPU tensors, a 0-dim scale) with its checks in their cheapest
    # form, every tensor attribute read once (~0.1 µs each); anything else takes the general
    # path, with the checks that name the problem.
    if (type(bits) is int and 0 < bits <= 8 and type(codes) in PLAIN and type(sign) in PLAIN and type(scale) in PLAIN
            and type(sink) in PLAIN and codes.dtype is _U8 and sign.dtype is _U8 and scale.dtype is _F32
            and sink.dtype is _F32 and codes.is_cpu and sign.is_cpu and scale.is_cpu and sink.is_cpu and scale.dim() == 0
            and sink.numel() == (n := codes.numel()) and sign.numel() >= 4 * ((n + 31) >> 5)
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active()
            and not _is_wrapped(codes) and not _is_wrapped(scale) and not _is_wrapped(sink)):
        e = _DQ_CPU.get(bits) or _dq_cpu(bits)
        if (scale.requires_grad or sink.requires_grad) and _grad_enabled():
            return e[1](codes, sign, scale, sink)
        w = e[0](codes, sign, scale, bits)
        shape = sink.shape
        return w if len(shape) == 1 else w.view(shape)  # (n,) already: a view costs ~1.5 µs
    bits = _check_dequantize(codes, sign, scale, bits, sink)
    if (_eager(codes) and type(scale) in PLAIN and type(sink) in PLAIN and not _is_wrapped(scale)
            and not _is_wrapped(sink)):
        if torch.is_grad_enabled() and (scale.requires_grad or sink.requires_grad):
            return _dq_apply(codes, sign, scale, bits, sink)
        return _dequantize_impl(codes, sign, scale, bits, sink)
    return torch.ops.fedmpq.dequantize(codes, sign, scale, bits, sink)


def dequantize_layers(codes: Sequence[Tensor], sign: Sequence[Tensor], scale: Sequence[Tensor], bits: Sequence[int],
                      sink: Sequence[Tensor]) -> List[Tensor]:
    """:func:`dequantize` of every layer l (``codes[l]``, ``sign[l]``, ``scale[l]``,
    ``bits[l]``, ``sink[l]``) in one call: a model's weights before its forward. The same
    weights and gradients, bit for bit, as the calls one by one, with one autograd node for
    all layers instead of one per layer (one Python forward and one backward), and one pass
    through the backend's adapter (on CUDA: one device guard, stream and workspace lookup).
    A weight that gets no gradient costs its layer's backward nothing.

    Args:
        codes, sign, scale, bits, sink: one entry per layer, as :func:`dequantize` takes
            them; every tensor on one device.

    Returns:
        list of L float32 tensors, layer l's in ``sink[l]``'s shape, differentiable in
        ``scale[l]`` and ``sink[l]`` as :func:`dequantize`'s.

    Raises:
        TypeError / ValueError: as :func:`dequantize`, naming the layer; lists of different
        lengths; layers on different devices.
    """
    # The usual call (plain CPU tensors: a model's weights before its forward) checked and
    # made by the CPU backend in one pass, then one autograd node over them where a gradient
    # is wanted; anything it does not take goes on to the checks that name the problem.
    if (type(codes) in _SEQS and type(sign) in _SEQS and type(scale) in _SEQS and type(bits) in _SEQS
            and type(sink) in _SEQS and (L := len(codes)) and L == len(sign) == len(scale) == len(bits) == len(sink)
            and type(c0 := codes[0]) in PLAIN and c0.is_cpu
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active()):
        usual = _cpu_usual("dequantize_layers_usual", "dequantize")
        if usual:
            ws = usual(codes, sign, scale, bits, sink)
            if ws is not None:
                if _grad_enabled() and (any(map(_requires_grad, scale)) or any(map(_requires_grad, sink))):
                    return list(_dql_apply(L, tuple(bits), ws, *codes, *sign, *scale, *sink))
                return ws
    L = _layer_count(codes, sign=sign, scale=scale, bits=bits, sink=sink)
    if L == 0:
        return []
    _tensor(codes[0], "codes[0]")
    dev = codes[0].device
    bits_l = [0] * L
    u8, f32 = torch.uint8, torch.float32
    plain = True  # every tensor a plain one, none functorch-wrapped: the direct path may take them
    for i in range(L):
        c, sg, sc, sk, b = codes[i], sign[i], scale[i], sink[i], bits[i]
        # the usual case in one expression (half the time of the checks below, which name the problem)
        if (type(b) is int and 0 < b <= 8 and type(c) in PLAIN and type(sg) in PLAIN and type(sc) in PLAIN
                and type(sk) in PLAIN and c.dtype is u8 and sg.dtype is u8 and sc.dtype is f32 and sk.dtype is f32
                and c.device == dev
                and sg.device == dev and sc.device == dev and sk.device == dev and sc.dim() == 0  # (1,): the op's path
                and sk.numel() == c.numel() and sg.numel() >= bitmap_nbytes(c.numel()) and not _is_wrapped(c)
                and not _is_wrapped(sg) and not _is_wrapped(sc) and not _is_wrapped(sk)):
            bits_l[i] = b
            continue
        plain = False  # anything unusual takes the registered op, which handles every case
        try:
            n, bits_l[i] = _state(codes[i], sign[i], bits[i])
            if codes[i].device != dev:
                raise ValueError(f"codes is on {codes[i].device}, expected {dev} (layer 0's device)")
            _scale(scale[i], dev)
            _sink(sink[i], n, dev)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {i}: {e}") from None
    bits_t = tuple(bits_l)
    if plain and _eager(codes[0]):
        if torch.is_grad_enabled() and any(t.requires_grad for ts in (scale, sink) for t in ts):
            return list(_dql_apply(L, bits_t, None, *codes, *sign, *scale, *sink))
        return _dequantize_layers_impl(codes, sign, scale, bits_t, sink)
    return [torch.ops.fedmpq.dequantize(codes[i], sign[i], scale[i], bits_t[i], sink[i]) for i in range(L)]


def sink_like(shape, device=None) -> Tensor:
    """A float32 tensor of ``shape`` (a sequence of ints >= 0, e.g. a torch.Size) that stores
    one number (zero strides): the gradient sink of a bit-plane layer (see :func:`dequantize`).
    Raises TypeError / ValueError for another shape (torch said "numel: integer
    multiplication overflow" for a negative size)."""
    if isinstance(shape, (Tensor, str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"shape must be a sequence of ints >= 0, got {type(shape).__name__}")
    dims = tuple(shape)
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, numbers.Integral):
            raise TypeError(f"shape must be a sequence of ints >= 0, got {dims!r}")
        if d < 0:
            raise ValueError(f"shape must be a sequence of ints >= 0, got {dims!r}")
    if math.prod(map(int, dims)) >= 1 << 63:  # torch said "numel: integer multiplication overflow"
        raise ValueError(f"shape {dims!r} holds 2^63 elements or more")
    return torch.zeros((), dtype=torch.float32, device=device).expand(tuple(map(int, dims)))


def plane_popcounts(codes: Tensor, bits: int) -> Tensor:
    """Set bits of each plane, int64 (bits,), plane 0 = MSB."""
    if (type(codes) in PLAIN and type(bits) is int and 0 < bits <= 8 and codes.dtype is _U8 and codes.is_cpu
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active() and not _is_wrapped(codes)):
        return (_CPU_FN.get("plane_popcounts") or _cpu_fn("plane_popcounts"))(codes, bits)  # the usual call
    _tensor(codes, "codes", torch.uint8)
    bits = check_bits(bits)
    if _eager(codes):
        return _plane_popcounts_impl(codes, bits)
    return torch.ops.fedmpq.plane_popcounts(codes, bits)


def plane_popcounts_layers(codes: Sequence[Tensor], bits: Sequence[int]) -> Tensor:
    """:func:`plane_popcounts` of every layer l (``codes[l]``, ``bits[l]``) in one call,
    concatenated: int64 (sum of bits,) on the layers' device (layer l's N counts after the
    layers before it). One native call for all (on CUDA, one launch per group of up to 32 layers).
    (0,) on the CPU for no layers. Raises TypeError / ValueError naming the layer."""
    if not _layer_count(codes, bits=bits):
        return torch.zeros(0, dtype=torch.int64)
    # the usual call (plain CPU tensors) checked and counted by the CPU backend in one pass;
    # anything it does not take goes on to the checks that name the problem
    if type(c0 := codes[0]) in PLAIN and c0.is_cpu and not _is_compiling() and not _dispatch_modes() \
            and not _functorch_active():
        usual = _cpu_usual("plane_popcounts_layers_usual", "plane_popcounts")
        if usual:
            out = usual(codes, bits)
            if out is not None:
                return out
    _tensor(codes[0], "codes[0]")
    dev = codes[0].device
    bits_l = [0] * len(codes)
    for i, (c, b) in enumerate(zip(codes, bits)):
        try:
            _tensor(c, "codes", torch.uint8, dev)
            bits_l[i] = check_bits(b)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {i}: {e}") from None
    if _eager(codes[0]) and all(type(c) in PLAIN and not _is_wrapped(c) for c in codes):
        single = _get("plane_popcounts", codes[0])
        many = _layers_impl(single, "plane_popcounts_layers")
        if many is not None:
            return many(codes, bits_l)
        return torch.cat([single(c, b) for c, b in zip(codes, bits_l)])
    return torch.cat([torch.ops.fedmpq.plane_popcounts(c, b) for c, b in zip(codes, bits_l)])


def group_lasso(popcounts: Tensor, n: int, bits: int) -> Tuple[Tensor, Tensor]:
    """The layer's group-lasso term and its per-plane gradient coefficient (ALGORITHM.md,
    "Local objective"): ``R_l = n*N * sum_i sqrt(eps + popcount_i)`` (float32 0-dim) and
    ``n*N / sqrt(eps + popcount_i)`` (float32 (bits,)), the derivative of R_l in a set bit.

    Args:
        popcounts: the layer's :func:`plane_popcounts`, an integer tensor of shape
            ``(bits,)``.  n: its weights, an int >= 0.  bits: N, 1..8.

    Raises:
        TypeError / ValueError: popcounts not a 1-D integer tensor of ``bits`` values, n
            not an int in 0..2**63-1. The counts' values are not read (a GPU sync): a
            negative one gives NaN.
    """
    bits = check_bits(bits)
    _tensor(popcounts, "popcounts")
    dt = popcounts.dtype
    if dt.is_floating_point or dt.is_complex or dt is torch.bool:  # counts: NaN or inf coefficients else
        raise TypeError(f"popcounts must be an integer tensor (plane_popcounts' int64), got {dt}")
    if popcounts.dim() != 1 or popcounts.shape[0] != bits:
        raise ValueError(f"popcounts must hold {bits} values (one per plane) in one dimension, got shape "
                         f"{tuple(popcounts.shape)}")
    return _ref.group_lasso(popcounts, _count(n, "n"), bits)


def bitplane_step(codes: Tensor, sign: Tensor, mom: Tensor, gs: Tensor, grad: Tensor, coef: Tensor,
                  scale: Tensor, bits: int, lr: float, momentum: float, key: Union[int, Tensor]) -> Tensor:
    """One fused bit-plane optimizer step with re-quantization (ALGORITHM.md steps 1-7), in
    place on ``codes``, ``sign``, ``mom`` and ``gs``; the exact rule is in
    :mod:`fedmpq_kernels.bitplane.reference`. Autograd is told that ``codes`` and ``sign``
    changed (their versions bumped), so a backward through a :func:`dequantize` of the old
    ones raises torch's "modified by an inplace operation" instead of a wrong gradient.

    Args:
        codes: uint8 (n,).  sign: sign bitmap.  mom: uint8 (bits, n), the last step's update
            codes (zeros at the start of a round).  gs: float32 (1,), the last step's g_s
            (zero at the start).  grad: G = dL/dW, float32, n elements.
        coef: float32 (bits,), the regularizer's coefficient per plane for a set bit
            (``lambda / T * n*N / sqrt(eps + popcount_i)``; zeros for none).
        scale: float32 one-element tensor, s.  bits: N.  lr, momentum: finite floats,
            lr > 0, 0 <= momentum < 1, as float32 values (the kernels' precision): lr above
            2**-150, momentum below 1 - 2**-25.
        key: the generator's key, :func:`step_key` (seed, step, layer): an int in
            0..2^32-1, or a one-element int64 tensor on ``codes``' device (0-dim or (1,),
            any strides: e.g. ``step_keys(seed, step, layers)[l]``) whose low 32 bits are
            the key. Neither this function nor the GPU backends read a tensor key's
            value on the host (a step with one can be captured in a CUDA graph and draws
            new numbers on every replay), so it is not range-checked: its value is taken
            mod 2^32. Same key, same result either way.

    Returns:
        float32 0-dim: this step's g_s. Not finite when grad or scale held NaN/inf, or
        finite values whose float32 products overflow (a gradient near 3e38, lr * g_s
        beyond float32): the step was skipped and nothing changed (never corrupted codes).

    Raises:
        TypeError / ValueError: bad arguments; a key tensor not int64 (TypeError), not on
        codes' device or not of one element (ValueError).
    """
    # The usual call (plain eager CPU tensors of the kernel's dtypes, an int key, float lr and
    # momentum) with _step_layer's checks in their cheapest form, every tensor attribute read
    # once; anything else takes the general path, with the checks that name the problem.
    if (type(bits) is int and 0 < bits <= 8 and type(key) is int and 0 <= key <= 0xFFFFFFFF and type(lr) is float
            and type(momentum) is float and F32_POSITIVE_FROM < lr < F32_INF_FROM
            and 0.0 <= momentum < _MOMENTUM_MAX  # _step_scalars
            and type(codes) in PLAIN and type(sign) in PLAIN and type(mom) in PLAIN and type(gs) in PLAIN
            and type(grad) in PLAIN and type(coef) in PLAIN and type(scale) in PLAIN
            and codes.dtype is _U8 and sign.dtype is _U8 and mom.dtype is _U8 and gs.dtype is _F32
            and grad.dtype is _F32 and coef.dtype is _F32 and scale.dtype is _F32
            and codes.is_cpu and sign.is_cpu and mom.is_cpu and gs.is_cpu and grad.is_cpu and coef.is_cpu
            and scale.is_cpu and (n := codes.numel()) < 1 << 32 and sign.numel() >= 4 * ((n + 31) >> 5)
            and mom.numel() == bits * n and mom.is_contiguous() and gs.numel() == 1 and grad.numel() == n
            and coef.dim() == 1 and coef.numel() == bits and scale.numel() == 1
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active() and not _is_wrapped(codes)):
        g = (_CPU_FN.get("bitplane_step") or _cpu_fn("bitplane_step"))(codes, sign, mom, gs, grad, coef, scale,
                                                                        bits, lr, momentum, key, None)
        bump_versions((codes, sign))  # the state a forward saves (see register_inplace above)
        return g
    dev = _tensor(codes, "codes").device  # (an AttributeError from .device else)
    bits, grad, coef = _step_layer(codes, sign, mom, gs, grad, coef, scale, bits, dev)
    _step_scalars(lr, momentum)
    key, key_t = _step_key(key, dev)
    if _eager(codes) and (key_t is None or (type(key_t) in PLAIN and not _is_wrapped(key_t))):
        g = _bitplane_step_impl(codes, sign, mom, gs, grad, coef, scale, bits, float(lr), float(momentum), key, key_t)
        bump_versions((codes, sign))
        return g
    return torch.ops.fedmpq.bitplane_step(codes, sign, mom, gs, grad, coef, scale, bits, float(lr), float(momentum),
                                          key, key_t)


_LAYERS_OF: dict = {}  # (a backend's op, name) -> that backend module's op over many layers, or None


def _layers_impl(single, name: str = "bitplane_step_layers"):
    """``name`` (an op over a list of layers) of the backend whose single-layer op is
    ``single``, or None (that backend goes layer by layer)."""
    key = (single, name)
    if key not in _LAYERS_OF:
        _LAYERS_OF[key] = getattr(sys.modules[single.__module__], name, None)
    return _LAYERS_OF[key]


def bitplane_step_layers(codes: Sequence[Tensor], sign: Sequence[Tensor], mom: Sequence[Tensor], gs: Sequence[Tensor],
                   grad: Sequence[Tensor], coef: Sequence[Tensor], scale: Sequence[Tensor], bits: Sequence[int],
                   lr: float, momentum: float, keys: Union[Sequence[int], Tensor]) -> Tensor:
    """:func:`bitplane_step` on every layer l of the lists (``codes[l]``, ``sign[l]``, ...,
    ``bits[l]``, ``keys[l]``), in order, in one call: the optimizer step of a whole model. The
    same results, bit for bit, as the calls one by one, at a fraction of their host cost (one
    native call; on CUDA, two launches per group of up to 32 layers). Every layer is checked
    before any is stepped, so a bad argument changes nothing.

    Args:
        codes, sign, mom, gs, grad, coef, scale, bits: one entry per layer, as
            :func:`bitplane_step` takes them; every tensor on one device.
        lr, momentum: as :func:`bitplane_step`, for every layer.
        keys: one key per layer: ints in 0..2^32-1, or an int64 tensor of one element per
            layer on the layers' device (:func:`step_keys`; not read on the host, taken mod
            2^32).

    Returns:
        float32 (L,) on the layers' device: each layer's g_s (not finite: that layer's step
        was skipped and it is unchanged). (0,) on the CPU for no layers.

    Raises:
        TypeError / ValueError: as :func:`bitplane_step`, naming the layer; lists of
        different lengths.
    """
    # The usual call (an optimizer's step: plain CPU tensors, int keys, float lr and momentum)
    # checked and stepped by the CPU backend in one pass over the layers (~40 attribute reads a
    # layer, against _step_layer's ~100 and the adapter's own); anything it does not take
    # goes on below, to the checks that name the problem.
    if (type(lr) is float and type(momentum) is float and F32_POSITIVE_FROM < lr < F32_INF_FROM
            and 0.0 <= momentum < _MOMENTUM_MAX
            and type(codes) in _SEQS and type(sign) in _SEQS and type(mom) in _SEQS and type(gs) in _SEQS
            and type(grad) in _SEQS and type(coef) in _SEQS and type(scale) in _SEQS and type(bits) in _SEQS
            and type(keys) in _SEQS and (L := len(codes)) and L == len(sign) == len(mom) == len(gs) == len(grad)
            == len(coef) == len(scale) == len(bits) == len(keys) and type(c0 := codes[0]) in PLAIN and c0.is_cpu
            and not _is_compiling() and not _dispatch_modes() and not _functorch_active()):
        usual = _cpu_usual("bitplane_step_layers_usual", "bitplane_step")
        if usual:
            out = usual(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, keys)
            if out is not None:
                bump_versions([*codes, *sign])  # one call: ~450 instructions a tensor
                return out
    L = _layer_count(codes, sign=sign, mom=mom, gs=gs, grad=grad, coef=coef, scale=scale, bits=bits,
                     **({} if isinstance(keys, Tensor) else {"keys": keys}))
    _step_scalars(lr, momentum)
    if L == 0:
        return torch.empty(0, dtype=torch.float32)
    _tensor(codes[0], "codes[0]")
    dev = codes[0].device
    key_t = None
    if isinstance(keys, Tensor):
        if keys.dtype != torch.int64:
            raise TypeError(f"keys must be ints or an int64 tensor, got a tensor of {keys.dtype}")
        if keys.device != dev:
            raise ValueError(f"keys is on {keys.device}, expected {dev} (the layers' device)")
        if keys.numel() != L:
            raise ValueError(f"keys has {keys.numel()} elements, one per layer ({L}) needed")
        key_t, ints = keys.reshape(-1), [0] * L
    else:  # _layer_count checked its length
        ints = [k if type(k) is int and 0 <= k <= 0xFFFFFFFF else _key(k, f" (layer {i})") for i, k in enumerate(keys)]
    bits_l, grads, coefs = [0] * L, [None] * L, [None] * L
    for i in range(L):
        try:
            bits_l[i], grads[i], coefs[i] = _step_layer(codes[i], sign[i], mom[i], gs[i], grad[i], coef[i], scale[i],
                                                        bits[i], dev)
        except (TypeError, ValueError) as e:
            raise type(e)(f"layer {i}: {e}") from None
    lr, momentum = float(lr), float(momentum)
    eager = _eager(codes[0]) and all(type(c) in PLAIN and not _is_wrapped(c) for c in codes) and (
        key_t is None or (type(keys) in PLAIN and not _is_wrapped(keys)))
    if eager:
        single = _get("bitplane_step", codes[0])
        many = _layers_impl(single)
        if many is not None:
            out = many(codes, sign, mom, gs, grads, coefs, scale, bits_l, lr, momentum, ints, key_t)
        else:
            out = torch.stack([single(codes[i], sign[i], mom[i], gs[i], grads[i], coefs[i], scale[i], bits_l[i], lr,
                                      momentum, ints[i], None if key_t is None else key_t[i]) for i in range(L)])
        bump_versions([*codes, *sign])
        return out
    return torch.stack([torch.ops.fedmpq.bitplane_step(codes[i], sign[i], mom[i], gs[i], grads[i], coefs[i], scale[i],
                                                       bits_l[i], lr, momentum, ints[i],
                                                       None if key_t is None else key_t[i]) for i in range(L)])


def precision_reduction(codes: Tensor, scale: Tensor, bits: int, theta: float) -> Tuple[int, Tensor, Tensor]:
    """Precision reduction after local training (ALGORITHM.md) with threshold ``theta`` in
    percent: (new N, new codes uint8 (n,), new scale float32 0-dim); signs are unchanged.
    Pure torch on any device (once per round; the rule is in the reference)."""
    _tensor(codes, "codes", torch.uint8)
    bits = check_bits(bits)
    _scale(scale, codes.device)
    if isinstance(theta, bool) or not isinstance(theta, numbers.Real) or not math.isfinite(theta) or theta < 0:
        raise ValueError(f"theta must be a finite number >= 0 (percent), got {theta!r}")
    s = float(scale.detach().reshape(()))  # once a round: a host read is nothing here (codes' max is one too)
    if not math.isfinite(s):  # the reduced scale came out NaN, unsaid (a negative one is a trained scale:
        raise ValueError(f"scale must be finite, got {s}")  # its sign folds into the signs on the wire)
    if codes.numel() and int(codes.max()) >= (1 << bits):
        raise ValueError(f"a code is >= 2^{bits}")
    return _ref.precision_reduction(codes.reshape(-1), scale, bits, float(theta))  # (n,) whatever codes' shape


step_key = _ref.step_key


def step_keys(seed: int, step: Tensor, layers: int) -> Tensor:
    """The keys of one step for layers 0..layers-1, computed on ``step``'s device: int64
    (layers,) whose element l is ``step_key(seed, s, l)``, s the value of ``step`` (a
    one-element int64 tensor, taken mod 2^32). Torch ops only, no host read of ``step``: a
    step counter kept on the GPU and advanced there gives new keys on every replay of a
    captured CUDA graph. Pass ``keys[l]`` as :func:`bitplane_step`'s key."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    _tensor(step, "step", torch.int64)
    if step.numel() != 1:
        raise ValueError(f"step must be a one-element tensor, got shape {tuple(step.shape)}")
    if isinstance(layers, bool) or not isinstance(layers, numbers.Integral):
        raise TypeError(f"layers must be an int, got {type(layers).__name__}")
    if layers < 0:
        raise ValueError(f"layers must be >= 0, got {layers}")
    return _ref.step_keys(int(seed), step, int(layers))


def uniform(key: int, n: int, device=None) -> Tensor:
    """The generator's draws u_j in [0, 1) for elements 0..n-1 under ``key``
    (:func:`step_key`): float32 (n,), the numbers :func:`bitplane_step` compares with p_j."""
    return _ref.uniform(_key(key), _count(n, "n"), device)
