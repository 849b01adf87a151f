"""The reduction workspaces' tickets between tests. On a GPU the per-stream workspace
(``fedmpq_kernels._device``) outlives every call, and each kernel that finishes a reduction
in its last block must leave its ticket (word 0) at zero: a ticket left at t makes the next
launch's "last" block the one that arrives t blocks early, which then reads slots not yet
written, and every later launch on that stream keeps the error. The Triton interpreter makes
a fresh workspace per call, so only a GPU run can show it; tests/conftest.py checks after
every test, so the test that left one is named instead of a later one failing."""
from __future__ import annotations

from typing import List

import torch

from fedmpq_kernels import _device


def tickets_left() -> List[str]:
    """Every kept workspace whose ticket is not zero, described, each set back to zero (so
    later tests start clean). Waits for the GPU's queued work first; a workspace on the CPU
    (tests that stand in for a GPU) is read as is."""
    items = list(_device._WORKSPACES.items())
    if not items:
        return []
    if any(ws.is_cuda for _, ws in items):
        torch.cuda.synchronize()  # also raises here a kernel fault of this test
    tickets = torch.stack([ws[0].cpu() for _, ws in items]).tolist()  # one read per workspace, no more
    left = []
    for (key, ws), t in zip(items, tickets):
        if t != 0:
            left.append(f"workspace of (device {key[0]}, stream {key[1]:#x}): ticket {t}")
            ws[0] = 0
    return left
