"""The device a kernel launch runs on."""
from __future__ import annotations

import contextlib

import torch


def on_device(device: torch.device):
    """Context for launching kernels on ``device``'s tensors.

    CUDA: ``torch.cuda.device(device)``. Native and Triton launches run on the *current*
    device (and Triton on its current stream), which need not be the tensor's; torch's
    context selects the tensor's device and restores the caller's on exit, with torch's own
    rules (it never creates a context on a GPU the process has not used), so an op on
    ``cuda:1`` leaves ``torch.cuda.current_device()`` as it was. Other devices (CPU, the
    Triton interpreter): nothing to select.
    """
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
