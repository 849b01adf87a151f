"""torch.cuda's Python for host CUDA (fake_cuda.cpp): the functions a CPU-only build has no
backing for, answered for one device whose memory is host memory. :func:`install` after the
library is loaded and torch imported (``load`` in __init__.py does both)."""
from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch


class _Stream(SimpleNamespace):
    """A stream: every call is ordered on the host, so each is stream 0 and waits for nothing."""

    def __init__(self, device=None, priority=0, **_):
        super().__init__(cuda_stream=0, device=torch.device("cuda", 0), stream_id=0, device_index=0,
                         device_type=1, priority=priority)

    def synchronize(self):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event or _Event()

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _Stream)

    def __hash__(self):
        return 0


class _Event(SimpleNamespace):
    def __init__(self, *args, **kw):
        super().__init__()

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True


_STREAM = _Stream()


@contextlib.contextmanager
def _stream_ctx(stream=None):
    yield


class _DeviceCtx:
    """torch.cuda.device: one device, nothing to switch."""

    def __init__(self, device):
        idx = torch.device("cuda", device).index if isinstance(device, int) else (
            None if device is None else torch.device(device).index)
        if idx not in (None, -1, 0):
            raise RuntimeError(f"host CUDA has one device (cuda:0), asked for {device}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _one_device(device=None) -> int:
    if device is not None:
        idx = device if isinstance(device, int) else torch.device(device).index
        if idx not in (None, 0):
            raise RuntimeError(f"host CUDA has one device (cuda:0), asked for {device}")
    return 0


def install() -> None:
    """Point torch.cuda's Python at host CUDA: available, one device, streams and events that
    order nothing (the host runs every op in turn), synchronize a no-op."""
    c = torch.cuda
    patches = {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "_lazy_init": lambda: None,
        "init": lambda: None,
        "device_count": lambda: 1,
        "current_device": lambda: 0,
        "set_device": _one_device,
        "synchronize": lambda device=None: (_one_device(device), None)[1],
        "get_device_name": lambda device=None: (_one_device(device), "host CUDA (tests/fake_cuda)")[1],
        "get_device_capability": lambda device=None: (_one_device(device), (9, 0))[1],
        "device": _DeviceCtx,
        "Stream": _Stream,
        "ExternalStream": lambda ptr, device=None: _STREAM,
        "Event": _Event,
        "current_stream": lambda device=None: (_one_device(device), _STREAM)[1],
        "default_stream": lambda device=None: (_one_device(device), _STREAM)[1],
        "stream": _stream_ctx,
        "set_stream": lambda stream: None,
        "is_current_stream_capturing": lambda: False,
        "manual_seed": lambda seed: None,
        "manual_seed_all": lambda seed: None,
        "empty_cache": lambda: None,
        "memory_allocated": lambda device=None: 0,
        "set_sync_debug_mode": lambda mode: None,
        "get_sync_debug_mode": lambda: 0,
    }
    for name, fn in patches.items():
        setattr(c, name, fn)
    # the CPU's generator draws for host CUDA (fake_cuda.cpp's hooks): its state is the device's
    c.default_generators = (torch.default_generator,)
    # the bindings fedmpq_kernels._device calls, which a CPU-only torch._C lacks
    for name, fn in {"_cuda_getDevice": lambda: 0, "_cuda_getCurrentRawStream": lambda idx: (_one_device(idx), 0)[1],
                     "_cuda_isCurrentStreamCapturing": lambda: False}.items():
        setattr(torch._C, name, fn)
