"""The one ``fedmpq`` torch.library namespace that every op family defines its ops in.

Ops are defined with ``torch.library.Library(...).define/.impl`` rather than
``custom_op``: the call costs a few microseconds instead of tens (ARCHITECTURE.md), and
a client step makes about a hundred of them.
"""
from __future__ import annotations

import torch

lib = torch.library.Library("fedmpq", "DEF")


def _eager(x: torch.Tensor) -> bool:
    """Whether a public function may skip the dispatcher: a plain tensor, not being traced
    (anything traced, fake or a subclass must take the registered ``torch.ops.fedmpq`` op)."""
    return type(x) is torch.Tensor and not torch.compiler.is_compiling()
