"""How backend adapters hand host tensors to kernels that read whole uint32 words."""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor


def words(t: Tensor, n: Optional[int] = None) -> Tensor:
    """The first ``n`` elements of ``t`` (all when None), flattened, contiguous and 4-byte
    aligned: copied only when they are not already. The kernels read bitmaps, planes and
    sign maps as uint32 words. A caller updating ``t`` in place through the result writes it
    back when the data pointers differ."""
    if t.dim() != 1:
        t = t.reshape(-1)
    if n is not None and n < t.numel():
        t = t[:n]
    if not t.is_contiguous() or t.data_ptr() % 4:
        t = t.clone(memory_format=torch.contiguous_format)  # fresh storage: aligned
    return t


def write_back(works, states) -> None:
    """Copies each working buffer (``words`` or ``.contiguous()`` of a state tensor) back
    into its state tensor where it is a copy rather than the state itself."""
    for work, state in zip(works, states):
        if work is not state and work.data_ptr() != state.data_ptr():
            state.copy_(work.view(state.shape))
