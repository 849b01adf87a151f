"""fedmpq_kernels: low-bit kernels (C++ CPU, CUDA, Triton) under a thin torch.library layer.

Public API::

    fake_quant(x, bits, scale=None, *, ste="identity") -> Tensor

One package per op family (``fakequant/``); backends per device are chosen by
:mod:`fedmpq_kernels.registry`; ``python -m fedmpq_kernels.info`` prints what runs where
and why.
"""
from . import registry
from .fakequant import fake_quant
from .registry import use_backend

__version__ = "0.1.0"
__all__ = ["fake_quant", "registry", "use_backend", "__version__"]
