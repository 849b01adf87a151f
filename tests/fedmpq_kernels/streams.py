"""Inputs that only one stream sees written: a kernel launched on another stream than torch's
current one reads the fill instead, so a stream test can fail (inputs made ready for every
stream would pass it whatever stream the kernels took)."""
from __future__ import annotations

from typing import List, Tuple

import torch

# About 50 ms at 2 GHz: far longer than queuing the ops of a test takes, so the other streams
# (idle) run anything put on them while this one still sleeps.
SLEEP_CYCLES = 100_000_000


def late_copies(stream: torch.cuda.Stream, *pairs: Tuple[torch.Tensor, object]) -> List[torch.Tensor]:
    """GPU copies of CPU tensors (``(src, fill)`` pairs, any shapes and dtypes) that ``stream``
    writes after one sleep; until then each holds its ``fill``, ready on every stream."""
    dsts = [torch.full(src.shape, fill, dtype=src.dtype, device="cuda") for src, fill in pairs]
    staged = [src.to("cuda") for src, _ in pairs]
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)
        for d, s in zip(dsts, staged):
            d.copy_(s)
    for t in dsts + staged:
        t.record_stream(stream)  # not reused by another stream before the copies have run
    return dsts
