"""fedmpq_kernels: low-bit kernels (C++ CPU, CUDA, Triton) under a thin torch.library layer.

Public API::

    fake_quant(x, bits, scale=None, *, ste="identity") -> Tensor      # fake_quant/
    relu6_fake_quant(x, bits=4) -> Tensor
    pack_codes(codes, bits, *, validate=None) -> Tensor              # pack/
    check_packed(device=None)   (a GPU pack_codes' deferred range check: raises ValueError)
    unpack_codes(planes, bits, n) -> Tensor
    dequant_accumulate(acc, planes, signs, bits, scale, weight=1.0) -> Tensor (acc, in place)
    dequant_accumulate_layers(acc, payload, table, coefs) -> Tensor (acc, in place; many layers)
    layer_coefs(scales, bits, weight=1.0) -> Tensor (float32 coefficients for the above)
    binarize(w, bits) -> (codes, sign, scale)                        # bitplane/
    dequantize(codes, sign, scale, bits, sink) -> Tensor (differentiable in scale and sink)
    dequantize_layers(codes, sign, scale, bits, sink) -> [Tensor] (many layers, one autograd node)
    sink_like(shape, device=None) -> Tensor;  plane_popcounts(codes, bits) -> Tensor
    plane_popcounts_layers(codes, bits) -> Tensor (many layers' popcounts, concatenated, one call)
    group_lasso(popcounts, n, bits) -> (R, coef);  step_key(seed, step, layer) -> int;  uniform(key, n)
    step_keys(seed, step, layers) -> Tensor (int64 (layers,), step_key of each layer on step's device)
    bitplane_step(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, key) -> g_s
        (key: an int, or a one-element int64 tensor on the device, e.g. step_keys(...)[l])
    bitplane_step_layers(codes, sign, mom, gs, grad, coef, scale, bits, lr, momentum, keys) -> g_s (L,)
        (bitplane_step over lists of layers in one call; keys: ints, or step_keys(...))
    precision_reduction(codes, scale, bits, theta) -> (bits, codes, scale)
    MIN_BITS, MAX_BITS, FLOAT_BITS, ALLOWED_BITS; check_bits(bits, what="bits", float_ok=False) -> int;
        bitmap_nbytes(n) -> int
    capture_workspace()   (a context: inside a CUDA-graph capture, one reduction workspace
        for every fedmpq kernel captured in it, instead of a zero fill per call)
    use_backend(name, family=None)   (a context: force a backend, for every family or one;
        FEDMPQ_BACKEND does it for the whole process)

One package per op family (``fake_quant/``, ``pack/``, ``bitplane/``); backends per device are chosen by
:mod:`fedmpq_kernels.registry`; ``python -m fedmpq_kernels.info`` prints what runs where
and why.
"""
from . import registry
from ._checks import ALLOWED_BITS, FLOAT_BITS, MAX_BITS, MIN_BITS, bitmap_nbytes, check_bits
from ._device import capture_workspace
from .bitplane import (binarize, bitplane_step, bitplane_step_layers, dequantize, dequantize_layers, group_lasso,
                       plane_popcounts, plane_popcounts_layers, precision_reduction, sink_like, step_key, step_keys, uniform)
from .fake_quant import fake_quant, relu6_fake_quant
from .pack import check_packed, dequant_accumulate, dequant_accumulate_layers, layer_coefs, pack_codes, unpack_codes
from .registry import use_backend

__version__ = "0.1.0"
__all__ = [
    "fake_quant", "relu6_fake_quant", "binarize", "dequantize", "dequantize_layers", "sink_like", "plane_popcounts", "plane_popcounts_layers", "group_lasso",
    "bitplane_step", "bitplane_step_layers", "precision_reduction", "step_key", "step_keys", "uniform", "pack_codes", "check_packed", "unpack_codes", "dequant_accumulate", "dequant_accumulate_layers", "layer_coefs",
    "registry", "use_backend", "capture_workspace", "__version__", "MIN_BITS", "MAX_BITS", "FLOAT_BITS", "ALLOWED_BITS", "check_bits", "bitmap_nbytes",
]
