"""What travels between a device and the server: packed, checked, pickle-free payloads.

Three payloads, each ``encode_*(...) -> bytes`` and ``decode_*(data) -> ...``:

* **Upload** (client -> server): per quantized layer its name, shape, bit-width N, scale,
  sign map and N bit planes (N + 1 bits per weight) and its Delta; the float tensors as they
  are (BatchNorm parameters and statistics, shortcut convs, biases); client id, round,
  sample count and budget.
* **Download** (server -> client): the client's layers already binarized at the bit-width
  it trains with next (:meth:`QuantizedTensor.from_float`), the float tensors, round and
  client id; the assignment is each layer's ``bits``.
* **Model**: every tensor of a model, floating ones in float32 (or float16), int64 buffers as
  int64, for evaluation and baselines.

The byte layout is documented byte by byte in ``docs/FORMAT.md``; the bit layout of planes
and sign maps in :mod:`fedmpq_kernels.pack.reference`. Decoding trusts nothing: every
count, length, shape, bit-width, name and the checksum is checked before anything is
allocated, and every failure is a :class:`WireFormatError` naming what is wrong. No pickle
anywhere (``torch.load`` on untrusted bytes can run code).
"""
from __future__ import annotations

import math
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

import fedmpq_kernels as fk

Tensor = torch.Tensor

MAGIC = b"FMPQ"
VERSION = 1
KIND_UPLOAD, KIND_DOWNLOAD, KIND_MODEL = 1, 2, 3
_KIND_NAMES = {KIND_UPLOAD: "an upload", KIND_DOWNLOAD: "a download", KIND_MODEL: "a model"}

# Entry dtypes (the "dtype" byte of an index record).
DT_QUANTIZED, DT_FLOAT32, DT_FLOAT16, DT_INT64 = 1, 2, 3, 4
TORCH_DTYPES = {DT_FLOAT32: torch.float32, DT_FLOAT16: torch.float16, DT_INT64: torch.int64}  # of a float entry
_DT_OF = {v: k for k, v in TORCH_DTYPES.items()}
ITEMSIZE = {DT_FLOAT32: 4, DT_FLOAT16: 2, DT_INT64: 8}  # bytes per element of a float entry

_HEADER = struct.Struct("<4sHBBQIIII")  # magic, version, kind, flags, total, crc32, entries, index_zlen, index_len
_META = {
    KIND_UPLOAD: struct.Struct("<QQIf"),  # client_id, num_samples, round, budget
    KIND_DOWNLOAD: struct.Struct("<QI4x"),  # client_id, round
    KIND_MODEL: struct.Struct("<I4x"),  # round
}
# One index record per entry: dtype, bits, delta, ndim, scale, dims[8].
# The index (compressed) says what the tensors are: one record per entry, then the name
# lengths and names. It depends on the model only, so every upload of a model carries the
# same index bytes (the server recognizes the layout without decompressing it again).
_RECORD = np.dtype([("dtype", "u1"), ("ndim", "u1"), ("reserved", "<u2"), ("dims", "<u4", (8,))])
# The quantization parameters of each quantized entry, in entry order, uncompressed.
_PARAMS = np.dtype([("bits", "u1"), ("delta", "u1"), ("reserved", "<u2"), ("scale", "<f4")])
assert _HEADER.size == 32 and _RECORD.itemsize == 36 and _PARAMS.itemsize == 8

MAX_DIMS = 8
MAX_NAME_BYTES = 1024
MAX_ENTRIES = 1 << 20
MAX_INDEX_BYTES = 64 << 20  # uncompressed index: far above any model's, far below harm
MAX_SHAPE_SPAN = 1 << 48  # product of a shape's nonzero dims: an empty (0, 2^32-1, 2^32-1) has no tensor


if sys.byteorder != "little":  # tensors and bitmap words are read in place, in host order
    raise ImportError("fedmpq.wire supports little-endian hosts only")


class WireFormatError(ValueError):
    """A payload that does not decode: truncated, corrupted, of another kind or version,
    inconsistent, or out of bounds. The message names what is wrong."""


def _align4(n: int) -> int:
    return (n + 3) & ~3


# ---- one quantized layer ---------------------------------------------------------------
@dataclass(frozen=True)
class QuantizedTensor:
    """A quantized layer as it travels: ``W = scale * sigma * q / (2**bits - 1)``.

    Attributes:
        shape: the layer's weight shape.
        bits: N, 1..8.
        scale: s >= 0, finite (0 gives an all-zero layer).
        planes: uint8 tensor of ``bits * bitmap_nbytes(numel)`` bytes, the codes' bit planes
            (plane 0 the most significant), layout of :mod:`fedmpq_kernels.pack.reference`.
        signs: uint8 bitmap of ``bitmap_nbytes(numel)`` bytes, bit set = negative.
    """

    shape: Tuple[int, ...]
    bits: int
    scale: float
    planes: Tensor
    signs: Tensor

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @staticmethod
    def from_codes(codes: Tensor, negative: Tensor, bits: int, scale: float) -> "QuantizedTensor":
        """Pack uint8 codes (each < 2**bits) and a bool ``negative`` of the same shape."""
        if not isinstance(codes, Tensor) or codes.dtype != torch.uint8:
            raise TypeError("codes must be a uint8 tensor")
        if not isinstance(negative, Tensor) or negative.shape != codes.shape:
            raise ValueError("negative must be a tensor of the codes' shape")
        scale = float(scale)
        if not (math.isfinite(_as_f32(scale)) and scale >= 0):
            raise ValueError(f"scale must be finite and >= 0 in float32, got {scale}")
        codes = codes.detach().cpu()
        return QuantizedTensor(
            tuple(codes.shape), int(bits), scale,
            fk.pack_codes(codes, bits), fk.pack_codes(negative.detach().cpu().to(torch.uint8), 1),
        )

    @staticmethod
    def from_float(w: Tensor, bits: int) -> "QuantizedTensor":
        """Binarize a float tensor into ``bits`` bits (ALGORITHM.md, "Local representation"):
        :func:`fedmpq_kernels.binarize` (``s = max|W|``, ``q = round(|W| * ((2**bits - 1) / s))``,
        ``sigma = sign(W)`` with 0 -> -1), its codes packed into planes, its sign bitmap as it is
        (the wire's sign layout is the layers')."""
        if not isinstance(w, Tensor):
            raise TypeError(f"w must be a floating-point tensor, got {type(w).__name__}")
        codes, sign, scale = fk.binarize(w.detach().cpu(), bits)
        return QuantizedTensor(tuple(w.shape), fk.check_bits(bits), float(scale), fk.pack_codes(codes, bits), sign)

    def codes(self) -> Tensor:
        """The uint8 codes, in ``shape``."""
        return fk.unpack_codes(self.planes, self.bits, self.numel).reshape(self.shape)

    def negative(self) -> Tensor:
        """The sign map as a bool tensor in ``shape`` (True = negative)."""
        return fk.unpack_codes(self.signs, 1, self.numel).reshape(self.shape).bool()

    def dequantize(self) -> Tensor:
        """The float32 weight ``scale * sigma * q / (2**bits - 1)``, in ``shape``."""
        out = torch.zeros(self.numel, dtype=torch.float32)
        fk.dequant_accumulate(out, self.planes, self.signs, self.bits, self.scale)
        return out.reshape(self.shape)


# ---- payloads ----------------------------------------------------------------------------
@dataclass
class Upload:
    """Client -> server. ``deltas[name]`` is Delta of quantized layer ``name`` (0..7)."""

    client_id: int
    round: int
    num_samples: int
    budget: float
    layers: Dict[str, QuantizedTensor]
    deltas: Dict[str, int]
    floats: Dict[str, Tensor] = field(default_factory=dict)


@dataclass
class Download:
    """Server -> client: its layers at its next assignment, and the float tensors."""

    client_id: int
    round: int
    layers: Dict[str, QuantizedTensor]
    floats: Dict[str, Tensor] = field(default_factory=dict)

    @property
    def assignment(self) -> Dict[str, int]:
        return {name: q.bits for name, q in self.layers.items()}


@dataclass
class Model:
    """A whole model's tensors (float32, float16 or int64), e.g. the global model."""

    round: int
    tensors: Dict[str, Tensor]


# ---- encoding ----------------------------------------------------------------------------
def _check_name(name) -> bytes:
    if not isinstance(name, str) or not name:
        raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
    raw = name.encode("utf-8")
    if len(raw) > MAX_NAME_BYTES:
        raise ValueError(f"name {name[:40]!r}... is longer than {MAX_NAME_BYTES} bytes")
    return raw


def _dims(shape) -> List[int]:
    dims = [int(d) for d in shape]
    if len(dims) > MAX_DIMS:
        raise ValueError(f"at most {MAX_DIMS} dimensions, got shape {tuple(dims)}")
    if any(d < 0 or d >= 1 << 32 for d in dims):
        raise ValueError(f"every dimension must be in 0..2^32-1, got shape {tuple(dims)}")
    return dims


def _encode(kind: int, meta: bytes, entries: List[Tuple[str, int, int, int, float, Tuple[int, ...], List[bytes]]]) -> bytes:
    """entries: (name, dtype, bits, delta, scale, shape, data chunks)."""
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"at most {MAX_ENTRIES} tensors per payload")
    records = np.zeros(len(entries), dtype=_RECORD)
    params = np.zeros(sum(e[1] == DT_QUANTIZED for e in entries), dtype=_PARAMS)
    names, lens, chunks = [], [], []
    seen = set()
    q = 0
    for i, (name, dt, bits, delta, scale, shape, data) in enumerate(entries):
        raw = _check_name(name)
        if name in seen:
            raise ValueError(f"duplicate tensor name {name!r}")
        seen.add(name)
        dims = _dims(shape)
        rec = records[i]
        rec["dtype"], rec["ndim"] = dt, len(dims)
        rec["dims"][: len(dims)] = dims
        if dt == DT_QUANTIZED:
            params[q]["bits"], params[q]["delta"], params[q]["scale"] = bits, delta, scale
            q += 1
        names.append(raw)
        lens.append(len(raw))
        size = sum(len(c) for c in data)
        chunks.extend(data)
        if size % 4:
            chunks.append(b"\0" * (4 - size % 4))
    index = records.tobytes() + np.asarray(lens, dtype="<u2").tobytes() + b"".join(names)
    zindex = zlib.compress(index, 9)  # names and shapes are repetitive: ~10x smaller
    body = b"".join([meta, zindex, b"\0" * (_align4(len(zindex)) - len(zindex)), params.tobytes()] + chunks)
    total = _HEADER.size + len(body)
    fields = (MAGIC, VERSION, kind, 0, total)
    counts = (len(entries), len(zindex), len(index))
    crc = _crc(_HEADER.pack(*fields, 0, *counts), body)
    return _HEADER.pack(*fields, crc, *counts) + body


def _crc(header: bytes, body) -> int:
    """CRC-32 of everything but the CRC field itself (header bytes 16..19)."""
    return zlib.crc32(body, zlib.crc32(header[20:32], zlib.crc32(header[:16])))


def _tensor_bytes(t: Tensor, dt: int) -> bytes:
    return t.detach().to(device="cpu", dtype=TORCH_DTYPES[dt]).contiguous().numpy().tobytes()


def _fields(obj, cls, *names: str) -> None:
    """An encoder's argument is its payload class, and its fields ``names`` are mappings (a
    None or a list was an AttributeError on ``.items`` or ``.deltas``)."""
    if not isinstance(obj, cls):
        raise TypeError(f"expected a wire.{cls.__name__}, got {type(obj).__name__}")
    for name in names:
        v = getattr(obj, name)
        if not isinstance(v, Mapping):
            raise TypeError(f"{cls.__name__}.{name} must be a mapping of names, got {type(v).__name__}")


def _float_entries(floats: Mapping[str, Tensor], cast: Optional[torch.dtype] = None):
    out = []
    for name, t in floats.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
        dtype = t.dtype
        if cast is not None and t.is_floating_point():
            dtype = cast
        dt = _DT_OF.get(dtype)
        if dt is None:
            raise TypeError(f"{name}: dtype {t.dtype} cannot travel (float32, float16 or int64)")
        out.append((name, dt, 0, 0, 0.0, tuple(t.shape), [_tensor_bytes(t, dt)]))
    # float32 first, then float16, then int64: one contiguous float32 run for the server
    return sorted(out, key=lambda e: {DT_FLOAT32: 0, DT_FLOAT16: 1, DT_INT64: 2}[e[1]])


def _as_f32(x: float) -> float:
    """``x`` as float32 stores it (inf beyond its range, 0 below its smallest subnormal): the
    encoder checks what the decoder will read (a scale of 1e39 or a budget of 1e-46 encoded,
    with a NumPy warning, into a payload the decoder refused)."""
    with np.errstate(over="ignore", under="ignore"):
        return float(np.float32(x))


def _quant_entries(layers: Mapping[str, QuantizedTensor], deltas: Mapping[str, int]):
    out = []
    for name, q in layers.items():
        if not isinstance(q, QuantizedTensor):
            raise TypeError(f"{name}: expected a QuantizedTensor, got {type(q).__name__}")
        fk.check_bits(q.bits, f"{name}: bits")
        if not (math.isfinite(_as_f32(q.scale)) and q.scale >= 0):  # it travels in float32
            raise ValueError(f"{name}: scale must be finite and >= 0 in float32, got {q.scale}")
        delta = deltas.get(name, 0)
        if isinstance(delta, bool) or not isinstance(delta, (int, np.integer)):  # int() took 2.7 as 2
            raise TypeError(f"{name}: delta must be an int, got {type(delta).__name__}")
        delta = int(delta)
        if not 0 <= delta <= 7:
            raise ValueError(f"{name}: delta must be in 0..7, got {delta}")
        nb = fk.bitmap_nbytes(q.numel)
        for what, t, want in (("planes", q.planes, q.bits * nb), ("signs", q.signs, nb)):
            if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.numel() != want:
                raise ValueError(f"{name}: {what} must be {want} uint8 bytes for shape {q.shape} at {q.bits} bits")
        out.append((name, DT_QUANTIZED, q.bits, delta, q.scale, q.shape,
                    [q.planes.contiguous().cpu().numpy().tobytes(), q.signs.contiguous().cpu().numpy().tobytes()]))
    return out


def _check_overlap(a: Iterable[str], b: Iterable[str]) -> None:
    both = set(a) & set(b)
    if both:
        raise ValueError(f"names both quantized and float: {sorted(both)[:5]}")


def encode_upload(u: Upload) -> bytes:
    """The upload as bytes (docs/FORMAT.md)."""
    _fields(u, Upload, "layers", "deltas", "floats")
    if set(u.deltas) - set(u.layers):
        raise ValueError(f"deltas for layers that are not uploaded: {sorted(set(u.deltas) - set(u.layers))[:5]}")
    _check_overlap(u.layers, u.floats)
    budget = float(u.budget)
    if not (math.isfinite(budget) and 0 < _as_f32(budget) <= 32):  # as the decoder reads it back
        raise ValueError(f"budget must be in (0, 32] in float32, got {budget}")
    meta = _META[KIND_UPLOAD].pack(_u64(u.client_id, "client_id"), _u64(u.num_samples, "num_samples"),
                                   _u32(u.round, "round"), budget)
    return _encode(KIND_UPLOAD, meta, _quant_entries(u.layers, u.deltas) + _float_entries(u.floats))


def encode_download(d: Download) -> bytes:
    """The download as bytes: quantized layers at the client's assignment, float tensors."""
    _fields(d, Download, "layers", "floats")
    _check_overlap(d.layers, d.floats)
    meta = _META[KIND_DOWNLOAD].pack(_u64(d.client_id, "client_id"), _u32(d.round, "round"))
    return _encode(KIND_DOWNLOAD, meta, _quant_entries(d.layers, {}) + _float_entries(d.floats))


def encode_model(m: Model, dtype: torch.dtype = torch.float32) -> bytes:
    """Every tensor of a model; floating tensors travel as ``dtype`` (float32 or float16)."""
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")
    _fields(m, Model, "tensors")
    meta = _META[KIND_MODEL].pack(_u32(m.round, "round"))
    return _encode(KIND_MODEL, meta, _float_entries(m.tensors, cast=dtype))


def _u64(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 1 << 64:
        raise ValueError(f"{what} must be an integer in 0..2^64-1, got {v!r}")
    return int(v)


def _u32(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= int(v) < 1 << 32:
        raise ValueError(f"{what} must be an integer in 0..2^32-1, got {v!r}")
    return int(v)


# ---- decoding ----------------------------------------------------------------------------
@dataclass(slots=True)
class _Entry:
    name: str
    dtype: int
    bits: int
    delta: int
    scale: float
    shape: Tuple[int, ...]
    numel: int
    offset: int  # into the payload
    nbytes: int  # without padding


@dataclass
class Parsed:
    """A checked payload's layout, column by column (numpy arrays, one row per entry, in
    payload order), for readers that work on the bytes in place (the server's aggregation).
    ``meta`` is the kind's metadata tuple (an upload's: client_id, num_samples, round,
    budget); entry i's data is ``data[offset[i]:offset[i] + nbytes[i]]``: for a quantized
    entry its ``bits`` planes then its sign bitmap, each ``fedmpq_kernels.bitmap_nbytes(numel)``
    bytes; for a float entry ``numel`` elements of ``TORCH_DTYPES[dtype]``."""

    kind: int
    meta: tuple
    names: List[str]
    dtype: np.ndarray  # uint8
    bits: np.ndarray  # uint8
    delta: np.ndarray  # uint8
    scale: np.ndarray  # float32
    dims: np.ndarray  # uint32 (n, 8), unused dimensions zero
    ndim: np.ndarray  # uint8
    numel: np.ndarray  # int64
    offset: np.ndarray  # int64, into data
    nbytes: np.ndarray  # int64, without padding
    data: bytes
    names_blob: bytes = b""  # the index's names
    zindex: bytes = b""  # the compressed index, to recognize the same layout
    same_layout: bool = False  # parsed against `known` and found to have its layout

    def entries(self) -> List[_Entry]:
        cols = zip(self.names, self.dtype.tolist(), self.bits.tolist(), self.delta.tolist(), self.scale.tolist(),
                   self.dims.tolist(), self.ndim.tolist(), self.numel.tolist(), self.offset.tolist(), self.nbytes.tolist())
        return [_Entry(nm, dt, b, d, sc, tuple(dm[:nd]), ne, off, nb) for nm, dt, b, d, sc, dm, nd, ne, off, nb in cols]


def _fail(msg: str):
    raise WireFormatError(msg)


_ITEMSIZE_OF = np.zeros(256, dtype=np.int64)
for _dt, _sz in ITEMSIZE.items():
    _ITEMSIZE_OF[_dt] = _sz


def parse(data, want_kind: int, known: Optional[Parsed] = None) -> Parsed:
    """Check a payload of kind ``want_kind`` (``KIND_UPLOAD``...) whole and return its
    :class:`Parsed` layout; raises :class:`WireFormatError` naming what is wrong.

    Every check comes before anything is allocated beyond the bounded index. Vectorized over
    the entries: the server parses every upload of every round.

    ``known``: a payload parsed before. When this one has the same names, dtypes and shapes
    (the server's case: every client has the model's layout), the checks of those columns
    and the element counts are taken from it; the rest is checked as always."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireFormatError(f"payload must be bytes, got {type(data).__name__}")
    data = bytes(data)
    size = len(data)
    if size < _HEADER.size:
        _fail(f"truncated: {size} bytes, the header alone is {_HEADER.size}")
    magic, version, kind, flags, total, crc, n, zlen, ilen = _HEADER.unpack_from(data)
    if magic != MAGIC:
        _fail(f"not a fedmpq payload (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        _fail(f"unsupported format version {version} (this build reads version {VERSION})")
    if kind != want_kind:
        _fail(f"payload is {_KIND_NAMES.get(kind, f'of kind {kind}')}, expected {_KIND_NAMES[want_kind]}")
    if flags != 0:
        _fail(f"unknown flags {flags:#x}")
    if total != size:
        _fail(f"length field says {total} bytes but the payload has {size} (truncated or padded)")
    if _crc(data[:_HEADER.size], memoryview(data)[_HEADER.size:]) != crc:
        _fail("checksum mismatch: the payload is corrupted")
    meta_s = _META[kind]
    pos = _HEADER.size
    if size < pos + meta_s.size:
        _fail("truncated: no room for the metadata")
    meta = meta_s.unpack_from(data, pos)
    pos += meta_s.size
    if kind != KIND_UPLOAD and data[pos - 4:pos] != b"\0\0\0\0":  # struct's 4x skips them unread
        _fail("the metadata's 4 padding bytes are not zero")
    if n > MAX_ENTRIES:
        _fail(f"{n} entries exceed the limit of {MAX_ENTRIES}")
    if zlen > size - pos:
        _fail(f"index claims {zlen} bytes, only {size - pos} remain")
    if not (n * (_RECORD.itemsize + 2) <= ilen <= min(MAX_INDEX_BYTES, n * (_RECORD.itemsize + 2 + MAX_NAME_BYTES))):
        _fail(f"index length {ilen} is impossible for {n} entries")
    zindex = data[pos:pos + zlen]
    pos += _align4(zlen)
    if pos > size:
        _fail("truncated after the index")
    if data[pos - (_align4(zlen) - zlen):pos].strip(b"\0"):
        _fail("the index's padding bytes are not zero")
    if (known is not None and zindex == known.zindex and n == len(known.names)
            and ilen == len(known.names_blob) + n * (_RECORD.itemsize + 2)):
        # The same index bytes as a payload checked before: the same names, dtypes, shapes.
        return _with_params(kind, want_kind, meta, known.names, known.dtype, known.dims, known.ndim, known.numel,
                            pos, data, known.names_blob, zindex, same_layout=True)
    try:
        dec = zlib.decompressobj()
        index = dec.decompress(zindex, ilen + 1)  # bounded: never more than ilen + 1
        if not dec.eof or dec.unused_data or dec.unconsumed_tail:
            _fail("index is not one complete compressed block of the stated length")
    except zlib.error as e:
        _fail(f"index does not decompress: {e}")
    if len(index) != ilen:
        _fail(f"index decompresses to {len(index)} bytes, header says {ilen}")
    recs = np.frombuffer(index, dtype=_RECORD, count=n)
    lens = np.frombuffer(index, dtype="<u2", count=n, offset=n * _RECORD.itemsize)
    names_at = n * (_RECORD.itemsize + 2)
    if names_at + int(lens.sum(dtype=np.int64)) != ilen:
        _fail("name lengths do not add up to the index length")
    blob = index[names_at:]
    dt, ndim, dims = recs["dtype"], recs["ndim"], recs["dims"]

    # Names: one decode when they are ASCII (the usual case), else one per name.
    cuts = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).tolist()
    if blob.isascii():
        text = blob.decode("ascii")
        names = [text[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    else:
        names = []
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            try:
                names.append(blob[a:b].decode("utf-8"))
            except UnicodeDecodeError:
                _fail(f"entry {i}: name is not valid UTF-8")

    def where(i: int) -> str:
        return f"entry {i} ({names[i][:60]!r})"

    unused = np.arange(MAX_DIMS)[None, :] >= ndim[:, None]
    quant = dt == DT_QUANTIZED
    # every per-entry rule of the index at once; which one failed is worked out on failure
    rules = [
        ((lens == 0) | (lens > MAX_NAME_BYTES), lambda i: "empty or too long name"),
        ((dt < 1) | (dt > 4), lambda i: f"unknown dtype code {dt[i]}"),
        (ndim > MAX_DIMS, lambda i: f"{ndim[i]} dimensions (at most {MAX_DIMS})"),
        ((unused & (dims != 0)).any(axis=1), lambda i: "nonzero unused dimensions"),
        (recs["reserved"] != 0, lambda i: "reserved bytes are not zero"),
        (quant & (want_kind == KIND_MODEL), lambda i: "a model payload holds no quantized layers"),
    ]
    bad = np.logical_or.reduce([m for m, _ in rules]) if n else np.zeros(0, bool)
    if bad.any():
        i = int(np.argmax(bad))
        _fail(f"{where(i)}: " + next(msg(i) for m, msg in rules if m[i]))
    if len(set(names)) != n:
        seen = set()
        for i, nm in enumerate(names):
            if nm in seen:
                _fail(f"{where(i)}: duplicate name")
            seen.add(nm)
    # Element counts: exact in int64 once the float product shows they are small (a claim of
    # 2^40 elements stops here, before any allocation).
    used = np.where(unused, 1, dims)
    approx = used.astype(np.float64).prod(axis=1)
    huge = approx > 8.0 * size  # no entry holds more elements than 8 per payload byte
    if huge.any():
        i = int(np.argmax(huge))
        _fail(f"{where(i)}: needs about {approx[i]:.3g} elements' worth of bytes of data, only {size - pos} remain")
    # An entry with a zero dimension holds no elements, but torch and numpy still make its
    # strides (products of the other dimensions): they must fit in int64 with room to spare.
    wide = np.maximum(used, 1).astype(np.float64).prod(axis=1) > MAX_SHAPE_SPAN
    if wide.any():
        i = int(np.argmax(wide))
        _fail(f"{where(i)}: shape {tuple(dims[i][:ndim[i]].tolist())} is too large to represent "
              f"(its nonzero dimensions multiply to more than 2^48)")
    numel = used.astype(np.int64).prod(axis=1)
    return _with_params(kind, want_kind, meta, names, dt, dims, ndim, numel, pos, data, blob, zindex)


def _with_params(kind, want_kind, meta, names, dt, dims, ndim, numel, pos, data, blob, zindex,
                 same_layout: bool = False) -> Parsed:
    """The quantization parameters (after the index), then the entry sizes and offsets; the
    data must be exactly their sum."""
    size = len(data)
    quant = dt == DT_QUANTIZED
    nq = int(np.count_nonzero(quant))
    if _PARAMS.itemsize * nq > size - pos:
        _fail(f"truncated: the parameters of {nq} quantized layers need {_PARAMS.itemsize * nq} bytes")
    prm = np.frombuffer(data, dtype=_PARAMS, count=nq, offset=pos)
    pos += _PARAMS.itemsize * nq
    qb, qd, qs = prm["bits"], prm["delta"], prm["scale"]
    with np.errstate(invalid="ignore"):
        rules = [
            ((qb < fk.MIN_BITS) | (qb > fk.MAX_BITS), lambda j: f"bit-width {qb[j]} outside {fk.MIN_BITS}..{fk.MAX_BITS}"),
            (~(np.isfinite(qs) & (qs >= 0)), lambda j: f"scale {qs[j]} is not finite and >= 0"),
            ((qd > 7) | ((qd != 0) & (want_kind != KIND_UPLOAD)), lambda j: f"delta {qd[j]} out of range"),
            (prm["reserved"] != 0, lambda j: "reserved bytes are not zero"),
        ]
        bad = np.logical_or.reduce([m for m, _ in rules]) if nq else np.zeros(0, bool)
    rows = np.flatnonzero(quant)
    if bad.any():
        j = int(np.argmax(bad))
        i = int(rows[j])
        _fail(f"entry {i} ({names[i][:60]!r}): " + next(msg(j) for m, msg in rules if m[j]))
    n = len(names)
    bits = np.zeros(n, np.uint8)
    delta = np.zeros(n, np.uint8)
    scale = np.zeros(n, np.float32)
    bits[rows], delta[rows], scale[rows] = qb, qd, qs
    nbytes = np.where(quant, (bits.astype(np.int64) + 1) * 4 * ((numel + 31) // 32), numel * _ITEMSIZE_OF[dt])
    padded = (nbytes + 3) & ~3
    ends = pos + np.cumsum(padded)
    offset = ends - padded
    over = ends > size
    if over.any():
        i = int(np.argmax(over))
        _fail(f"entry {i} ({names[i][:60]!r}): needs {nbytes[i]} bytes of data, only {size - offset[i]} remain")
    end = int(ends[-1]) if n else pos
    if end != size:
        _fail(f"{size - end} bytes of data left over after the last entry")
    return Parsed(kind, meta, names, dt, bits, delta, scale, dims, ndim, numel, offset, nbytes, data, blob, zindex,
                   same_layout)


def _view(buf: bytearray, off: int, count: int, dtype: torch.dtype) -> Tensor:
    if count == 0:
        return torch.empty(0, dtype=dtype)
    t = torch.frombuffer(buf, dtype=dtype, count=count, offset=off)
    return t if t.data_ptr() % t.element_size() == 0 else t.clone()


def _materialize(p: Parsed):
    """Tensors over one private copy of the payload (no per-tensor copies)."""
    buf = bytearray(p.data)
    layers, deltas, floats = {}, {}, {}
    for e in p.entries():
        if e.dtype == DT_QUANTIZED:
            nb = fk.bitmap_nbytes(e.numel)
            planes = _view(buf, e.offset, e.bits * nb, torch.uint8)
            signs = _view(buf, e.offset + e.bits * nb, nb, torch.uint8)
            layers[e.name] = QuantizedTensor(e.shape, e.bits, e.scale, planes, signs)
            deltas[e.name] = e.delta
        else:
            floats[e.name] = _view(buf, e.offset, e.numel, TORCH_DTYPES[e.dtype]).reshape(e.shape)
    return layers, deltas, floats


def decode_upload(data) -> Upload:
    """Bytes -> :class:`Upload`. Raises :class:`WireFormatError` on anything wrong."""
    p = parse(data, KIND_UPLOAD)
    client_id, num_samples, rnd, budget = p.meta
    if not (math.isfinite(budget) and 0 < budget <= 32):
        _fail(f"budget {budget} outside (0, 32]")
    layers, deltas, floats = _materialize(p)
    return Upload(client_id, rnd, num_samples, float(budget), layers, deltas, floats)


def decode_download(data) -> Download:
    """Bytes -> :class:`Download`. Raises :class:`WireFormatError` on anything wrong."""
    p = parse(data, KIND_DOWNLOAD)
    client_id, rnd = p.meta
    layers, _, floats = _materialize(p)
    return Download(client_id, rnd, layers, floats)


def decode_model(data) -> Model:
    """Bytes -> :class:`Model`. Raises :class:`WireFormatError` on anything wrong."""
    p = parse(data, KIND_MODEL)
    _, _, floats = _materialize(p)
    return Model(p.meta[0], floats)
