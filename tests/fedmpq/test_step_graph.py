"""fedmpq.step_graph's local step is graph-safe, checked on the CPU by emulating a CUDA graph.

A CUDA graph replays the kernels a capture recorded, with the arguments they had then; no
Python runs on a replay. So a step is graph-safe when every change it makes lives in its
ops on tensors that keep their addresses, and it reads no device value on the host during
the capture. The emulator records the ops a captured step dispatches (a TorchDispatchMode
sees aten and fedmpq ops alike) and replays them on the same tensors: a value baked in at
the capture (a Python int key, a count kept in Python, host data copied in) is replayed
unchanged, as on a GPU, and a host read in the capture raises, as it would there.

What it does not model: the CUDA and Triton kernels themselves (the CPU ones run), memory
reuse inside the graph's pool, device-to-host copies (no ops on the CPU) and host reads that
bypass the dispatcher (``tolist``, ``numpy``). The same round on a real GPU is
tests/fedmpq/test_client.py's CUDA test.
"""
from __future__ import annotations

import functools
import types

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedmpq import client, wire
from fedmpq import nn as qn
from fedmpq.nn import optim
from fedmpq.step_graph import StepGraph


# ops that read a device value on the host (a synchronization, not allowed while capturing)
_SYNCS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::_unique2",
          "aten::unique_dim", "aten::unique_consecutive"}
# ops that take host data into a tensor (torch.tensor(...)): on a GPU a copy from host memory
_HOST_DATA = {"aten::lift_fresh", "aten::lift_fresh_copy"}


class CaptureError(RuntimeError):
    """What a CUDA capture would refuse."""


class _Capture(TorchDispatchMode):
    """Records the ops run inside it, as a capture records kernels. It runs them too (the
    step needs their outputs), keeping the first value of every tensor they take, so that
    :meth:`undo` can take the capture's changes back: a CUDA capture runs nothing."""

    def __init__(self):
        super().__init__()
        self.ops = []  # (op, args, kwargs, outputs)
        self._saved = {}  # id(tensor) -> (tensor, its value when an op first took it)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "profiler":  # record_function's markers (Optimizer.step): not device work
            return func(*args, **kwargs)
        name = func._schema.name
        if name in _SYNCS:
            raise CaptureError(f"{func} reads a device value on the host inside a captured step")
        if name in _HOST_DATA:
            raise CaptureError(f"{func} copies host data into a captured step")
        # every argument, not only those the schema marks as written: native_batch_norm
        # updates its running statistics unmarked
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and id(t) not in self._saved:
                self._saved[id(t)] = (t, t.clone())
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out

    def undo(self) -> None:
        with torch.no_grad():
            for t, before in reversed(list(self._saved.values())):
                if not torch.equal(t, before):  # what the capture wrote (never an expanded input)
                    t.copy_(before)
        self._saved.clear()


class _Graph:
    """The recorded ops, replayed on the tensors they were recorded with. A fresh output of
    an op (made in the capture) keeps its tensor: the new value is copied into it."""

    def __init__(self, ops):
        self.ops = ops

    def replay(self) -> None:
        with torch.no_grad():
            for func, args, kwargs, recorded in self.ops:
                new = func(*args, **kwargs)
                for r, n in zip(tree_leaves(recorded), tree_leaves(new), strict=True):
                    if isinstance(r, torch.Tensor) and r.untyped_storage().data_ptr() != n.untyped_storage().data_ptr():
                        r.copy_(n)


class EmulatedStepGraph(StepGraph):
    """StepGraph with its CUDA mechanics emulated on the CPU."""

    def _open(self) -> None:
        pass

    def _warm(self, idx) -> None:
        self._eager(idx)

    def _capture(self) -> None:
        cap = _Capture()
        with cap:
            self._captured_step()
        cap.undo()
        self.graph = _Graph(cap.ops)


# ---- the emulator catches what a graph would get wrong ----

def _counter_step(state, host_reads=False, host_data=False):
    count = [0]

    def step(xb, yb):
        count[0] += 1
        state["w"].add_(xb.sum() * count[0])  # count[0] is a Python int: baked into a graph
        state["n"].add_(1)  # a device count: advances on every replay
        if host_reads:
            float(state["w"])
        if host_data:
            state["w"].add_(torch.tensor([1.0]))
    return step


def _run(steps, **kw):
    state = {"w": torch.zeros(1), "n": torch.zeros((), dtype=torch.int64)}
    x, y = torch.arange(12.0).view(12, 1), torch.zeros(12, dtype=torch.int64)
    g = EmulatedStepGraph(_counter_step(state, **kw), x, y, batch=2, warmup=1)
    for i in range(steps):
        g(torch.tensor([i % 12, (i + 5) % 12]))
    return g, state


def test_the_emulator_replays_device_counts_and_bakes_host_values_in():
    g, state = _run(5)
    assert (g.eager, g.replays) == (1, 4)
    assert int(state["n"]) == 5  # 1 eager step, 4 replays: the capture itself changed nothing
    # the eager step has count 1, the capture count 2, and every replay reuses that 2
    xs = [i + (i + 5) for i in range(5)]
    assert float(state["w"]) == xs[0] * 1 + sum(v * 2 for v in xs[1:])


def test_the_emulator_refuses_host_reads_and_host_data_in_a_capture():
    with pytest.raises(CaptureError, match="reads a device value on the host"):
        _run(3, host_reads=True)
    with pytest.raises(CaptureError, match="copies host data"):
        _run(3, host_data=True)
    _run(1, host_reads=True, host_data=True)  # eager steps may do either



def test_a_step_graph_refuses_an_empty_batch_and_data_off_cuda():
    """A batch size below 1 would capture a step on no samples, and data on the CPU (or x and
    y on different devices) cannot be captured: both are refused when the graph is made; a
    batch of 1 is the smallest one replayed."""
    x, y = torch.arange(4.0).view(4, 1), torch.zeros(4, dtype=torch.int64)
    state = {"w": torch.zeros(1), "n": torch.zeros((), dtype=torch.int64)}
    for batch in (0, -1):
        with pytest.raises(ValueError, match=rf"batch must be >= 1, got {batch}"):
            EmulatedStepGraph(_counter_step(state), x, y, batch=batch)
    g = EmulatedStepGraph(_counter_step(state), x, y, batch=1, warmup=0)
    for i in range(3):
        g(torch.tensor([i]))
    assert (g.eager, g.replays, int(state["n"])) == (0, 3, 3)
    with pytest.raises(ValueError, match=r"one CUDA device, got x on cpu, y on cpu"):
        StepGraph(_counter_step(state), x, y, batch=2)

# ---- the client's local step ----

# (builder, input shape, samples, batch size: 3 batches, the last one taking in the remainder)
MODELS = {
    "small_cnn": (functools.partial(qn.small_cnn, image_size=8, in_channels=1, num_classes=10), (1, 8, 8), 100, 32),
    "resnet20": (functools.partial(qn.resnet20, num_classes=10), (3, 32, 32), 52, 16),
}


def _data(shape, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return torch.randn(n, *shape, generator=g) * 0.5 + y.view(-1, *[1] * len(shape)).float() / 5, y


def _download(build, alg):
    """fp: the float model; else 4, 2, 6, 3, 4, 2, ... bits over the quantized layers."""
    torch.manual_seed(0)
    sd = build(quantized=False).state_dict()
    if alg == "fp":
        return wire.encode_model(wire.Model(1, sd))
    names = [n for n, _ in qn.bit_layers(build(quantized=True, bits=1))]
    layers = {f"{n}.weight": wire.QuantizedTensor.from_float(sd[f"{n}.weight"], (4, 2, 6, 3)[i % 4])
              for i, n in enumerate(names)}
    floats = {k: v for k, v in sd.items() if k not in layers}
    return wire.encode_download(wire.Download(3, 1, layers, floats))


def _round(alg, model, graphed, monkeypatch, epochs=3):
    build, shape, n, batch = MODELS[model]
    graphs = []

    class Recorded(EmulatedStepGraph):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            graphs.append(self)

    x, y = _data(shape, n)
    cfg = client.TrainConfig(alg=alg, local_epochs=epochs, batch_size=batch, cuda_graph=graphed, seed=1)
    with monkeypatch.context() as m:
        if graphed:
            m.setattr(client, "StepGraph", Recorded)
            m.setattr(optim, "host_reads_free", lambda device: False)  # the GPU's way on the CPU
        r = client.client_update(_download(build, alg), x, y, build, cfg, 0 if alg == "fp" else 3, 1, 4.0)
    return r, graphs


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("alg", ["fedmpq", "aqfl", "fp"])
def test_a_round_replayed_from_an_emulated_graph_uploads_the_eager_rounds_bytes(alg, model, monkeypatch):
    """The CUDA test's round (3 batches an epoch, the last one larger; 3 epochs), its steps
    captured and replayed on the CPU: the same upload, loss and accuracy as the eager round."""
    eager, _ = _round(alg, model, False, monkeypatch)
    graphed, graphs = _round(alg, model, True, monkeypatch)
    # epoch 1: 2 warm-up steps, then the remainder; epochs 2 and 3: the capture on the first
    # batch, 2 replays each, and the remainder
    assert len(graphs) == 1 and (graphs[0].eager, graphs[0].replays) == (2 + 3, 4)
    assert graphed.upload == eager.upload
    assert (graphed.train_loss, graphed.train_accuracy) == (eager.train_loss, eager.train_accuracy)


def _optimizer_states(device_keys, graphed, monkeypatch):
    """Eight bit-plane optimizer steps on batches of 16 (the last one of 4: eager), the
    layers' and the optimizer's state after them."""
    build, shape, _, _ = MODELS["small_cnn"]
    torch.manual_seed(0)
    model = build(quantized=True, bits=[4, 2, 6, 3])
    opt = qn.BitPlaneOptimizer(model, lr=0.5, seed=9, device_keys=device_keys)
    x, y = _data(shape, 52)

    def step(xb, yb):
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()

    with monkeypatch.context() as patch:
        patch.setattr(optim, "host_reads_free", lambda device: not graphed)
        run = EmulatedStepGraph(step, x, y, 16) if graphed else (lambda idx: step(x[idx], y[idx]))
        for i in range(8):
            run(torch.arange(i * 16, i * 16 + 16) % 52 if i != 3 else torch.arange(48, 52))
    layers = [layer for _, layer in qn.bit_layers(model)]
    return ([t.clone() for layer in layers for t in (layer.codes, layer.sign)],
            [t.clone() for st in opt.state.values() for t in (st["mom"], st["gs"])])


@pytest.mark.parametrize("device_keys", [True, False])
def test_the_optimizer_needs_device_keys_in_a_graph(device_keys, monkeypatch):
    """Why the bit-plane optimizer keeps its step count on the device under cuda_graph: with
    the host's int keys every replay draws the captured step's numbers (the stochastic
    rounding of small updates, kept in ``mom``), and the state departs from the eager steps'."""
    eager = _optimizer_states(False, False, monkeypatch)  # host keys: the reference draws
    graphed = _optimizer_states(device_keys, True, monkeypatch)
    same = [all(torch.equal(a, b) for a, b in zip(e, g, strict=True)) for e, g in zip(eager, graphed)]
    if device_keys:
        assert same == [True, True]
    else:
        assert not same[1]


def test_the_cpus_shortcuts_are_host_reads_a_capture_refuses(monkeypatch):
    """On the CPU the bit-plane optimizer reads values on the host (free there): under the
    emulator they are refused, as a GPU capture would refuse them."""
    build, shape, n, batch = MODELS["small_cnn"]
    x, y = _data(shape, n)
    monkeypatch.setattr(client, "StepGraph", EmulatedStepGraph)
    cfg = client.TrainConfig(alg="fedmpq", local_epochs=2, batch_size=batch, cuda_graph=True, seed=1)  # captures in epoch 2
    with pytest.raises(CaptureError, match="reads a device value on the host|copies host data"):
        client.client_update(_download(build, "fedmpq"), x, y, build, cfg, 3, 1, 4.0)


# ---- the capture's device and stream (torch.cuda's own graph context, on fake devices) ----

class _FakeCuda:
    """torch.cuda's current device and per-device current streams, for torch's real
    ``torch.cuda.graph`` and stream contexts to run on (a CPU build has no CUDA). The fake
    graph records where a capture began, and the step where its kernels would queue."""

    class Stream:
        def __init__(self, device=None, name="side"):
            self.device = torch.device("cuda", device.index if isinstance(device, torch.device) else
                                       _FakeCuda.now.current if device is None else device)
            self.name = name

        def __repr__(self):
            return f"{self.name} stream of {self.device}"

    now = None

    def __init__(self, current: int, fail_capture: bool):
        _FakeCuda.now = self
        self.current, self.fail_capture = current, fail_capture
        self.streams = {i: self.Stream(i, "default") for i in range(3)}
        self.captured_on = self.synced = None

    def device(self, d):
        fake = self

        class _Device:
            def __enter__(self):
                self.prev, fake.current = fake.current, (d.index if isinstance(d, torch.device) else d)

            def __exit__(self, *exc):
                fake.current = self.prev
        return _Device()

    def current_stream(self, device=None):
        return self.streams[self.current if device is None else device.index]

    def set_stream(self, s):
        self.current = s.device.index  # as torch's: the stream's device becomes current
        self.streams[s.device.index] = s

    def synchronize(self, device=None):
        self.synced = self.current

    def graph_type(self):
        fake = self

        class CUDAGraph:
            def capture_begin(self, *pool, **kw):
                fake.captured_on = fake.current_stream()

            def capture_end(self):
                if fake.fail_capture:
                    raise RuntimeError("operation not permitted when stream is capturing")
        return CUDAGraph


@pytest.fixture
def fake_cuda(monkeypatch):
    def make(current: int, fail_capture: bool = False) -> _FakeCuda:
        fake = _FakeCuda(current, fail_capture)
        for name in ("device", "current_stream", "set_stream", "synchronize"):
            monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
        monkeypatch.setattr(torch.cuda, "Stream", _FakeCuda.Stream)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", fake.graph_type())
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        monkeypatch.setattr(torch._C, "_host_emptyCache", lambda: None, raising=False)  # absent from CPU builds
        monkeypatch.setattr(torch.cuda, "_get_device_index", lambda d, optional=False: fake.current)
        monkeypatch.setattr(torch.cuda.graph, "default_capture_stream", None)
        return fake
    return make


def _graph_on(index: int):
    """A StepGraph of data on cuda:index (stand-ins: the fake devices hold no tensors) whose
    step records the stream its kernels would queue on."""
    data = types.SimpleNamespace(device=torch.device("cuda", index), index_select=lambda dim, idx: None)
    queued = []
    g = StepGraph.__new__(StepGraph)
    g.step, g.x, g.y, g.idx = (lambda xb, yb: queued.append(torch.cuda.current_stream(data.device))), data, data, None
    g.graph = None
    g._open()
    return g, queued


@pytest.mark.parametrize("current, data", [(0, 0), (0, 1), (2, 1)])
def test_the_step_is_captured_on_the_datas_device_whatever_device_is_current(fake_cuda, current, data):
    """The capture begins on a stream of the data's device, the very stream the step's
    kernels queue on (with torch.cuda.graph's own capture stream, made on the current device,
    a step on cuda:1 queued its kernels outside the capture); the device synchronized on entry
    is the data's; the caller's device and streams are as they were after it."""
    fake = fake_cuda(current)
    g, queued = _graph_on(data)
    before = dict(fake.streams)
    g._capture()
    assert fake.captured_on is g._side and g._side.device.index == data
    assert queued == [fake.captured_on]
    assert fake.synced == data
    assert (fake.current, fake.streams) == (current, before)


@pytest.mark.parametrize("current, data", [(0, 0), (0, 1)])
def test_a_failed_capture_leaves_the_callers_device_and_streams(fake_cuda, current, data):
    """A capture that fails at its end (torch's context then leaves the capture stream
    current) raises the way out (cuda_graph false) and puts the caller's streams back, so the
    process can go on eagerly."""
    fake = fake_cuda(current, fail_capture=True)
    g, _ = _graph_on(data)
    before = dict(fake.streams)
    with pytest.raises(RuntimeError,
                       match=r"CUDA graph failed \(RuntimeError: operation not permitted.*--cuda-graph false"):
        g._capture()
    assert (fake.current, fake.streams) == (current, before)
    assert g.graph is None  # the next batch would try again, and fail the same way


def test_a_failed_capture_names_the_error_the_step_raised(fake_cuda):
    """When an op of the step fails inside the capture, torch's exit ends the capture anyway,
    and that error replaces the step's: the message names both, the op's first."""
    fake_cuda(0, fail_capture=True)
    g, _ = _graph_on(0)

    def step(xb, yb):
        raise RuntimeError("an op that cannot be captured")
    g.step = step
    with pytest.raises(RuntimeError, match=r"failed \(RuntimeError: an op that cannot be captured; then "
                                           r"RuntimeError: operation not permitted"):
        g._capture()
