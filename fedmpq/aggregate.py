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

import math
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import fedmpq_kernels as fk

from . import wire
from .allocation import same_budget

Tensor = torch.Tensor
WEIGHTINGS = ("mean", "samples")
# Coordinate-wise rules: the (weighted) mean, streamed; the median and the trimmed mean (cuts
# trim_count(K) values at each end; as Flower's FedMedian and FedTrimmedAvg) keep
# every upload's de-quantized values until the round ends.
RULES = ("mean", "median", "trimmed_mean")
TRIM = 0.2
# The most the uploads' largest magnitudes (times their weights) may add up to in a round: half
# of float32's range, a margin for the coefficients' rounding, so no sum the rules take overflows.
SUM_LIMIT = 2.0 ** 127
_INT64_MAX_F64 = float(2 ** 63 - 1024)  # the largest float64 below 2^63


def int_mean(mean: Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
    """A float64 mean of integer entries (``num_batches_tracked``) back as ``dtype``: rounded,
    and clamped below 2^63 (a mean of values near 2^63 - 1 rounds to 2^63 in float64, which
    does not convert: it became -2^63)."""
    return mean.round().clamp_(-2.0 ** 63, _INT64_MAX_F64).to(dtype)


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
    qnames: List[str]  # names of the quantized entries, in order
    # the float32 entries that cannot be negative (NONNEGATIVE): their rows, and for each of
    # their elements its row's index among them and its place in the row
    nonneg_rows: np.ndarray
    nonneg_of: np.ndarray
    nonneg_at: np.ndarray


# Entries no client can hold negative (torch's BatchNorm name): one client's negative running
# variance averaged in gave the global model NaN outputs.
NONNEGATIVE = ("running_var",)


def is_nonnegative(name: str) -> bool:
    """Whether a state entry of this name can never be negative (:data:`NONNEGATIVE`)."""
    return name.rpartition(".")[2] in NONNEGATIVE


@dataclass
class ModelLayout:
    """What every upload must hold: the model's entries (names), each quantized or of a float
    dtype, and their shapes. The server makes it from its model (:func:`model_layout`), so a
    faulty first upload cannot set the layout the honest ones are held to."""

    names: List[str]
    dtype: np.ndarray
    dims: np.ndarray
    ndim: np.ndarray


def model_layout(state: Dict[str, Tensor], quantized) -> ModelLayout:
    """The :class:`ModelLayout` of a model's state dict; ``quantized``: the names of its
    quantized (bit-plane) weights. Float entries travel as float32 or int64."""
    names = list(state)
    q = set(quantized)
    missing = q - set(names)
    if missing:
        raise ValueError(f"quantized entries not in the state: {sorted(missing)[:3]}")
    dtype = np.array([wire.DT_QUANTIZED if nm in q else wire.DT_INT64 if state[nm].dtype == torch.int64
                      else wire.DT_FLOAT32 for nm in names], dtype=np.uint8)
    dims = np.zeros((len(names), wire.MAX_DIMS), dtype=np.uint32)
    ndim = np.zeros(len(names), dtype=np.uint8)
    for i, nm in enumerate(names):
        shape = tuple(state[nm].shape)
        ndim[i] = len(shape)
        dims[i, :len(shape)] = shape
    return ModelLayout(names, dtype, dims, ndim)


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
    names = list(p.names)
    nonneg = np.array([r for r, nm in enumerate(names) if p.dtype[r] == wire.DT_FLOAT32 and is_nonnegative(nm)],
                      dtype=np.int64)
    counts = p.numel[nonneg]
    of = np.repeat(np.arange(len(nonneg)), counts)
    at = np.arange(len(of)) - np.repeat(np.cumsum(counts) - counts, counts)
    return _Layout(names, p.dtype.copy(), p.dims.copy(), p.ndim.copy(), quant, qoff, segments, table,
                   [names[j] for j in quant], nonneg, of, at)


class Aggregator:
    """Sum of K uploads, then their mean (or another coordinate-wise rule).

    Args:
        weighting: ``"mean"``: every upload counts once (the authors' rule);
            ``"samples"``: weighted by its sample count |D_k| (``rule="mean"`` only).
        rule: one of :data:`RULES`.
        expected: the model's :class:`ModelLayout`; every upload must hold exactly its
            entries with their shapes (in any order), else it is refused. Without it, the
            first upload fixes the layout the later ones are held to.

    Every upload is checked whole before anything of it is added: format, checksum, the
    client and round it claims (and that it is that client's first), the layout, that its
    float tensors are finite (a scale that is not finite never decodes) and its BatchNorm
    running variances not negative, and that its largest magnitude (times its weight) keeps
    the round's under :data:`SUM_LIMIT`, so no float32 sum overflows. A refused upload leaves
    the aggregate as it was.
    """

    def __init__(self, weighting: str = "mean", rule: str = "mean", expected: Optional[ModelLayout] = None) -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        if rule != "mean" and weighting != "mean":
            raise ValueError(f"the {rule} rule is unweighted: use weighting='mean'")
        self.weighting, self.rule, self.expected = weighting, rule, expected
        self.stats: List[ClientStats] = []
        self._clients: set = set()  # the clients whose uploads were added
        self._lay: Optional[_Layout] = None
        self._known: Optional[wire.Parsed] = None  # the first upload: later ones parse faster against it
        self._qacc: Optional[Tensor] = None
        self._facc: List[Tensor] = []
        self._kept: List[List[Tensor]] = []  # robust rules: each upload's values, per accumulator
        self._total = 0.0
        self._bound = 0.0  # sum of w * max |value| over the uploads added: bounds every sum

    def add(self, data, client_id: Optional[int] = None, round_: Optional[int] = None,
            budget: Optional[float] = None, num_samples: Optional[int] = None,
            assigned: Optional[Mapping[str, int]] = None, may_prune: bool = True) -> ClientStats:
        """Check one upload's bytes whole, then add it. Returns its statistics.

        ``client_id``/``round_``: when given, the upload must say it is that client's upload
        of that round (a client that claims to be another is refused before anything is added).
        ``budget``/``num_samples``: when given, the upload must state that budget (as the
        wire stores it, in float32) and that sample count: a server that knows its clients
        holds them to it, so that no upload can change the weights it is aggregated and
        reassigned with.
        ``assigned``: when given (quantized layer name -> the bit-width the client was sent),
        every layer's N + Delta must equal it (Delta: the bits pruned, ALGORITHM.md), and with
        ``may_prune`` False (AQFL, FP8: nothing is pruned) Delta must be 0: no upload claims more
        bits than it was given, or prunings it could not have made.

        Raises:
            fedmpq.wire.WireFormatError: the bytes do not decode, claim another client,
                round, budget, sample count or bit-widths, do not match the model's layout (or
                the first upload's), or hold a float value that is not finite (nothing is added
                then).
        """
        p = wire.parse(data, wire.KIND_UPLOAD, self._known)
        meta_client, meta_samples, rnd, meta_budget = p.meta
        if not (math.isfinite(meta_budget) and 0 < meta_budget <= 32):  # FORMAT.md; as decode_upload
            raise wire.WireFormatError(f"the upload of client {meta_client} states budget {meta_budget}, outside (0, 32]")
        if (client_id is not None and meta_client != client_id) or (round_ is not None and rnd != round_):
            raise wire.WireFormatError(f"the upload says it is client {meta_client}'s of round {rnd}, "
                                       f"expected client {client_id}'s of round {round_}")
        if budget is not None and not same_budget(meta_budget, budget):
            raise wire.WireFormatError(f"the upload of client {meta_client} states budget {meta_budget}, "
                                       f"the server has {budget}")
        if num_samples is not None and meta_samples != num_samples:
            raise wire.WireFormatError(f"the upload of client {meta_client} states {meta_samples} samples, "
                                       f"the server has {num_samples}")
        num_samples, budget = meta_samples, meta_budget
        client_id = meta_client
        if client_id in self._clients:  # counted twice, it outweighed the others
            raise wire.WireFormatError(f"upload of client {client_id}: this aggregate already holds one of that client")
        w = 1.0 if self.weighting == "mean" else float(num_samples)
        if w <= 0:
            raise wire.WireFormatError(f"upload of client {client_id} reports {num_samples} samples: it cannot be weighted by them")
        if self._lay is None:
            if self.expected is not None:
                self._order(self.expected, p, client_id)  # raises when it is not the model
            # The accumulators follow the first upload's own order (result() gives the model's):
            # later uploads of that layout then take the fast path, one add per float run,
            # where the model's order (quantized weights between the BatchNorm entries) would
            # split the floats into a run per layer and send every upload down the per-entry path.
            lay = _layout(p)
        else:
            lay = self._lay
        order = None if (p.same_layout or lay is not self._lay) else self._order(lay, p, client_id)
        buf = torch.frombuffer(bytearray(p.data), dtype=torch.uint8)  # one private, aligned copy
        if buf.data_ptr() % 4:
            buf = buf.clone()
        # Float runs, checked finite before anything is added (one add each later, or per
        # entry when this upload orders them differently).
        floats = []
        peak = 0.0  # the upload's largest magnitude: a quantized value is at most its scale
        for a, b, dt in lay.segments:
            if order is None:
                chunks = [self._floats(buf, p, a, b, dt)]
            else:
                chunks = [self._floats(buf, p, int(r), int(r) + 1, dt) for r in order[a:b]]
            f = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
            if dt != wire.DT_INT64 and f.numel():
                m = float(f.abs().max())  # NaN or inf when the run holds one: one pass for both checks
                if not m < math.inf:
                    bad = next(lay.names[r] for r in range(a, b)
                               if not bool(torch.isfinite(self._floats(buf, p, *self._row(order, r), dt)).all()))
                    raise wire.WireFormatError(f"upload of client {client_id}: {bad} holds NaN or inf")
                peak = max(peak, m)
            floats.append(f)
        if len(lay.nonneg_of):  # every element of them in one gather from the payload's bytes
            rows = lay.nonneg_rows if order is None else order[lay.nonneg_rows]
            values = np.frombuffer(p.data, np.float32, len(p.data) // 4)[(p.offset[rows] // 4)[lay.nonneg_of]
                                                                          + lay.nonneg_at]
            neg = np.flatnonzero(values < 0)
            if len(neg):
                raise wire.WireFormatError(f"upload of client {client_id}: {lay.names[lay.nonneg_rows[lay.nonneg_of[neg[0]]]]} "
                                           "holds a negative value")
        rows = lay.quant if order is None else order[lay.quant]
        qbits, qscale = p.bits[rows], p.scale[rows]  # this upload's, in the layout's order
        bits, delta = qbits.tolist(), p.delta[rows].tolist()  # lists: ~20 layers, no numpy ops
        if assigned is not None:
            self._check_bits(lay.qnames, bits, delta, assigned, may_prune, client_id)
        if len(rows):
            peak = max(peak, float(qscale.max()))
        if self._bound + w * peak > SUM_LIMIT:  # finite values whose sum would overflow to inf
            raise wire.WireFormatError(f"upload of client {client_id}: values up to {peak:.3g} (weight {w:g}) "
                                       f"would overflow the round's float32 sums")
        if self._lay is None:
            self._lay, self._known = lay, p
            self._qacc = torch.zeros(int(p.numel[lay.quant].sum()), dtype=torch.float32)
            self._facc = [
                torch.zeros(int(p.numel[a:b].sum()), dtype=torch.float64 if dt == wire.DT_INT64 else torch.float32)
                for a, b, dt in lay.segments
            ]
        # Quantized layers: one call, straight from the packed planes.
        table = lay.table  # acc offsets and sizes are the layout's; bits and offsets this upload's
        table[:, 2] = qbits
        table[:, 3] = p.offset[rows]
        coefs = fk.layer_coefs(qscale, qbits, w)
        if self.rule == "mean":
            fk.dequant_accumulate_layers(self._qacc, buf, torch.from_numpy(table), coefs)
            for f, acc in zip(floats, self._facc):
                acc.add_(f, alpha=w)
        else:
            q = torch.zeros_like(self._qacc)
            fk.dequant_accumulate_layers(q, buf, torch.from_numpy(table), coefs)
            self._kept.append([q] + [f.to(acc.dtype) for f, acc in zip(floats, self._facc)])
        self._total += w
        self._bound += w * peak
        st = ClientStats(client_id, rnd, num_samples, float(budget), dict(zip(lay.qnames, bits)),
                         dict(zip(lay.qnames, delta)))
        self.stats.append(st)
        self._clients.add(client_id)
        return st

    @staticmethod
    def _check_bits(qnames: List[str], bits: List[int], delta: List[int], assigned: Mapping[str, int],
                    may_prune: bool, client_id) -> None:
        want = [assigned[n] for n in qnames]
        if [n + d for n, d in zip(bits, delta)] == want and (may_prune or not any(delta)):
            return
        i = next(i for i, (n, d, a) in enumerate(zip(bits, delta, want)) if n + d != a or (d and not may_prune))
        n, d, a = bits[i], delta[i], want[i]
        why = "pruned bits" if n + d == a else f"N + Delta = {n + d}"
        raise wire.WireFormatError(f"upload of client {client_id}: {qnames[i]} has N {n} and Delta {d} ({why}), "
                                   f"but it was sent {a} bits")

    @staticmethod
    def _row(order: Optional[np.ndarray], r: int) -> Tuple[int, int]:
        i = r if order is None else int(order[r])
        return i, i + 1

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
    def _order(lay, p, client_id) -> Optional[np.ndarray]:
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
        if self.rule == "mean":
            q = self._qacc / self._total
            fmeans = [acc / self._total for acc in self._facc]
        else:
            q, *fmeans = [robust(torch.stack(vals), self.rule) for vals in zip(*self._kept)]
        numel = self._known.numel.tolist()  # the first upload's rows: the accumulators' order
        out = {}
        for row, off in zip(lay.quant.tolist(), lay.qoff.tolist()):
            out[lay.names[row]] = q[off:off + numel[row]].reshape(_shape(lay, row))
        for (a, b, dt), mean in zip(lay.segments, fmeans):
            if dt == wire.DT_INT64:
                mean = int_mean(mean)  # once per run, not per entry
            at = 0
            for row in range(a, b):
                out[lay.names[row]] = mean[at:at + numel[row]].reshape(_shape(lay, row))
                at += numel[row]
        return {nm: out[nm] for nm in (self.expected.names if self.expected is not None else lay.names)}


def robust(x: Tensor, rule: str) -> Tensor:
    """``x``: (K, ...) values of K uploads. The coordinate-wise median (the mean of the two
    middle values for an even count, as numpy's) or trimmed mean (:func:`trim_count` values
    cut at each end) of x's rows."""
    k = x.shape[0]
    s = x.sort(dim=0).values
    if rule == "median":
        return s[(k - 1) // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    return s[trim_count(k):k - trim_count(k)].mean(dim=0)


def trim_count(k: int) -> int:
    """Values the trimmed mean cuts at each end of k: ``int(TRIM * k)`` as Flower's
    FedTrimmedAvg, but at least one from 3 values on (Flower's rule trims nothing below 5)."""
    return max(int(TRIM * k), 1 if k >= 3 else 0)


def _shape(lay: _Layout, row: int) -> Tuple[int, ...]:
    return tuple(lay.dims[row][: int(lay.ndim[row])].tolist())


def _kind(dt) -> str:
    return {wire.DT_QUANTIZED: "quantized", wire.DT_FLOAT32: "float32", wire.DT_FLOAT16: "float16",
            wire.DT_INT64: "int64"}[int(dt)]
