"""A client's local step replayed from a CUDA graph (the ``cuda_graph`` config key).

Why: on a GPU a quantized ResNet-20 step is host-bound. It makes about 700 kernel launches,
and the GPU works 2.3 of its 18 ms (docs/BENCHMARKS.md, "Where a GPU client step goes"). A
replayed graph launches them all in one call. Within a round everything a step touches
keeps its address:
- the model's codes, signs, scales and BatchNorm statistics;
- the optimizers' states;
- the client's data, already on the device.

No op in the step synchronizes with the host, and the bit-plane optimizer's keys come from
a count kept on the device (``BitPlaneOptimizer(device_keys=True)``). So one capture per
client per round serves every batch of the round's batch size.

The pattern is torch's whole-network capture (``torch.cuda.graphs``):
1. the first ``warmup`` batches run eagerly on a side stream; they are real steps, and they
   create the optimizers' states and compile every Triton kernel;
2. the next batch is captured, with the gradients set to None first, so that the backward
   allocates them in the graph's pool;
3. that batch and every later one of the same size replay the graph, after their indices
   are copied into the graph's input.

Any other batch (the last one of an epoch, which takes in the remainder) runs eagerly. Its
updates are in place on the same tensors, so eager and replayed steps mix freely.
"""
from __future__ import annotations

from typing import Callable

import torch

import fedmpq_kernels as fk

Tensor = torch.Tensor


class StepGraph:
    """Runs ``step(xb, yb)`` for the batches ``x[idx], y[idx]``, replaying one CUDA graph for
    every batch of ``batch`` indices.

    Args:
        step: one local step on a batch (forward, backward, the optimizers). It updates
            state only in place, and it must not synchronize with the host. It receives the
            batch as fresh tensors, so it may not keep them.
        x, y: the client's data on one CUDA device (inputs and labels; the first dimension
            indexes samples).
        batch: the batch size that is replayed; other sizes run eagerly.
        warmup: eager steps on a side stream before the capture (torch recommends a few).

    Raises:
        ValueError: x or y is not on a CUDA device, or batch < 1.
        RuntimeError: the capture failed (an op in the step that cannot run in a graph); the
            message names the cause and the way out (``cuda_graph false``). The caller's
            current device and streams are left as they were, so the process can go on.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], None], x: Tensor, y: Tensor, batch: int, warmup: int = 2):
        self.step, self.x, self.y = step, x, y
        self._open()
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        self.batch, self.warmup = int(batch), int(warmup)
        self.idx = torch.zeros(self.batch, dtype=torch.int64, device=x.device)  # the graph's input
        self.graph = None
        self.replays = 0  # steps run from the graph
        self.eager = 0  # steps run eagerly (warm-up and other batch sizes)

    def __call__(self, idx: Tensor) -> None:
        """One step on the samples ``idx`` (int64 indices on the data's device)."""
        if idx.numel() != self.batch:
            self._eager(idx)
        elif self.graph is None and self.eager < self.warmup:
            self._warm(idx)
        else:
            if self.graph is None:
                self._capture()
            self.idx.copy_(idx)
            self.graph.replay()
            self.replays += 1

    def _eager(self, idx: Tensor) -> None:
        self.step(self.x[idx], self.y[idx])
        self.eager += 1

    # The CUDA mechanics are these three methods (tests/fedmpq/test_step_graph.py emulates
    # them on the CPU to check the step's graph safety without a GPU).
    def _open(self) -> None:
        """Checks the data's device; makes the side stream of the warm-up and the capture."""
        x, y = self.x, self.y
        if x.device.type != "cuda" or y.device != x.device:
            raise ValueError(f"a CUDA graph needs the data on one CUDA device, got x on {x.device}, y on {y.device}")
        self._side = torch.cuda.Stream(device=x.device)

    def _warm(self, idx: Tensor) -> None:
        cur = torch.cuda.current_stream(self.x.device)
        self._side.wait_stream(cur)
        with torch.cuda.stream(self._side):
            self._eager(idx)
        cur.wait_stream(self._side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        dev = self.x.device
        # On the data's device, on a stream of that device: torch.cuda.graph's own capture
        # stream is made on the current device, and on cuda:N with another device current the
        # step's kernels would go to cuda:N's stream, outside the capture. (The graph replays
        # on the capture device's current stream.)
        with torch.cuda.device(dev):  # also what torch.cuda.graph synchronizes on entry
            prev = torch.cuda.current_stream(dev)
            try:
                with torch.cuda.graph(graph, stream=self._side):
                    self._captured_step()
            except RuntimeError as e:
                raise RuntimeError(f"capturing the local step in a CUDA graph failed ({_causes(e)}); run with "
                                   f"cuda_graph false (--cuda-graph false)") from e
            finally:
                # torch puts the caller's stream back only after a capture that ended well
                torch.cuda.set_stream(prev)
        self.graph = graph

    def _captured_step(self) -> None:
        """The step the graph holds: its batch is gathered from the data by ``self.idx``. Its
        reductions share one workspace (one zero fill in the graph, not one per call)."""
        with fk.capture_workspace():
            self.step(self.x.index_select(0, self.idx), self.y.index_select(0, self.idx))


def _causes(e: BaseException) -> str:
    """The error and what it interrupted, first cause first: when the step raises inside
    ``torch.cuda.graph``, its exit still ends the capture, and that error (capture
    invalidated) replaces the one that names the op."""
    chain = []
    while e is not None and len(chain) < 4:
        chain.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "; then ".join(reversed(chain))
