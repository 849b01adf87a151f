"""fedmpq_kernels: low-bit kernels (C++ CPU, CUDA, Triton) under a thin torch.library layer.

Public API::

    fake_quant(x, bits, scale=None, *, ste="identity") -> Tensor      # fakequant/
    pack_codes(codes, bits) -> Tensor                                # pack/
    unpack_codes(planes, bits, n) -> Tensor
    dequant_accumulate(acc, planes, signs, bits, scale, weight=1.0) -> Tensor (acc, in place)
    dequant_accumulate_layers(acc, payload, table, coefs) -> Tensor (acc, in place; many layers)
    layer_coefs(scales, bits, weight=1.0) -> Tensor (float32 coefficients for the above)

One package per op family (``fakequant/``, ``pack/``); backends per device are chosen by
:mod:`fedmpq_kernels.registry`; ``python -m fedmpq_kernels.info`` prints what runs where
and why.
"""
from . import registry
from .fakequant import fake_quant
from .pack import dequant_accumulate, dequant_accumulate_layers, layer_coefs, pack_codes, unpack_codes
from .registry import use_backend

__version__ = "0.1.0"
__all__ = [
    "fake_quant", "pack_codes", "unpack_codes", "dequant_accumulate", "dequant_accumulate_layers", "layer_coefs",
    "registry", "use_backend", "__version__",
]
