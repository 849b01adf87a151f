"""Server aggregation: K uploads streamed into the float global model, straight from bytes.

ALGORITHM.md, "Server round", step 1: decode each upload, de-quantize, average every state
entry over the clients that reported (unweighted, as the authors do, or weighted by sample
count). Each upload is checked whole (format, checksum, and that it has the model's tensors
with the model's shapes) before anything is added, so a bad upload leaves the sum as it was;
it is then added layer by layer with one fused de-quantize-and-accumulate per quantized layer
(``fedmpq_kernels.dequant_accumulate``, reading the packed planes) and one add per run of
float tensors: no float copy of a client's model is ever made. The statistics the server
needs for bit reassignment (each client's N and Delta per layer, its samples and budget) come
out of the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

import fedmpq_kernels as fk

from . import wire

Tensor = torch.Tensor
WEIGHTINGS = ("mean", "samples")


@dataclass(frozen=True)
class ClientStats:
    """What the server keeps of one upload for bit reassignment (ALGORITHM.md steps 2-4)."""

    client_id: int
    round: int
    num_samples: int
    budget: float
    bits: Dict[str, int]  # N per quantized layer
    deltas: Dict[str, int]  # Delta per quantized layer


class Aggregator:
    """Sum of K uploads, then their mean.

    Args:
        weighting: ``"mean"``: every upload counts once (the authors' rule);
            ``"samples"``: weighted by its sample count |D_k|.

    The first upload fixes the model's layout (names, which are quantized, shapes, float
    dtypes); every later one must match it exactly, else :class:`fedmpq.wire.WireFormatError`.
    """

    def __init__(self, weighting: str = "mean") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.stats: List[ClientStats] = []
        self._layout: Optional[Dict[str, Tuple[int, Tuple[int, ...]]]] = None
        self._acc: Dict[str, Tensor] = {}
        self._total = 0.0

    def add(self, data) -> ClientStats:
        """Check one upload's bytes whole, then add it. Returns its statistics.

        Raises:
            fedmpq.wire.WireFormatError: the bytes do not decode, or do not match the
                layout of the uploads added before (nothing is added then).
        """
        p = wire._parse(data, wire.KIND_UPLOAD)
        client_id, num_samples, rnd, budget = p.meta
        w = 1.0 if self.weighting == "mean" else float(num_samples)
        if w <= 0:
            raise wire.WireFormatError(f"upload of client {client_id} reports {num_samples} samples: it cannot be weighted by them")
        layout = {e.name: (e.dtype, e.shape) for e in p.entries}
        if self._layout is None:
            self._layout = layout
            self._acc = {
                e.name: torch.zeros(e.numel, dtype=torch.float64 if e.dtype == wire.DT_INT64 else torch.float32)
                for e in p.entries
            }
        elif layout != self._layout:
            raise wire.WireFormatError(f"upload of client {client_id} does not match the model: {_diff(self._layout, layout)}")

        buf = bytearray(p.data)  # one private copy: the tensors below are views into it
        bits, deltas = {}, {}
        run = []  # consecutive float32 entries, added as one view
        for e in p.entries:
            if e.dtype == wire.DT_FLOAT32 and e.numel and (not run or run[-1].offset + run[-1].nbytes == e.offset):
                run.append(e)
                continue
            self._add_run(buf, run, w)
            run = [e] if e.dtype == wire.DT_FLOAT32 and e.numel else []
            if e.dtype == wire.DT_QUANTIZED:
                nb = wire._bitmap_nbytes(e.numel)
                planes = wire._view(buf, e.offset, e.bits * nb, torch.uint8)
                signs = wire._view(buf, e.offset + e.bits * nb, nb, torch.uint8)
                fk.dequant_accumulate(self._acc[e.name], planes, signs, e.bits, e.scale, w)
                bits[e.name], deltas[e.name] = e.bits, e.delta
            elif e.dtype in (wire.DT_FLOAT16, wire.DT_INT64):
                acc = self._acc[e.name]
                acc.add_(wire._view(buf, e.offset, e.numel, wire._TORCH_DTYPES[e.dtype]).to(acc.dtype), alpha=w)
        self._add_run(buf, run, w)
        self._total += w
        st = ClientStats(client_id, rnd, num_samples, float(budget), bits, deltas)
        self.stats.append(st)
        return st

    def _add_run(self, buf: bytearray, run, w: float) -> None:
        if not run:
            return
        total = sum(e.numel for e in run)
        view = wire._view(buf, run[0].offset, total, torch.float32)
        at = 0
        for e in run:  # each a slice of the one view: no copies
            self._acc[e.name].add_(view[at:at + e.numel], alpha=w)
            at += e.numel

    @property
    def count(self) -> int:
        """Uploads added so far."""
        return len(self.stats)

    def result(self) -> Dict[str, Tensor]:
        """The mean of every state entry, in the model's shapes: float32 for quantized and
        float tensors, int64 (rounded) for integer ones.

        Raises:
            RuntimeError: no upload was added.
        """
        if self._layout is None or self._total <= 0:
            raise RuntimeError("no upload was added: there is nothing to average")
        out = {}
        for name, (dt, shape) in self._layout.items():
            mean = self._acc[name] / self._total
            out[name] = (mean.round().to(torch.int64) if dt == wire.DT_INT64 else mean).reshape(shape)
        return out


def _diff(want: Dict[str, tuple], got: Dict[str, tuple]) -> str:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    bad = [n for n in want if want[n] != got[n]]
    n = bad[0]
    kinds = {wire.DT_QUANTIZED: "quantized", wire.DT_FLOAT32: "float32", wire.DT_FLOAT16: "float16", wire.DT_INT64: "int64"}
    return f"{n}: expected {kinds[want[n][0]]} {want[n][1]}, got {kinds[got[n][0]]} {got[n][1]}"
