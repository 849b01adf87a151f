"""Server aggregation: K uploads streamed into the float global model, straight from bytes.

ALGORITHM.md, "Server round", step 1: decode each upload, de-quantize, average every state
entry over the clients that reported (unweighted, as the authors do, or weighted by sample
count). Each upload is checked whole (format, checksum, and that it holds the model's
tensors with the model's shapes) before anything is added, so a bad upload leaves the sum as
it was. It is then added with one fused de-quantize-and-accumulate call for all its
quantized layers (``fedmpq_kernels.dequant_accumulate_layers``, reading the packed planes
in place) and one add per run of float tensors: no float copy of a client's model is ever
made. The statistics the server needs for bit reassignment (each client's N and Delta per
layer, its samples and budget) come out of the same pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
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


@dataclass
class _Layout:
    """The model as the first upload laid it out: entry order, dtypes, shapes, and where each
    entry sits in the flat accumulators (quantized layers in one float32 buffer; each run of
    same-dtype float entries that are contiguous in the payload in one buffer)."""

    names: List[str]
    dtype: np.ndarray
    dims: np.ndarray
    ndim: np.ndarray
    quant: np.ndarray  # row indices of quantized entries, in order
    qoff: np.ndarray  # their offsets in the quantized accumulator
    segments: List[Tuple[int, int, int]]  # (first row, last row + 1, dtype) of float runs
    table: np.ndarray  # int64 (quantized layers, 4): the dequant_accumulate_layers rows, reused


def _layout(p: wire.Parsed) -> _Layout:
    quant = np.flatnonzero(p.dtype == wire.DT_QUANTIZED)
    qn = p.numel[quant]
    qoff = np.concatenate([[0], np.cumsum(qn)[:-1]]).astype(np.int64) if len(quant) else np.zeros(0, np.int64)
    segments = []
    i, n = 0, len(p.names)
    while i < n:
        if p.dtype[i] == wire.DT_QUANTIZED:
            i += 1
            continue
        j = i + 1
        while (j < n and p.dtype[j] == p.dtype[i] and p.dtype[i] != wire.DT_FLOAT16
               and p.offset[j] == p.offset[j - 1] + p.nbytes[j - 1]):
            j += 1
        segments.append((i, j, int(p.dtype[i])))
        i = j
    table = np.zeros((len(quant), 4), dtype=np.int64)
    table[:, 0], table[:, 1] = qoff, p.numel[quant]
    return _Layout(list(p.names), p.dtype.copy(), p.dims.copy(), p.ndim.copy(), quant, qoff, segments, table)


class Aggregator:
    """Sum of K uploads, then their mean.

    Args:
        weighting: ``"mean"``: every upload counts once (the authors' rule);
            ``"samples"``: weighted by its sample count |D_k|.

    The first upload fixes the model's layout (names and their order, which are quantized,
    shapes, float dtypes); every later one must have the same tensors with the same shapes,
    else :class:`fedmpq.wire.WireFormatError` (uploads that list them in another order are
    accepted, on a slower path).
    """

    def __init__(self, weighting: str = "mean") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        self.weighting = weighting
        self.stats: List[ClientStats] = []
        self._lay: Optional[_Layout] = None
        self._known: Optional[wire.Parsed] = None  # the first upload: later ones parse faster against it
        self._qacc: Optional[Tensor] = None
        self._facc: List[Tensor] = []
        self._total = 0.0

    def add(self, data, client_id: Optional[int] = None, round_: Optional[int] = None) -> ClientStats:
        """Check one upload's bytes whole, then add it. Returns its statistics.

        ``client_id``/``round_``: when given, the upload must say it is that client's upload
        of that round (a client that claims to be another is refused before anything is added).

        Raises:
            fedmpq.wire.WireFormatError: the bytes do not decode, claim another client or
                round, or do not match the layout of the uploads added before (nothing is
                added then).
        """
        p = wire.parse(data, wire.KIND_UPLOAD, self._known)
        meta_client, num_samples, rnd, budget = p.meta
        if (client_id is not None and meta_client != client_id) or (round_ is not None and rnd != round_):
            raise wire.WireFormatError(f"the upload says it is client {meta_client}'s of round {rnd}, "
                                       f"expected client {client_id}'s of round {round_}")
        client_id = meta_client
        w = 1.0 if self.weighting == "mean" else float(num_samples)
        if w <= 0:
            raise wire.WireFormatError(f"upload of client {client_id} reports {num_samples} samples: it cannot be weighted by them")
        lay = self._lay or _layout(p)
        order = None if p.same_layout else self._order(lay, p, client_id)
        if self._lay is None:
            self._lay, self._known = lay, p
            self._qacc = torch.zeros(int(p.numel[lay.quant].sum()), dtype=torch.float32)
            self._facc = [
                torch.zeros(int(p.numel[a:b].sum()), dtype=torch.float64 if dt == wire.DT_INT64 else torch.float32)
                for a, b, dt in lay.segments
            ]
        buf = torch.frombuffer(bytearray(p.data), dtype=torch.uint8)  # one private, aligned copy
        if buf.data_ptr() % 4:
            buf = buf.clone()
        rows = lay.quant if order is None else order[lay.quant]
        # Quantized layers: one call, straight from the packed planes.
        table = lay.table  # acc offsets and sizes are the layout's; bits and offsets this upload's
        table[:, 2] = p.bits[rows]
        table[:, 3] = p.offset[rows]
        coefs = fk.layer_coefs(p.scale[rows], p.bits[rows], w)
        fk.dequant_accumulate_layers(self._qacc, buf, torch.from_numpy(table), coefs)
        # Float runs: one add each (or per entry, when this upload orders them differently).
        for (a, b, dt), acc in zip(lay.segments, self._facc):
            if order is None:
                chunks = [self._floats(buf, p, a, b, dt)]
            else:
                chunks = [self._floats(buf, p, int(r), int(r) + 1, dt) for r in order[a:b]]
            acc.add_(torch.cat(chunks) if len(chunks) > 1 else chunks[0], alpha=w)
        self._total += w
        names = [lay.names[i] for i in lay.quant]
        st = ClientStats(client_id, rnd, num_samples, float(budget), dict(zip(names, p.bits[rows].tolist())),
                         dict(zip(names, p.delta[rows].tolist())))
        self.stats.append(st)
        return st

    @staticmethod
    def _floats(buf: Tensor, p, a: int, b: int, dt: int) -> Tensor:
        """Rows a..b-1 (contiguous in the payload) as one tensor in the accumulator's dtype."""
        n = int(p.numel[a:b].sum())
        start = int(p.offset[a])
        raw = buf[start:start + n * wire.ITEMSIZE[dt]]
        if dt == wire.DT_FLOAT32:
            return raw.view(torch.float32)  # entries sit at 4-byte-aligned offsets
        # int64 entries need 8-byte alignment to be viewed: copy the (few) bytes first
        return raw.clone().view(wire.TORCH_DTYPES[dt]).to(torch.float64 if dt == wire.DT_INT64 else torch.float32)

    @staticmethod
    def _order(lay: _Layout, p, client_id) -> Optional[np.ndarray]:
        """None when the upload lists the layout's entries in its order; else, per layout
        row, the upload's row. Raises when the tensors or their shapes differ."""
        if (p.names == lay.names and np.array_equal(p.dtype, lay.dtype) and np.array_equal(p.ndim, lay.ndim)
                and np.array_equal(p.dims, lay.dims)):
            return None
        where = {nm: i for i, nm in enumerate(p.names)}
        missing = [nm for nm in lay.names if nm not in where]
        extra = sorted(set(p.names) - set(lay.names))
        if missing or extra:
            raise wire.WireFormatError(f"upload of client {client_id} does not match the model: "
                                       f"missing {missing[:3]}, unexpected {extra[:3]}")
        order = np.array([where[nm] for nm in lay.names], dtype=np.int64)
        bad = np.flatnonzero((p.dtype[order] != lay.dtype) | (p.ndim[order] != lay.ndim)
                             | (p.dims[order] != lay.dims).any(axis=1))
        if len(bad):
            i, r = int(bad[0]), int(order[bad[0]])
            raise wire.WireFormatError(
                f"upload of client {client_id} does not match the model: {lay.names[i]}: expected "
                f"{_kind(lay.dtype[i])} {_shape(lay, i)}, got {_kind(p.dtype[r])} {tuple(p.dims[r][:p.ndim[r]].tolist())}")
        return order

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
        lay = self._lay
        if lay is None or self._total <= 0:
            raise RuntimeError("no upload was added: there is nothing to average")
        out = {}
        q = self._qacc / self._total
        for row, off in zip(lay.quant.tolist(), lay.qoff.tolist()):
            shape = _shape(lay, row)
            n = int(np.prod(shape, dtype=np.int64))
            out[lay.names[row]] = q[off:off + n].reshape(shape)
        for (a, b, dt), acc in zip(lay.segments, self._facc):
            mean = acc / self._total
            at = 0
            for row in range(a, b):
                shape = _shape(lay, row)
                n = int(np.prod(shape, dtype=np.int64))
                t = mean[at:at + n].reshape(shape)
                out[lay.names[row]] = t.round().to(torch.int64) if dt == wire.DT_INT64 else t
                at += n
        return {nm: out[nm] for nm in lay.names}


def _shape(lay: _Layout, row: int) -> Tuple[int, ...]:
    return tuple(lay.dims[row][: int(lay.ndim[row])].tolist())


def _kind(dt) -> str:
    return {wire.DT_QUANTIZED: "quantized", wire.DT_FLOAT32: "float32", wire.DT_FLOAT16: "float16",
            wire.DT_INT64: "int64"}[int(dt)]
