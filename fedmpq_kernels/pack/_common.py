"""Helpers every pack backend adapter shares (the word-aligned buffers: ``.._buffers``), and
pack_codes' range check on a device: the per-device status words the kernels OR codes into,
read only at a sync point the caller chooses (:func:`check_packed`)."""
from __future__ import annotations

import threading
from typing import Dict, Optional, Union

import torch

from .._checks import MAX_BITS, bitmap_nbytes

Tensor = torch.Tensor


def check_seen(seen: int, bits: int) -> None:
    """pack_codes' range check: the kernels OR all codes together; a bit at or above
    ``bits`` means a code did not fit."""
    if seen >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (codes must be < {1 << bits}; "
                         f"the bits of all codes OR-ed together are {seen:#x})")


# One int32 word per bit-width b = 1..8 (word b - 1) per device: every GPU (and Triton
# interpreter) pack_codes call ORs its codes into the word of its bit-width, with atomics, so
# the call reads nothing back and never synchronizes. A word with a bit at or above b means
# some code did not fit since the last check. Device-wide: every thread's calls count.
_STATUS: Dict[torch.device, Tensor] = {}
_STATUS_LOCK = threading.Lock()  # two threads' first calls on a device make one set of words
# A call that checks its codes itself (pack_codes' validate) gets words of its own, made when
# its backend asks for them (a native CPU call never does): another thread's codes, or its
# check, then neither raise in it nor clear its record.
_CALL = threading.local()


def status_words(device: torch.device) -> Tensor:
    """The status words of ``device`` (int32 (8,), zero-filled at the first call there), or,
    inside a checking call (:func:`own_words_begin`), that call's own."""
    if getattr(_CALL, "checking", False):
        own = _CALL.own
        if own is None:  # one set per call, however many launches ask
            own = _CALL.own = torch.zeros(MAX_BITS, dtype=torch.int32, device=device)
        return own
    st = _STATUS.get(device)
    if st is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # A zero fill launched now would be captured, not run: the words would be garbage.
            raise RuntimeError(f"pack_codes on {device} needs one call outside CUDA-graph capture first "
                               "(it sets up the device's range-check words)")
        with _STATUS_LOCK:
            st = _STATUS.get(device)
            if st is None:
                st = torch.zeros(MAX_BITS, dtype=torch.int32, device=device)
                if device.type == "cuda":
                    # once per device: the fill runs on this stream, and a later pack_codes on
                    # another stream must not OR into the words before it is done
                    torch.cuda.synchronize(device)
                _STATUS[device] = st
    return st


def own_words_begin() -> None:
    """The calling thread's next :func:`status_words` are a call's own (pack_codes with its
    check in the call), until :func:`own_words_end`."""
    _CALL.checking, _CALL.own = True, None


def own_words_end(bits: int, read: bool = True) -> None:
    """Ends what :func:`own_words_begin` began, and (``read``) raises where the call's own
    words say a code did not fit (reading them synchronizes a GPU: the check the caller asked
    for)."""
    own, _CALL.checking, _CALL.own = _CALL.own, False, None
    if read and own is not None:
        check_seen(own.tolist()[bits - 1], bits)


def check_packed(device: Union[None, str, torch.device] = None) -> None:
    """Raise for a code that did not fit in a GPU ``pack_codes`` call made since the last check.

    On a GPU ``pack_codes`` does not synchronize to check its codes: its kernel records
    them on the device, and this reads the record (one synchronization of the device, so
    calls on every stream count: call it where the caller synchronizes anyway, e.g. after
    copying the planes to the host) and clears it. The record is the device's, so every
    thread's calls count (a call with ``validate=True`` checks its own codes instead); a
    code recorded by a kernel still running on another stream while this reads and clears
    the record may be missed.
    CPU calls are checked in the call itself and never need this.

    Args:
        device: the device to check (``"cuda"``: the current CUDA device); None: every device
            pack_codes has run on.

    Raises:
        ValueError: naming the bit-widths whose codes did not fit (those calls' planes are
            meaningless).
    """
    devs = list(_STATUS) if device is None else [_indexed(torch.device(device))]
    bad = []
    for dev in devs:
        st = _STATUS.get(dev)
        if st is None:
            continue
        if dev.type == "cuda":
            # the whole device: pack_codes calls on other streams than the current one count too
            torch.cuda.synchronize(dev)
        seen = st.tolist()
        if any(seen):
            st.zero_()
            if dev.type == "cuda":  # before any later pack_codes, whatever its stream
                torch.cuda.synchronize(dev)
        bad += [f"{b} bits on {dev} (the bits of its codes OR-ed together are {seen[b - 1]:#x})"
                for b in range(1, MAX_BITS + 1) if seen[b - 1] >> b]
    if bad:
        raise ValueError("a code does not fit in " + "; in ".join(bad) + " in a pack_codes call since the last "
                         "check: codes must be < 2**bits, and the planes of that call are meaningless")


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` as the tensors' own ``cuda:N`` (the current device): the status words are
    keyed by a tensor's device, which always has an index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def status_word_ptr(device: torch.device, bits: int) -> int:
    """The address of the status word of ``bits`` on ``device`` (for the CUDA kernel)."""
    return status_words(device).data_ptr() + 4 * (bits - 1)


def pending_check(validate: Optional[bool], device: torch.device) -> bool:
    """Whether pack_codes reads its status now: asked to (``validate``), or by default where
    reading is free (CPU tensors: the Triton interpreter)."""
    if validate is None:
        return device.type == "cpu"
    if type(validate) is not bool:  # bool() took validate="no" as True
        raise TypeError(f"validate must be True, False or None, got {validate!r}")
    return validate


def dequant_accumulate_rows(single, acc: Tensor, payload: Tensor, table: Tensor, coefs: Tensor) -> None:
    """``dequant_accumulate_layers`` for a GPU backend without a table kernel: the table's
    rules checked whole first, then the backend's own ``single`` (its dequant_accumulate) once
    per row. ``table`` and ``coefs`` are CPU tensors, so nothing is read from the device (the
    reference's loop makes a device tensor of every coefficient: a wait per row on a GPU). The
    loop is written again here, not shared with reference.py, which stays the oracle."""
    from .ops import check_layer_table  # the op's rules (ops imports this module)

    t, c = table.numpy().copy(), coefs.numpy().copy()  # copies: checked is what is used, whatever other threads write
    check_layer_table(t, c, acc.numel(), payload.numel())
    flat = acc.view(-1)
    for (acc_off, n, bits, data_off), coef in zip(t.tolist(), c.tolist()):
        nb = bitmap_nbytes(n)
        single(flat[acc_off:acc_off + n], payload[data_off:data_off + bits * nb],
               payload[data_off + bits * nb:data_off + (bits + 1) * nb], bits, coef)
