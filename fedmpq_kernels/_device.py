"""The device, stream and scratch memory a kernel launch runs with, at the least host cost
per call (a client step makes about a hundred launches)."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Tuple

import torch

Tensor = torch.Tensor
_NOTHING = contextlib.nullcontext()  # reusable: entering it does nothing


def on_device(device: torch.device):
    """Context for launching kernels on ``device``'s tensors.

    CUDA: ``torch.cuda.device(device)`` when ``device`` is not the current device. Native and
    Triton launches run on the *current* device (and Triton on its current stream), which
    need not be the tensor's; torch's context selects the tensor's device and restores the
    caller's on exit, with torch's own rules (it never creates a context on a GPU the process
    has not used), so an op on ``cuda:1`` leaves ``torch.cuda.current_device()`` as it was.
    When the tensor's device is already current (nearly always) nothing is entered: torch's
    context costs microseconds per launch. Other devices (CPU, the Triton interpreter):
    nothing to select.
    """
    if device.type != "cuda" or torch._C._cuda_getDevice() == device.index:
        return _NOTHING
    return torch.cuda.device(device)


def raw_stream(device: torch.device) -> int:
    """The ``cudaStream_t`` of torch's current stream on ``device``, as an int, without
    building a ``torch.cuda.Stream`` object (``current_stream(d).cuda_stream`` costs several
    times more)."""
    return torch._C._cuda_getCurrentRawStream(device.index)


_WORKSPACES: Dict[Tuple[int, int], Tensor] = {}
# (device index, capturing stream) -> {"ws": the capture's shared workspace or None, "depth": n}
# while capture_workspace() is entered during that capture. Keyed by the stream, not the
# thread: autograd runs a CUDA backward on its own device thread, on the forward's stream.
_SHARED: Dict[Tuple[int, int], dict] = {}


def _zeroed(words: int, device: torch.device) -> Tensor:
    # An even size (a multiple of 256 words), so that it views as int64 slots too.
    return torch.zeros(max(-(-words // 256) * 256, 1024), dtype=torch.int32, device=device)


def workspace(device: torch.device, stream: int, words: int) -> Tensor:
    """A zero-filled int32 tensor of at least ``words`` elements on ``device`` for kernels that
    finish a reduction in their last block (a ticket and one slot per block; every such kernel
    resets its ticket, word 0, and writes a slot before it reads it, so the slots' stale values
    are never read). One per (device, stream), kept between calls: launches on one stream run in
    order, so they can share it, and no zero fill is launched per call. Keyed by the raw stream
    handle: torch's own streams are pooled and never destroyed; a stream the user destroys (a
    ``torch.cuda.ExternalStream`` over a freed handle) while its kernels still run could pass
    its workspace to a new stream given the same handle, so synchronize such a stream before
    freeing it. Under CUDA-graph capture, one made in the capture: per call (its zero fill is
    captured with the kernels), or, inside :func:`capture_workspace`, one for the whole capture.
    So a graph never shares a workspace with eager work, which may run on another stream while
    the graph replays. Call it under :func:`on_device` (the capture check looks at the current
    device)."""
    if torch._C._cuda_isCurrentStreamCapturing():
        entry = _SHARED.get((device.index, stream))
        if entry is None:
            return torch.zeros(words + (words & 1), dtype=torch.int32, device=device)
        ws = entry["ws"]
        if ws is None or ws.numel() < words:
            # A larger one replaces it: the captured kernels that used the smaller one run
            # before any later user of its memory when the graph replays (capture order).
            ws = entry["ws"] = _zeroed(words, device)
        return ws
    key = (device.index, stream)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.numel() < words:
        # Freeing a smaller one is safe: the caching allocator hands its memory only to work
        # queued after the kernels that used it on this stream. A caller on another thread
        # that looked the smaller one up but has not launched yet holds the tensor until it
        # has (the adapters take the tensor, never only its pointer).
        ws = _WORKSPACES[key] = _zeroed(words, device)
    return ws


def _capturing_stream() -> Tuple[int, int]:
    """(current CUDA device index, its current raw stream): the capture's stream."""
    idx = torch._C._cuda_getDevice()
    return idx, torch._C._cuda_getCurrentRawStream(idx)


@contextlib.contextmanager
def capture_workspace() -> Iterator[None]:
    """Enter it inside one CUDA-graph capture (``with torch.cuda.graph(g):``): every fedmpq
    reduction captured in the block, backward passes included, shares one workspace, made
    (and zero-filled) at the first that needs it, instead of each call capturing its own
    zero fill (a graph node each: about 80 in a ResNet-20 step). Safe because the captured
    kernels replay in capture order on the capture's stream, and each leaves the ticket at
    zero. Outside a capture it does nothing. Wrap one capture only: the workspace belongs to
    that graph."""
    # (a CPU-only torch has no capture: its capture query raises)
    if not (torch.cuda.is_available() and torch._C._cuda_isCurrentStreamCapturing()):
        yield
        return
    key = _capturing_stream()
    entry = _SHARED.setdefault(key, {"ws": None, "depth": 0})
    entry["depth"] += 1
    try:
        yield
    finally:
        entry["depth"] -= 1
        if entry["depth"] == 0:
            del _SHARED[key]
