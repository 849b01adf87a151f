"""How backend adapters hand host tensors to kernels that read whole uint32 words."""
from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor
_F32 = torch.float32
_default_dtype = torch.get_default_dtype


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


def empty_f32(shape, device=None) -> Tensor:
    """An uninitialized float32 tensor of ``shape`` (a torch.Size or tuple; () for 0-dim)."""
    # ints as separate arguments: torch.empty parses a torch.Size about 1 µs slower; on the
    # CPU no dtype argument (~0.2 µs) where the default dtype gives float32 anyway
    if device is None and _default_dtype() is _F32:
        return torch.empty(*shape) if len(shape) else torch.empty(())
    return torch.empty(*shape, dtype=_F32, device=device) if len(shape) else torch.empty((), dtype=_F32, device=device)


def f32_scalar(v: float) -> Tensor:
    """A float32 0-dim CPU tensor of ``v`` (scalar_tensor: cheaper than torch.tensor), without a
    dtype argument (~0.2 µs) where the default dtype gives float32 anyway."""
    return torch.scalar_tensor(v) if _default_dtype() is _F32 else torch.scalar_tensor(v, dtype=_F32)


def is_copy(work: Tensor, t: Tensor) -> bool:
    """Whether the working buffer ``work`` made of ``t`` (``words``, ``.contiguous()``, a
    conversion) is a copy rather than ``t``'s own memory."""
    return work is not t and work.data_ptr() != t.data_ptr()


def write_back(works, states) -> None:
    """Copies each working buffer (``words`` or ``.contiguous()`` of a state tensor) back
    into its state tensor where it is a copy rather than the state itself."""
    for work, state in zip(works, states):
        if is_copy(work, state):
            state.copy_(work.view(state.shape))


def _span(t: Tensor):
    """(storage address, first byte, end byte) of t's elements: the whole stretch a strided
    view spans, so an over-estimate of the bytes it touches; None when empty."""
    if t.numel() == 0:
        return None
    es = t.element_size()
    lo = t.storage_offset()
    hi = lo + 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().data_ptr(), lo * es, hi * es


def copies_among_shared(works, layers) -> bool:
    """True when a working buffer is a copy (``works[l][i]`` is not the memory of
    ``layers[l][i]``) and two layers' tensors overlap in memory (conservatively, by span).
    Then a many-layer call that steps copies and writes them back afterwards would not see
    one layer's step in another's: the caller goes layer by layer instead. Cheap when
    nothing was copied (a model's layers, contiguous): identity checks only."""
    if not any(is_copy(w, t) for ws, ts in zip(works, layers) for w, t in zip(ws, ts)):
        return False
    spans = sorted((sp[0], sp[1], sp[2], l) for l, ts in enumerate(layers) for t in ts if (sp := _span(t)) is not None)
    for i, (base, lo, hi, l) in enumerate(spans):
        for base2, lo2, _, l2 in spans[i + 1:]:
            if base2 != base or lo2 >= hi:
                break
            if l2 != l:
                return True
    return False


_STEP_NAMES = ("codes", "sign", "mom", "gs", "grad", "coef")  # bitplane_step writes the first four


def refuse_aliased_step(codes, sign, mom, gs, grad, coef) -> None:
    """ValueError naming two of bitplane_step's state tensors, or one of them and grad or
    coef, whose memory overlaps (conservatively, by span). For calls where an adapter makes
    working copies (a strided or misaligned state tensor): the native and GPU overlap checks
    then see the copies, and the write-back of one state tensor wrote into another (codes, a
    strided view of mom's storage, was stepped and copied over mom)."""
    spans = [_span(t) for t in (codes, sign, mom, gs, grad, coef)]
    for i in range(4):
        a = spans[i]
        if a is None:
            continue
        for j in range(i + 1, len(spans)):
            b = spans[j]
            if b is not None and a[0] == b[0] and a[1] < b[2] and b[1] < a[2]:
                raise ValueError(f"{_STEP_NAMES[i]} and {_STEP_NAMES[j]} overlap in memory: a step writes "
                                 f"{_STEP_NAMES[i]}")


def refuse_aliased_step_copies(works, tensors) -> None:
    """For a bitplane_step adapter, after it made its working buffers ``works`` of
    ``tensors`` (codes, sign, mom, gs, grad, coef): where one is a copy, the tensors
    themselves must not overlap (:func:`refuse_aliased_step`). No copy costs an identity
    test a tensor (a data pointer where the buffer is a view)."""
    for w, t in zip(works, tensors):
        if w is not t and w.data_ptr() != t.data_ptr():
            refuse_aliased_step(*tensors)
            return
