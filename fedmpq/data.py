"""Datasets and client partitions for the simulations.

Datasets (:data:`DATASETS`), each loaded whole into memory by :func:`load`:

* ``digits``: scikit-learn's bundled 8x8 digits (1797 images, 10 classes). Built in, no
  download; the default. It has no official test set, so a fixed, seeded, stratified 20 %
  of it is held out (:data:`DIGITS_TEST_FRACTION`, :data:`DIGITS_SPLIT_SEED`).
* ``fashion-mnist``: 60000/10000 28x28 grey images, 10 classes, read from the four IDX files
  (gzipped or not) in a folder; by default where Debian's ``dataset-fashion-mnist`` package
  puts them, ``/usr/share/datasets/fashion-mnist``.
* ``cifar10`` / ``cifar100``: 50000/10000 32x32 RGB images, 10/100 (fine) classes, read from
  the standard "python version" batches (``cifar-10-batches-py/data_batch_1..5, test_batch``;
  ``cifar-100-python/train, test``). Those files are pickles: they are read with
  :class:`RestrictedUnpickler`, which builds numpy arrays, lists, dicts, numbers and strings
  and refuses every other global, so a tampered file cannot run code.

Images come back as float32 ``(N, C, H, W)`` tensors, scaled to [0, 1] and then standardized
with the per-channel mean and std of the *training* set (the same constants for the test
set). A dataset that is not where it is looked for raises :class:`MissingDatasetError`
naming the folders tried and how to get it.

Partitions (:func:`partition`): iid (a seeded shuffle cut into near-equal parts) or
Dirichlet(alpha) over labels: for every class, proportions over the clients are drawn from
Dirichlet(alpha) and that class's (shuffled) samples are cut accordingly; like the authors
(after Li et al.'s NIID-bench), a client that already holds its even share N/K takes no more
samples, and the whole draw is repeated until every client has at least ``min_size``
samples (:class:`PartitionError` after ``max_tries`` draws, or after the first
:data:`HOPELESS_AFTER` when they left many clients short). Seeded with
``numpy.random.default_rng(seed)``, so the same arguments give the same partition on every
platform.
"""
from __future__ import annotations

import dataclasses
import gzip
import importlib.util
import io
import math
import os
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

Tensor = torch.Tensor
PathLike = Union[str, "os.PathLike[str]"]

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")

DIGITS_TEST_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# CIFAR has no system package: by default look in ./data (relative to the working directory).
CIFAR_DIR = "data"

FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
FASHION_MNIST_URL = "https://github.com/zalandoresearch/fashion-mnist"


class MissingDatasetError(FileNotFoundError):
    """A dataset's files are not where they were looked for. The message names every folder
    tried and how to get the files."""


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch never needs (anything but numpy's array
    reconstruction); nothing of it was run."""


class PartitionError(ValueError):
    """No partition gives every client ``min_size`` samples: fewer samples than
    ``n_clients * min_size`` (``draws`` 0), or no Dirichlet draw did. The numbers are
    attributes, for a caller that gives the advice in its own terms (its config keys)."""

    def __init__(self, message: str, n: int, n_clients: int, alpha: Optional[float], min_size: int,
                 draws: int = 0, best: int = -1, short: int = 0, hopeless: bool = False):
        super().__init__(message)
        self.n, self.n_clients, self.alpha, self.min_size = n, n_clients, alpha, min_size
        # draws made; the most the smallest client got, and the fewest clients left short, in any
        # of them; hopeless: stopped before max_tries (HOPELESS_AFTER)
        self.draws, self.best, self.short, self.hopeless = draws, best, short, hopeless


@dataclass
class Dataset:
    """One dataset, whole, in memory.

    ``train_x``/``test_x``: float32 ``(N, C, H, W)``, contiguous, standardized with the
    training set's per-channel ``mean``/``std`` (of the images scaled to [0, 1]);
    ``train_y``/``test_y``: int64 ``(N,)`` in ``[0, num_classes)``.
    """

    name: str
    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    in_channels: int
    image_size: int
    mean: Tuple[float, ...] = ()
    std: Tuple[float, ...] = ()

    def __post_init__(self):
        n, c, h, w = self.train_x.shape
        if c != self.in_channels or h != self.image_size or w != self.image_size:
            raise ValueError(f"{self.name}: images {tuple(self.train_x.shape)} do not match "
                             f"in_channels={self.in_channels}, image_size={self.image_size}")
        if self.train_y.shape != (n,) or self.test_y.shape != (self.test_x.shape[0],):
            raise ValueError(f"{self.name}: {n} train / {self.test_x.shape[0]} test images but "
                             f"{tuple(self.train_y.shape)} / {tuple(self.test_y.shape)} labels")

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_y.shape[0])


# --------------------------------------------------------------------------------------------
# Loading


def _canonical(name: str) -> str:
    key = str(name).strip().lower().replace("_", "-")
    key = {"fashion-mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "fmnist": "fashion-mnist",
           "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return key


def load(name: str, data_dir: Optional[PathLike] = None) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`) whole.

    ``data_dir``: the folder holding its files (or that folder's parent); ``None`` looks in
    the default place (``digits`` is built in and ignores it). Raises
    :class:`MissingDatasetError` if the files are not found, ``ValueError`` if they are not
    what they should be.
    """
    key = _canonical(name)
    if key == "digits":
        return _load_digits()
    if key == "fashion-mnist":
        return _load_fashion_mnist(data_dir)
    return _load_cifar(key, data_dir)


def _standardize(train: np.ndarray, test: np.ndarray, scale: float, chunk: int = 2048):
    """Scale ``(N, C, H, W)`` arrays by ``1/scale`` and standardize both with the training
    set's per-channel mean and (population) std, computed in float64. Returns float32
    tensors and the constants. Works in chunks so that no float64 copy of the set is made."""
    n, c = train.shape[:2]
    s1 = np.zeros(c, np.float64)
    s2 = np.zeros(c, np.float64)
    for i in range(0, n, chunk):
        part = train[i:i + chunk].astype(np.float64) / scale
        s1 += part.sum(axis=(0, 2, 3))
        s2 += np.square(part).sum(axis=(0, 2, 3))
    count = max(n * train.shape[2] * train.shape[3], 1)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    std[std == 0] = 1.0
    m32 = mean.astype(np.float32).reshape(1, c, 1, 1)
    s32 = std.astype(np.float32).reshape(1, c, 1, 1)

    def convert(x: np.ndarray) -> Tensor:
        out = np.empty(x.shape, np.float32)
        for i in range(0, x.shape[0], chunk):
            out[i:i + chunk] = (x[i:i + chunk].astype(np.float32) / np.float32(scale) - m32) / s32
        return torch.from_numpy(out)

    return convert(train), convert(test), tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _labels(y: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _make(name, train_x, train_y, test_x, test_y, num_classes, scale) -> Dataset:
    tx, vx, mean, std = _standardize(train_x, test_x, scale)
    return Dataset(name=name, train_x=tx, train_y=_labels(train_y), test_x=vx, test_y=_labels(test_y),
                   num_classes=num_classes, in_channels=train_x.shape[1], image_size=train_x.shape[2],
                   mean=mean, std=std)


def _stratified_split(y: np.ndarray, fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of a seeded split holding out ``round(fraction * n_c)`` of every class."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.append(idx[:int(round(fraction * len(idx)))])
    test_idx = np.sort(np.concatenate(test))
    mask = np.ones(len(y), bool)
    mask[test_idx] = False
    return np.flatnonzero(mask), test_idx


def _digits_arrays() -> Tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (1797, 8, 8) float64 0..16, labels (1797,)
    int64. Read from the package's ``datasets/data/digits.csv.gz`` (64 pixels and the label
    per row, what ``load_digits`` reads) without importing scikit-learn, whose
    ``sklearn.datasets`` brings scipy in: 80 MB of resident memory and 0.4 s in every
    training process. ``load_digits`` itself where that file is not found."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None:
        raise MissingDatasetError("the digits dataset is scikit-learn's bundled copy and scikit-learn is not "
                                  "installed: pip install scikit-learn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec.origin else None
    if path is not None and path.is_file():
        data = np.loadtxt(path, delimiter=",")
        if data.shape == (1797, 65):
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another layout of the package

    d = load_digits()
    return np.asarray(d.images, np.float64), np.asarray(d.target, np.int64)


def _load_digits() -> Dataset:
    images, y = _digits_arrays()
    x = images[:, None]  # (1797, 1, 8, 8), values 0..16
    tr, te = _stratified_split(y, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    return _make("digits", x[tr], y[tr], x[te], y[te], 10, 16.0)


# ---- Fashion-MNIST (IDX)


def read_idx(path: PathLike) -> np.ndarray:
    """Read one IDX file (gzipped if its name ends in ``.gz``) of unsigned bytes: a uint8
    array with the file's dimensions. ``ValueError`` if it is not one."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:  # truncated, not gzip, a corrupted stream
        raise ValueError(f"{path}: cannot read it ({e})") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x}, expected 0x08 (unsigned byte)")
    ndim = data[3]
    head = 4 + 4 * ndim
    if ndim == 0 or len(data) < head:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:head])
    count = math.prod(dims)  # Python ints: an int64 product of 2^31 x 2^31 x 4 wraps to 0
    if len(data) - head != count:
        raise ValueError(f"{path}: IDX header says {dims} ({count} bytes), the file holds {len(data) - head}")
    return np.frombuffer(data, np.uint8, count, head).reshape(dims)


def _incomplete(folder: Path, missing: Sequence[str]) -> str:
    """The first sentence of a missing-dataset error for a folder that holds some of the files:
    "not found" alone sent users looking for a folder they had."""
    return f"{folder.absolute()} holds only part of the dataset: {', '.join(missing)} missing. "


def _find_file(folder: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _candidates(data_dir: Optional[PathLike], default: str, subdirs: Sequence[str]) -> List[Path]:
    base = Path(os.path.expanduser(str(data_dir if data_dir is not None else default)))
    return [base] + [base / s for s in subdirs]


def _load_fashion_mnist(data_dir: Optional[PathLike]) -> Dataset:
    tried = _candidates(data_dir, FASHION_MNIST_DIR, ("fashion-mnist", "FashionMNIST/raw"))
    partial = ""
    for folder in tried:
        files = [_find_file(folder, stem) for stem in FASHION_MNIST_FILES]
        if all(files):
            break
        if any(files) and not partial:  # a folder with some of them: say which are missing
            partial = _incomplete(folder, [s + "[.gz]" for s, f in zip(FASHION_MNIST_FILES, files) if f is None])
    else:
        raise MissingDatasetError(
            partial + "Fashion-MNIST not found: looked for "
            + ", ".join(s + "[.gz]" for s in FASHION_MNIST_FILES)
            + " in " + ", ".join(str(p.absolute()) for p in tried)
            + ". Get it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu; it installs them in "
            + f"{FASHION_MNIST_DIR}), or download the four files from {FASHION_MNIST_URL} "
            + "and pass their folder as data_dir.")
    train_x, train_y, test_x, test_y = (read_idx(p) for p in files)
    for x, y, what in ((train_x, train_y, "train"), (test_x, test_y, "t10k")):
        if x.ndim != 3 or x.shape[1:] != (28, 28) or y.shape != (x.shape[0],):
            raise ValueError(f"Fashion-MNIST in {folder}: {what} images {x.shape} and labels {y.shape} "
                             "are not (N, 28, 28) and (N,)")
        if y.size and int(y.max()) >= 10:
            raise ValueError(f"Fashion-MNIST in {folder}: {what} label {int(y.max())} is not in 0..9")
    if not len(test_y):  # every round's accuracy would be 0.0 (of no images), unsaid
        raise ValueError(f"Fashion-MNIST in {folder}: the t10k files hold no images (nothing to test on)")
    return _make("fashion-mnist", train_x[:, None], train_y, test_x[:, None], test_y, 10, 255.0)


# ---- CIFAR (python batches, restricted unpickling)


def _np_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _np_frombuffer():
    try:
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy < 2
        from numpy.core.numeric import _frombuffer
    return _frombuffer


def _latin1_encode(obj, encoding="latin1"):
    """``_codecs.encode`` as Python 3 writes bytes at protocol 2, restricted to latin-1."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise UnsafePickleError("_codecs.encode is admitted only for a str and latin-1")
    return obj.encode("latin-1")


def _allowed_globals() -> Dict[Tuple[str, str], object]:
    rec, fb = _np_reconstruct(), _np_frombuffer()
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = rec
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(mod, "_frombuffer")] = fb
    for mod in ("builtins", "__builtin__"):
        allowed[(mod, "bytes")] = bytes
        allowed[(mod, "bytearray")] = bytearray
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR batches: the only globals it resolves are numpy's array
    reconstruction (``numpy[._]core.multiarray._reconstruct``, ``numpy[._]core.numeric.
    _frombuffer``, ``numpy.ndarray``, ``numpy.dtype``), ``bytes``/``bytearray`` and a
    latin-1-only ``_codecs.encode`` (how Python 3 writes bytes at protocol 2). Any other global
    raises :class:`UnsafePickleError` before anything is called; dicts, lists, tuples,
    numbers and strings need no global."""

    _ALLOWED: Optional[Dict[Tuple[str, str], object]] = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed_globals()
        try:
            return RestrictedUnpickler._ALLOWED[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refused to load global {module}.{name}: a CIFAR batch holds only numpy arrays, "
                "lists and strings, so this file is not one (or has been tampered with)") from None


def restricted_load(path: PathLike):
    """Unpickle the file ``path`` with :class:`RestrictedUnpickler` (Python 2 strings come back
    as bytes, as the CIFAR recipe does). ``UnsafePickleError`` names the file and the global."""
    path = Path(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(f"{path}: {e}") from None


_CIFAR = {
    "cifar10": dict(title="CIFAR-10", folder="cifar-10-batches-py", archive="cifar-10-python.tar.gz",
                    train=tuple(f"data_batch_{i}" for i in range(1, 6)), test=("test_batch",),
                    label_key="labels", classes=10),
    "cifar100": dict(title="CIFAR-100", folder="cifar-100-python", archive="cifar-100-python.tar.gz",
                     train=("train",), test=("test",), label_key="fine_labels", classes=100),
}


def read_cifar_batch(path: PathLike, label_key: str = "labels", num_classes: int = 10):
    """One CIFAR python batch: ``(x, y)``, x uint8 ``(n, 3, 32, 32)``, y int64 ``(n,)``.
    ``label_key``: ``"labels"`` (CIFAR-10) or ``"fine_labels"`` (CIFAR-100). ``ValueError``
    if the file is not such a batch, :class:`UnsafePickleError` if it asks for code."""
    path = Path(path)
    try:
        obj = restricted_load(path)
    except (UnsafePickleError, OSError):
        raise
    except Exception as e:  # any other malformation (truncated, wrong opcodes, bad array state)
        raise ValueError(f"{path}: not a CIFAR python batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(obj).__name__}, not a dict)")
    d = {(k.decode("latin-1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: not a CIFAR python batch (no 'data' or {label_key!r}; keys {sorted(map(str, d))})")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        what = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{path}: 'data' is {what}, expected a uint8 (N, 3072) array")
    labels = d[label_key]
    if not isinstance(labels, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: {label_key!r} is a {type(labels).__name__}, expected a list of ints")
    y = np.asarray(labels)
    if y.shape != (x.shape[0],) or (y.size and y.dtype.kind not in "iu"):
        raise ValueError(f"{path}: {label_key!r} must be {x.shape[0]} ints, found {y.dtype} {y.shape}")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{path}: labels must be in 0..{num_classes - 1}, found {y.min()}..{y.max()}")
    return np.ascontiguousarray(x.reshape(-1, 3, 32, 32)), y


def _load_cifar(key: str, data_dir: Optional[PathLike]) -> Dataset:
    spec = _CIFAR[key]
    tried = _candidates(data_dir, CIFAR_DIR, (spec["folder"],))
    needed = spec["train"] + spec["test"]
    partial = ""
    for folder in tried:
        missing = [f for f in needed if not (folder / f).is_file()]
        if not missing:
            break
        if len(missing) < len(needed) and not partial:  # a folder with some of them: say which are missing
            partial = _incomplete(folder, missing)
    else:
        archives = [p / spec["archive"] for p in tried if (p / spec["archive"]).is_file()]
        hint = (f" Found {archives[0]}: extract it there (tar xzf {archives[0].name})." if archives else "")
        raise MissingDatasetError(
            partial + f"{spec['title']} not found: looked for {', '.join(needed)} in "
            + ", ".join(str(p.absolute()) for p in tried) + "." + hint
            + f" Download the \"python version\" ({spec['archive']}) from {CIFAR_URL}, extract it "
            + f"(it makes {spec['folder']}/) and pass that folder or its parent as data_dir.")
    parts = {which: [read_cifar_batch(folder / f, spec["label_key"], spec["classes"]) for f in spec[which]]
             for which in ("train", "test")}
    train_x = np.concatenate([p[0] for p in parts["train"]])
    train_y = np.concatenate([p[1] for p in parts["train"]])
    test_x = np.concatenate([p[0] for p in parts["test"]])
    test_y = np.concatenate([p[1] for p in parts["test"]])
    del parts
    if not len(test_y):  # every round's accuracy would be 0.0 (of no images), unsaid
        raise ValueError(f"{spec['title']} in {folder}: {', '.join(spec['test'])} holds no images (nothing to test on)")
    return _make(key, train_x, train_y, test_x, test_y, spec["classes"], 255.0)


# --------------------------------------------------------------------------------------------
# Partitions


# A Dirichlet split stops after HOPELESS_AFTER draws when they left, on average,
# HOPELESS_SHORT_MEAN or more clients below min_size. Why the mean: the clients short in a
# draw are negatively dependent (a sample one lacks goes to another; the count's variance
# was at most 1.01 times its mean in every configuration measured), so a draw leaves none
# short with a chance below exp(-m), m the expected number short. A mean of 17 over 20
# draws puts m above 14 (3 standard deviations), and the chance that one of the other 980
# draws succeeds below 1e-3. The rule before (20 or more short in each of the 20 draws)
# missed large splits whose draws each leave a few clients short, often the same ones:
# 3000 clients of CIFAR-100's size (50,000 samples, 100 classes), alpha 0.3, min_size 10
# left 10 to 32 short, 18 on average, and drew all 1000 times (19 s) before the error.
# Measured: about 1600 configurations of 10 to 600 clients (2 to 100 classes, alpha 0.01 to
# 100): none whose first 20 draws each left 12 or more short succeeded, no draw of one that
# ever succeeded left more than 14 short. 582 more of 10 to 5000 clients (2 to 200 classes,
# balanced and skewed, min_size 1 to 50): of the 432 whose first 20 draws left 8 to 34
# short on average (not 20 in each), none succeeded in 1000 draws; none that succeeded had a
# mean above 7. Splits whose first draws leave fewer short (3000 clients, alpha 0.5 to 2)
# still draw up to max_tries: another seed may succeed. A split that succeeds is the same
# draw as without the stop.
HOPELESS_AFTER = 20
HOPELESS_SHORT_MEAN = 17

SUBSET_SEED = 20240617  # train_samples: one fixed subset, whatever the run's seed or algorithm


def subset(ds: Dataset, n: Optional[int]) -> Dataset:
    """``ds`` with a fixed, seeded subset of ``n`` training samples (sorted indices; the
    same for every algorithm and seed: seeded by :data:`SUBSET_SEED`, not the run's seed).
    The test set and the standardization constants are the whole dataset's. ``n=None``:
    ``ds`` itself. ``ValueError`` for ``n`` outside 1..len(train)."""
    if n is None:
        return ds
    total = len(ds.train_y)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= total:
        raise ValueError(f"train_samples must be an integer in 1..{total} (the {ds.name} training set), got {n!r}")
    keep = np.sort(np.random.default_rng(SUBSET_SEED).permutation(total)[:int(n)])
    idx = torch.from_numpy(keep)
    return dataclasses.replace(ds, train_x=ds.train_x[idx].contiguous(), train_y=ds.train_y[idx].contiguous())


def partition(labels: Union[Tensor, np.ndarray, Sequence[int]], n_clients: int, alpha: Optional[float],
              seed: int, min_size: int = 10, max_tries: int = 1000) -> List[Tensor]:
    """Split the samples with these ``labels`` (integers, ``(N,)``) among ``n_clients``.

    Returns ``n_clients`` sorted int64 index tensors, pairwise disjoint, together covering
    ``range(N)``. ``alpha=None``: iid, a seeded permutation cut into parts whose sizes differ
    by at most one. Otherwise Dirichlet(``alpha``) over the clients for every class (smaller
    alpha, more skew), a client holding its even share ``N / n_clients`` taking no more, the
    whole draw repeated (up to ``max_tries`` times) until every client has at least
    ``min_size`` samples; it stops after :data:`HOPELESS_AFTER` draws when they left on
    average :data:`HOPELESS_SHORT_MEAN` or more clients short. ``ValueError`` for bad arguments,
    :class:`PartitionError` (a ``ValueError``) for ``min_size * n_clients > N`` and when no
    draw satisfies ``min_size``.
    """
    if isinstance(labels, Tensor):
        y = labels.detach().cpu().numpy()
    else:
        y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {tuple(y.shape)}")
    if y.size and y.dtype.kind not in "iub":
        raise ValueError(f"labels must be integers, got {y.dtype}")
    if isinstance(n_clients, bool) or not isinstance(n_clients, (int, np.integer)) or n_clients < 1:
        raise ValueError(f"n_clients must be an integer >= 1, got {n_clients!r}")
    n_clients = int(n_clients)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        # None drew an unseeded (unrepeatable) split, silently; a float or -1 was numpy's error
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if isinstance(alpha, bool):  # float(True) is 1.0
        raise ValueError(f"alpha must be a positive number or None (iid), got {alpha!r}")
    if alpha is not None:
        try:
            a = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha must be a positive number or None (iid), got {alpha!r}") from None
        if not np.isfinite(a) or a <= 0:
            raise ValueError(f"alpha must be a positive, finite number or None (iid), got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise ValueError(f"min_size must be an integer >= 0, got {min_size!r}")
    if not isinstance(max_tries, (int, np.integer)) or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    n = int(y.size)
    if min_size * n_clients > n:
        raise PartitionError(f"cannot give each of {n_clients} clients at least min_size={min_size} samples: "
                             f"there are only {n}", n, n_clients, alpha, min_size)
    rng = np.random.default_rng(seed)

    if alpha is None:
        parts = np.array_split(rng.permutation(n), n_clients)
        return [torch.from_numpy(np.sort(p).astype(np.int64)) for p in parts]

    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    share = n / n_clients
    concentration = np.full(n_clients, a)
    best, fewest_short, all_short = -1, n_clients, 0
    for tries in range(1, int(max_tries) + 1):
        # A draw only counts samples; the parts are cut from the one kept. Cutting every draw
        # (np.split into n_clients pieces per class) took 50 ms a draw for 5000 clients.
        sizes = np.zeros(n_clients, np.int64)
        draw = []
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(concentration)
            open_ = sizes < share
            p = np.where(open_, p, 0.0)
            total = p.sum()
            if not np.isfinite(total) or total <= 0:  # the draw fell on full clients only
                p, total = open_.astype(np.float64), float(open_.sum())
            cuts = np.clip(np.floor(np.cumsum(p / total)[:-1] * len(idx)), 0, len(idx)).astype(np.int64)
            counts = np.diff(cuts, prepend=0, append=len(idx))  # cuts never decrease: the chunks' sizes
            sizes += counts
            draw.append((idx, counts))
        smallest = int(sizes.min())
        if smallest >= min_size:
            return _cut(draw, n, n_clients)
        best = max(best, smallest)
        short = int((sizes < min_size).sum())
        fewest_short, all_short = min(fewest_short, short), all_short + short
        if tries == HOPELESS_AFTER and all_short >= HOPELESS_SHORT_MEAN * tries and tries < max_tries:
            raise PartitionError(
                f"no Dirichlet(alpha={alpha}) partition of {n} samples over {n_clients} clients will give every client "
                f"min_size={min_size} samples: each of the first {tries} draws left {fewest_short} or more clients "
                f"short (the best gave {best}), too many for more draws to help: raise alpha, or lower min_size or "
                "n_clients", n, n_clients, alpha, min_size, tries, best, fewest_short, hopeless=True)
    raise PartitionError(f"no Dirichlet(alpha={alpha}) partition of {n} samples over {n_clients} clients gave every "
                         f"client min_size={min_size} samples in {max_tries} draws (the best gave {best}): "
                         "raise alpha, or lower min_size or n_clients", n, n_clients, alpha, min_size, max_tries, best,
                         fewest_short)


def _cut(draw: List[Tuple[np.ndarray, np.ndarray]], n: int, n_clients: int) -> List[Tensor]:
    """The parts of a draw: for every class, its shuffled samples and how many of them, in
    order, each client takes. Each part sorted."""
    owner = np.empty(n, np.int64)
    for idx, counts in draw:
        owner[idx] = np.repeat(np.arange(n_clients), counts)
    order = np.argsort(owner, kind="stable")  # by client, each client's samples in index order
    ends = np.cumsum(np.bincount(owner, minlength=n_clients))[:-1]
    return [torch.from_numpy(part.astype(np.int64)) for part in np.split(order, ends)]  # copies: no shared storage
