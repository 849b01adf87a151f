"""fedmpq.data: the datasets (digits built in, the real Fashion-MNIST when installed, tiny
synthetic IDX and CIFAR files in both layouts and both pickle dialects), the restricted
unpickler refusing code, missing data named with where it was looked for, and the iid and
Dirichlet partitions (disjoint, complete, seeded, skewed as alpha says, min_size kept)."""
from __future__ import annotations

import gzip
import io
import os
import pickle
import re
import struct

import numpy as np
import pytest
import torch

from fedmpq import data


def _check_standardized(ds: data.Dataset):
    assert ds.train_x.dtype == torch.float32 and ds.test_x.dtype == torch.float32
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert ds.train_x.shape[1:] == (ds.in_channels, ds.image_size, ds.image_size)
    assert ds.test_x.shape[1:] == ds.train_x.shape[1:]
    assert ds.train_x.is_contiguous()
    x = ds.train_x.double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.permute(1, 0, 2, 3).reshape(ds.in_channels, -1).std(dim=1, unbiased=False)
    assert torch.allclose(mean, torch.zeros_like(mean), atol=1e-4)
    assert torch.allclose(std, torch.ones_like(std), atol=1e-4)
    for y in (ds.train_y, ds.test_y):
        assert int(y.min()) >= 0 and int(y.max()) < ds.num_classes
    assert len(ds.mean) == len(ds.std) == ds.in_channels


# ---- digits


def test_digits_shapes_split_and_normalization():
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    assert (ds.name, ds.num_classes, ds.in_channels, ds.image_size) == ("digits", 10, 1, 8)
    assert ds.num_train + ds.num_test == 1797
    assert 340 <= ds.num_test <= 380
    _check_standardized(ds)
    # Stratified: every class held out in proportion.
    train_counts = torch.bincount(ds.train_y, minlength=10).double()
    test_counts = torch.bincount(ds.test_y, minlength=10).double()
    frac = test_counts / (train_counts + test_counts)
    assert torch.all((frac - 0.2).abs() < 0.02)
    # The held-out images are the raw ones under the training set's constants, and the split
    # is the same on every load.
    raw = load_digits()
    raw_set = {(bytes(np.asarray(im, np.uint8).tobytes()), int(t)) for im, t in zip(raw.images, raw.target)}
    back = (ds.test_x[:, 0].double() * ds.std[0] + ds.mean[0]) * 16
    assert torch.allclose(back, back.round(), atol=1e-4)
    for im, t in zip(back.round().to(torch.uint8).numpy(), ds.test_y.tolist()):
        assert (im.tobytes(), t) in raw_set
    again = data.load("DIGITS")
    assert torch.equal(again.test_y, ds.test_y) and torch.equal(again.train_x, ds.train_x)


def test_unknown_dataset_named():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, fashion-mnist, cifar10, cifar100"):
        data.load("mnist")
    assert data.DATASETS == ("digits", "fashion-mnist", "cifar10", "cifar100")


# ---- Fashion-MNIST


@pytest.fixture(scope="module")
def fashion():
    try:
        return data.load("fashion-mnist")
    except data.MissingDatasetError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")


def test_real_fashion_mnist(fashion):
    assert (fashion.name, fashion.num_classes, fashion.in_channels, fashion.image_size) == ("fashion-mnist", 10, 1, 28)
    assert fashion.train_x.shape == (60000, 1, 28, 28) and fashion.test_x.shape == (10000, 1, 28, 28)
    assert torch.equal(torch.bincount(fashion.train_y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(fashion.test_y), torch.full((10,), 1000))
    assert fashion.mean[0] == pytest.approx(0.2860, abs=1e-3) and fashion.std[0] == pytest.approx(0.3530, abs=1e-3)
    _check_standardized(fashion)


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_fashion(folder, gz: bool, n_train=20, n_test=10, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test, dtype=np.uint8) * 3) % 10,
    }
    for stem, arr in arrays.items():
        if gz:
            with gzip.open(folder / (stem + ".gz"), "wb") as f:
                f.write(_idx_bytes(arr))
        else:
            (folder / stem).write_bytes(_idx_bytes(arr))
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["", "fashion-mnist", "FashionMNIST/raw"])
def test_fashion_mnist_from_a_folder(tmp_path, gz, layout):
    arrays = _write_fashion(tmp_path / layout if layout else tmp_path, gz)
    ds = data.load("fashion-mnist", tmp_path)
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    _check_standardized(ds)
    assert ds.train_y.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    back = (ds.test_x[:, 0].double() * ds.std[0] + ds.mean[0]) * 255
    assert torch.equal(back.round().to(torch.uint8), torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))


def test_idx_reader_rejects_bad_files(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="bad magic"):
        data.read_idx(p)
    p.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(ValueError, match="element type 0x0d"):
        data.read_idx(p)
    p.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc")
    with pytest.raises(ValueError, match="holds 3"):
        data.read_idx(p)
    g = tmp_path / "x-idx1-ubyte.gz"
    g.write_bytes(gzip.compress(_idx_bytes(np.arange(4, dtype=np.uint8)))[:-6])
    with pytest.raises(ValueError, match="cannot read"):
        data.read_idx(g)
    z = bytearray(gzip.compress(_idx_bytes(np.arange(4000, dtype=np.uint8) * 7)))
    z[12:20] = b"\xff" * 8  # the deflate stream itself corrupted: zlib.error, not BadGzipFile
    g.write_bytes(bytes(z))
    with pytest.raises(ValueError, match="cannot read"):
        data.read_idx(g)
    # 2^31 x 2^31 x 4 wraps to 0 in int64: the header must not pass the size check
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 1 << 31, 1 << 31, 4))
    with pytest.raises(ValueError, match=f"{p}: IDX header says .*the file holds 0"):
        data.read_idx(p)


def test_a_bad_fashion_mnist_file_stops_the_command_with_one_line(tmp_path, capsys):
    from fedmpq import cli

    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (tmp_path / stem).write_bytes(b"\x00\x00\x08\x03" + struct.pack(">III", 1 << 31, 1 << 31, 4))
    assert cli.main(["simulate", "-q", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "IDX header says" in err and str(tmp_path) in err
    assert not (tmp_path / "o").exists()


def test_train_samples_is_one_fixed_subset_whatever_the_seed():
    ds = data.load("digits")
    a, b = data.subset(ds, 200), data.subset(ds, 200)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y) and len(a.train_y) == 200
    assert torch.equal(a.test_x, ds.test_x) and data.subset(ds, None) is ds
    rows = {tuple(r) for r in ds.train_x.reshape(len(ds.train_y), -1).tolist()}
    assert all(tuple(r) in rows for r in a.train_x.reshape(200, -1).tolist())
    for bad in (0, len(ds.train_y) + 1, 1.5, True):
        with pytest.raises(ValueError, match="train_samples must be an integer in 1.."):
            data.subset(ds, bad)


def test_missing_fashion_mnist_names_the_paths(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(data.MissingDatasetError) as e:
        data.load("fashion-mnist", where)
    msg = str(e.value)
    assert str(where) in msg and str(where / "fashion-mnist") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "data_dir" in msg
    assert isinstance(e.value, FileNotFoundError)
    # Three of the four files are not enough.
    _write_fashion(tmp_path / "partial", gz=True)
    os.remove(tmp_path / "partial" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(data.MissingDatasetError, match="t10k-labels-idx1-ubyte"):
        data.load("fashion-mnist", tmp_path / "partial")
    # ...and the folder holding the other three is named with the one missing (it said only
    # "not found: looked for" the four)
    with pytest.raises(data.MissingDatasetError, match=r"^\S*partial holds only part of the dataset: "
                                                          r"t10k-labels-idx1-ubyte\[\.gz\] missing\. "):
        data.load("fashion-mnist", tmp_path / "partial")


# ---- CIFAR


class _Py2Pickler(pickle._Pickler):
    """Writes as Python 2 did (the official CIFAR files): str and bytes as BINSTRING, numpy's
    reconstruct under numpy.core (rewritten below)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _binstring(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        head = pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)
        self.write(head + obj)

    dispatch[bytes] = _binstring
    dispatch[str] = _binstring


def _dump(obj, path, dialect: str):
    if dialect == "py2":
        buf = io.BytesIO()
        _Py2Pickler(buf, 2).dump(obj)
        raw = buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
        assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw
        path.write_bytes(raw)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=int(dialect)))


def _batch(n, label_key, num_classes, rng, str_keys=False):
    x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    y = [int(v) for v in rng.integers(0, num_classes, n)]
    d = {b"batch_label": b"synthetic batch", b"data": x, label_key.encode(): y,
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if label_key == "fine_labels":
        d[b"coarse_labels"] = [v // 5 for v in y]
    if str_keys:
        d = {k.decode(): v for k, v in d.items()}
    return d


def _write_cifar(root, name, dialect, n=6, seed=0, str_keys=False):
    rng = np.random.default_rng(seed)
    if name == "cifar10":
        folder, label_key, k = root / "cifar-10-batches-py", "labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    else:
        folder, label_key, k = root / "cifar-100-python", "fine_labels", 100
        files = ["train", "test"]
    folder.mkdir(parents=True)
    batches = {}
    for f in files:
        batches[f] = _batch(n if f.startswith("data") else 2 * n, label_key, k, rng, str_keys)
        _dump(batches[f], folder / f, dialect)
    return folder, batches, label_key


@pytest.mark.parametrize("dialect", ["py2", "2", "4", "5"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_synthetic_batches(tmp_path, name, dialect):
    folder, batches, label_key = _write_cifar(tmp_path, name, dialect, str_keys=dialect == "4")
    key = label_key if dialect == "4" else label_key.encode()
    data_key = "data" if dialect == "4" else b"data"
    train_files = [f for f in batches if f.startswith("data") or f == "train"]
    test_files = [f for f in batches if f not in train_files]
    want_train_x = np.concatenate([batches[f][data_key] for f in train_files]).reshape(-1, 3, 32, 32)
    want_train_y = sum((batches[f][key] for f in train_files), [])
    want_test_x = np.concatenate([batches[f][data_key] for f in test_files]).reshape(-1, 3, 32, 32)
    for where in (tmp_path, folder):  # the parent or the folder itself
        ds = data.load(name, where)
        assert ds.name == name and ds.num_classes == (10 if name == "cifar10" else 100)
        assert (ds.in_channels, ds.image_size) == (3, 32)
        assert ds.train_x.shape == want_train_x.shape and ds.test_x.shape == want_test_x.shape
        assert ds.train_y.tolist() == want_train_y
        _check_standardized(ds)
        mean = torch.tensor(ds.mean).view(1, 3, 1, 1)
        std = torch.tensor(ds.std).view(1, 3, 1, 1)
        back = ((ds.test_x.double() * std + mean) * 255).round().to(torch.uint8)
        assert torch.equal(back, torch.from_numpy(want_test_x))


@pytest.mark.parametrize("name", ["fashion-mnist", "cifar10", "cifar100"])
def test_an_empty_test_set_stops_the_command_with_one_line(tmp_path, capsys, name):
    from fedmpq import cli

    if name == "fashion-mnist":
        _write_fashion(tmp_path, gz=False, n_test=0)
    else:
        folder, _, _ = _write_cifar(tmp_path, name, "2")
        label_key = "labels" if name == "cifar10" else "fine_labels"
        test = folder / ("test_batch" if name == "cifar10" else "test")
        _dump(_batch(0, label_key, 10, np.random.default_rng(0)), test, "2")
    # was a run whose every round reported accuracy 0.0000 (of no images)
    assert cli.main(["simulate", "-q", "--dataset", name, "--data-dir", str(tmp_path), "--n-clients", "1",
                     "--budgets", "4", "--rounds", "1", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "hold" in err and "no images" in err and str(tmp_path) in err
    assert not (tmp_path / "o").exists()


def test_cifar_reader_rejects_malformed_batches(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "b"
    good = _batch(4, "labels", 10, rng)
    for bad, match in [
        ([1, 2, 3], "not a dict"),
        ({b"labels": [1]}, "no 'data'"),
        ({**good, b"data": good[b"data"].astype(np.int16)}, "expected a uint8"),
        ({**good, b"data": good[b"data"][:, :100]}, "expected a uint8"),
        ({**good, b"labels": [1, 2]}, "must be 4 ints"),
        ({**good, b"labels": [0, 1, 2, 10]}, r"labels must be in 0\.\.9"),
        ({**good, b"labels": ["a", "b", "c", "d"]}, "must be 4 ints"),
    ]:
        _dump(bad, p, "2")
        with pytest.raises(ValueError, match=match):
            data.read_cifar_batch(p)
    p.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        data.read_cifar_batch(p)
    p.write_bytes(pickle.dumps(good, protocol=2)[:-40])  # truncated
    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        data.read_cifar_batch(p)
    with pytest.raises(FileNotFoundError):
        data.read_cifar_batch(tmp_path / "absent")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_malicious_pickle_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(0)
    payloads = [
        _Evil(marker),
        {**_batch(4, "labels", 10, rng), b"extra": _Evil(marker)},  # hidden inside a valid batch
    ]
    for payload in payloads:
        p = tmp_path / "data_batch_1"
        p.write_bytes(pickle.dumps(payload, protocol=protocol))
        with pytest.raises(data.UnsafePickleError, match=r"refused to load global (posix|os|nt)\.system"):
            data.read_cifar_batch(p)
        with pytest.raises(pickle.UnpicklingError, match=re.escape(str(p))):
            data.restricted_load(p)
        assert not marker.exists()
    p.write_bytes(pickle.dumps(_EvalEvil(), protocol=protocol))
    with pytest.raises(data.UnsafePickleError, match=r"(__builtin__|builtins)\.eval"):
        data.restricted_load(p)


def test_malicious_batch_in_a_dataset_folder(tmp_path, capsys):
    marker = tmp_path / "pwned"
    folder, _, _ = _write_cifar(tmp_path, "cifar10", "2")
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(data.UnsafePickleError, match="data_batch_3"):
        data.load("cifar10", tmp_path)
    from fedmpq import cli  # the command says it in one line (it was a traceback)

    assert cli.main(["simulate", "-q", "--dataset", "cifar10", "--data-dir", str(tmp_path),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fedmpq: dataset cifar10: ") and "data_batch_3" in err, err
    assert "refused to load global" in err and not marker.exists() and not (tmp_path / "o").exists()
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    p = tmp_path / "b"
    # _codecs.encode('x', 'zlib_codec') would be a decompression-bomb primitive: refused.
    p.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00xX\n\x00\x00\x00zlib_codec\x86R.")
    with pytest.raises(data.UnsafePickleError, match="latin-1"):
        data.restricted_load(p)
    # How Python 3 writes bytes at protocol 2 (_codecs.encode(str, 'latin1')): admitted.
    p.write_bytes(pickle.dumps(b"\xe9\x00ab", protocol=2))
    assert b"_codecs" in p.read_bytes()
    assert data.restricted_load(p) == b"\xe9\x00ab"


@pytest.mark.parametrize("name,folder,files", [
    ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ("cifar100", "cifar-100-python", "train"),
])
def test_missing_cifar_names_the_paths(tmp_path, name, folder, files):
    where = tmp_path / "somewhere"
    with pytest.raises(data.MissingDatasetError) as e:
        data.load(name, where)
    msg = str(e.value)
    assert str(where) in msg and str(where / folder) in msg and files in msg
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in msg and "data_dir" in msg
    # An unextracted archive is pointed at.
    where.mkdir()
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    (where / archive).write_bytes(b"")
    with pytest.raises(data.MissingDatasetError, match=f"extract it there \\(tar xzf {archive}\\)"):
        data.load(name, where)


@pytest.mark.parametrize("name, drop", [("cifar10", "data_batch_5"), ("cifar100", "test")])
def test_a_cifar_folder_missing_one_file_names_it(tmp_path, name, drop):
    """A folder holding all but one batch said "not found: looked for" every file, as if the
    folder were wrong; it names the folder and the file missing now."""
    folder = _write_cifar(tmp_path, name, "4")[0]
    (folder / drop).unlink()
    with pytest.raises(data.MissingDatasetError) as e:
        data.load(name, tmp_path)
    assert str(e.value).startswith(f"{folder.absolute()} holds only part of the dataset: {drop} missing. ")


def test_missing_cifar_by_default_looks_in_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.MissingDatasetError) as e:
        data.load("cifar10")
    assert str(tmp_path / "data" / "cifar-10-batches-py") in str(e.value)


# ---- partitions


def _labels(per_class=300, classes=10, seed=0):
    y = np.repeat(np.arange(classes), per_class)
    return torch.from_numpy(np.random.default_rng(seed).permutation(y))


def _check_cover(parts, n):
    assert all(p.dtype == torch.int64 and p.ndim == 1 for p in parts)
    allidx = torch.cat(parts)
    assert allidx.numel() == n
    assert torch.equal(allidx.sort().values, torch.arange(n))
    for p in parts:
        assert torch.all(p[1:] > p[:-1])  # sorted, no repeats


@pytest.mark.parametrize("alpha", [None, 0.05, 0.5, 100.0])
def test_partition_disjoint_complete_reproducible(alpha):
    y = _labels()
    parts = data.partition(y, 10, alpha, seed=3)
    assert len(parts) == 10
    _check_cover(parts, len(y))
    same = data.partition(y, 10, alpha, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, same))
    other = data.partition(y, 10, alpha, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))
    # numpy labels and lists give the same partition as a tensor
    from_np = data.partition(y.numpy(), 10, alpha, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, from_np))


def test_iid_sizes_differ_by_at_most_one():
    y = _labels(per_class=103, classes=3)
    for k in (1, 7, 10, 30):
        sizes = [len(p) for p in data.partition(y, k, None, seed=0)]
        assert sum(sizes) == 309 and max(sizes) - min(sizes) <= 1


def _class_fractions(y, parts, classes=10):
    return torch.stack([torch.bincount(y[p], minlength=classes).double() / len(p) for p in parts])


def test_dirichlet_small_alpha_is_skewed_large_alpha_near_uniform():
    y = _labels()
    iid = _class_fractions(y, data.partition(y, 10, None, seed=0))
    skew = _class_fractions(y, data.partition(y, 10, 0.05, seed=0))
    flat = _class_fractions(y, data.partition(y, 10, 1000.0, seed=0))
    top2 = lambda f: f.sort(dim=1, descending=True).values[:, :2].sum(1)  # noqa: E731
    # alpha=0.05: most clients hold mostly one or two classes
    assert (top2(skew) > 0.8).float().mean() >= 0.7
    assert top2(iid).max() < 0.35
    # alpha=1000: every client's class mix is within a few points of uniform
    assert (flat - 0.1).abs().max() < 0.04
    assert (skew - 0.1).abs().max() > 0.5


def test_dirichlet_respects_min_size():
    y = _labels()
    for seed in range(5):
        parts = data.partition(y, 20, 0.1, seed=seed, min_size=60)
        _check_cover(parts, len(y))
        assert min(len(p) for p in parts) >= 60
    # digits-sized (1438 samples, 10 classes) with many clients
    ds_labels = torch.from_numpy(np.random.default_rng(1).integers(0, 10, 1438))
    parts = data.partition(ds_labels, 50, 0.3, seed=0, min_size=10)
    assert min(len(p) for p in parts) >= 10
    _check_cover(parts, 1438)


def test_dirichlet_impossible_min_size_is_a_clear_error():
    with pytest.raises(ValueError, match="min_size=31.*only 300"):
        data.partition(_labels(30), 10, 0.5, seed=0, min_size=31)
    with pytest.raises(ValueError, match="min_size=31.*only 300"):
        data.partition(_labels(30), 10, None, seed=0, min_size=31)
    # One class holding 91 % of the samples, alpha tiny: no draw gives every client 10.
    y = torch.tensor([0] * 91 + list(range(1, 10)))
    with pytest.raises(ValueError, match="no Dirichlet.*in 50 draws.*raise alpha"):
        data.partition(y, 10, 0.001, seed=0, min_size=10, max_tries=50)


def test_a_hopeless_dirichlet_split_stops_after_its_first_draws():
    """100 clients and alpha 0.01 on the digits: each class falls on one client or two, and
    every draw leaves some 70 clients short. It drew all 1000 times before saying so (a minute,
    silent, with thousands of clients); it stops after HOPELESS_AFTER draws."""
    y = data.load("digits").train_y
    with pytest.raises(data.PartitionError, match=r"each of the first 20 draws left \d+ or more clients short") as e:
        data.partition(y, 100, 0.01, seed=0)
    assert e.value.hopeless and e.value.draws == data.HOPELESS_AFTER == 20
    assert e.value.short >= 60 and e.value.best < 10  # the fewest short in a draw: 68
    # draws that leave fewer clients short go on to max_tries: another seed may yet succeed
    with pytest.raises(data.PartitionError, match="in 100 draws") as e:
        data.partition(y, 20, 0.01, seed=0, max_tries=100)
    assert not e.value.hopeless and e.value.draws == 100 and 0 < e.value.short < data.HOPELESS_SHORT_MEAN


def _cifar100_sized_labels():
    return np.repeat(np.arange(100), 500)  # 50,000 samples, 500 of each of 100 classes


def test_a_large_hopeless_split_whose_draws_leave_a_few_short_stops_early_too():
    """3000 clients of CIFAR-100's size, alpha 0.3, min_size 10: every draw leaves 10 to 32
    clients short (18 on average), never none. The stop asked for 20 or more short in each of
    the first 20 draws, so it drew all 1000 times (19 s) before the error; on average 17 or
    more in the first 20 stops it there, with the same message."""
    with pytest.raises(data.PartitionError, match=r"each of the first 20 draws left 10 or more clients short "
                                                  r"\(the best gave 7\), too many for more draws to help") as e:
        data.partition(_cifar100_sized_labels(), 3000, 0.3, seed=0, min_size=10)
    assert e.value.hopeless and e.value.draws == data.HOPELESS_AFTER and e.value.short == 10


# Digests of large Dirichlet splits made before the stop looked at the mean number short
# (50,000 labels; numpy 2): each succeeds after draws that left clients short, and must still
# give the same parts. (3000, 1.0) succeeds in draw 104, (2000, 0.05) in 17, (1000, 0.05) in
# 7, the skewed 10-class (1000, 1.0, min_size 20) in 7.
@pytest.mark.parametrize("labels,k,alpha,seed,min_size,digest", [
    ("c100", 3000, 1.0, 0, 5, "91d501e235affc38"), ("c100", 2000, 0.05, 0, 5, "ac9e90c35ad3040b"),
    ("c100", 1000, 0.05, 0, 10, "c8ce8748212c96c1"), ("c10", 1000, 1.0, 0, 20, "5eddd25d93eec81a"),
])
def test_large_dirichlet_splits_are_the_ones_they_were(labels, k, alpha, seed, min_size, digest):
    import hashlib

    y = _cifar100_sized_labels() if labels == "c100" else np.random.default_rng(7).integers(0, 10, 50000)
    h = hashlib.sha256()
    for p in data.partition(y, k, alpha, seed, min_size=min_size):
        h.update(len(p).to_bytes(8, "little"))
        h.update(p.numpy().tobytes())
    assert h.hexdigest()[:16] == digest


# Digests of the digits' Dirichlet splits made before the early stop and the draws that only
# count (numpy 2, its Generator): a reproduced or resumed run must give its clients the same
# samples. (30, 0.1) and (50, 0.3) succeed only in draws 40 and 46, after draws that left
# clients short; (10, None) is iid.
@pytest.mark.parametrize("k,alpha,seed,digest", [
    (10, 0.5, 0, "eac9283deac0134c"), (10, 0.1, 3, "5f596ace50f525b2"), (30, 0.1, 0, "599bff73a59edfa1"),
    (50, 0.3, 0, "51c019eb4a3fce3c"), (10, None, 0, "010fc83130782109"),
])
def test_digits_partitions_are_the_ones_they_were(k, alpha, seed, digest):
    import hashlib

    h = hashlib.sha256()
    for p in data.partition(data.load("digits").train_y, k, alpha, seed):
        assert p.dtype == torch.int64 and p.is_contiguous()
        h.update(len(p).to_bytes(8, "little"))
        h.update(p.numpy().tobytes())
    assert h.hexdigest()[:16] == digest


@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=0.0), "alpha must be a positive"),
    (dict(alpha=-1.0), "alpha must be a positive"),
    (dict(alpha=float("nan")), "alpha must be a positive"),
    (dict(alpha=float("inf")), "alpha must be a positive"),
    (dict(alpha="x"), "alpha must be a positive"),
    (dict(n_clients=0), "n_clients must be an integer >= 1"),
    (dict(n_clients=-2), "n_clients must be an integer >= 1"),
    (dict(n_clients=2.5), "n_clients must be an integer >= 1"),
    (dict(min_size=-1), "min_size must be an integer >= 0"),
    (dict(labels=torch.zeros(4, 5, dtype=torch.int64)), "one-dimensional"),
    (dict(labels=torch.rand(20)), "must be integers"),
    (dict(alpha=True), "alpha must be a positive"),  # float(True) was alpha 1.0
    (dict(seed=None), "seed must be an integer >= 0, got None"),  # an unseeded split, unrepeatable
    (dict(seed=1.5), "seed must be an integer >= 0, got 1.5"),
    (dict(seed=-1), "seed must be an integer >= 0, got -1"),
    (dict(seed=True), "seed must be an integer >= 0, got True"),
])
def test_partition_rejects_bad_arguments(kwargs, match):
    args = dict(labels=_labels(10), n_clients=4, alpha=0.5, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        data.partition(**args)


def test_one_client_gets_everything():
    y = _labels(20)
    for alpha in (None, 0.1):
        (only,) = data.partition(y, 1, alpha, seed=0)
        assert torch.equal(only, torch.arange(len(y)))


def test_a_first_draw_that_meets_min_size_exactly_is_kept():
    """The Dirichlet draw is repeated only while some client has fewer than min_size samples:
    a draw whose smallest client holds exactly min_size is the partition (min_size=0 returns
    the first draw; asking for its smallest size gives that same draw)."""
    y = _labels()
    first = data.partition(y, 10, 0.5, seed=2, min_size=0)
    smallest = min(len(p) for p in first)
    assert smallest > 0
    again = data.partition(y, 10, 0.5, seed=2, min_size=smallest)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_each_class_is_shuffled_before_it_is_cut():
    """A client's share of a class is a random subset of that class's samples, not a run of
    them in index order (the class's samples are shuffled, then cut)."""
    y = _labels()
    parts = data.partition(y, 5, 0.5, seed=0)
    runs = []
    for c in range(10):
        of_c = np.flatnonzero(y.numpy() == c)
        for p in parts:
            pos = np.flatnonzero(np.isin(of_c, p.numpy()))
            if len(pos) >= 3:
                runs.append(pos[-1] - pos[0] + 1 == len(pos))
    assert len(runs) >= 10 and not all(runs)


def test_a_client_at_its_even_share_takes_no_more():
    """Dirichlet draws with a tiny alpha fall on one client. Two classes of 10 over 2 clients
    (share 10): the first class fills one client to its share, so the second goes to the other,
    whichever client its draw favours. Classes of 3 and 4 (share 3.5): a client holding 3 is
    still below its share and may take the 4 as well."""
    y = np.array([0] * 10 + [1] * 10)
    for seed in range(8):
        assert sorted(len(p) for p in data.partition(y, 2, 1e-3, seed=seed, min_size=0)) == [10, 10]
    y = np.array([0] * 3 + [1] * 4)
    sizes = [sorted(len(p) for p in data.partition(y, 2, 1e-3, seed=seed, min_size=0)) for seed in range(8)]
    assert [0, 7] in sizes and [3, 4] in sizes


def test_max_tries_must_be_at_least_one():
    y = _labels(per_class=2, classes=10)  # 20 samples
    with pytest.raises(ValueError, match="max_tries must be an integer >= 1"):
        data.partition(y, 2, 0.5, seed=0, max_tries=0)


def test_a_subset_of_the_whole_training_set_is_allowed():
    ds = data.load("digits")
    n = len(ds.train_y)
    assert torch.equal(data.subset(ds, n).train_y, ds.train_y)
    with pytest.raises(ValueError, match="train_samples must be an integer in 1.."):
        data.subset(ds, n + 1)


def test_a_constant_channel_standardizes_to_zero_not_nan():
    train = np.stack([np.full((2, 2), 5.0), np.arange(4.0).reshape(2, 2)])[None].repeat(3, axis=0)  # (3, 2, 2, 2)
    tx, vx, mean, std = data._standardize(train, train[:1], 1.0)
    assert std[0] == 1.0 and mean[0] == 5.0
    assert torch.isfinite(tx).all() and not tx[:, 0].any()


def test_digits_holds_out_round_of_a_fifth_of_every_class():
    """round(0.2 * n_c) per class (half to even), not int(): 178 -> 36, 183 -> 37, 174 -> 35."""
    from sklearn.datasets import load_digits

    ds = data.load("digits")
    per_class = np.bincount(load_digits().target, minlength=10)
    assert torch.bincount(ds.test_y, minlength=10).tolist() == [round(0.2 * c) for c in per_class]


def test_digits_are_scikit_learns_without_importing_it(monkeypatch):
    """The digits read from scikit-learn's bundled file are load_digits()'s, value for value;
    where the file is not found, load_digits itself is used."""
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, y = data._digits_arrays()
    assert images.dtype == np.float64 and y.dtype == np.int64
    assert np.array_equal(images, ref.images) and np.array_equal(y, ref.target)

    import importlib.util
    from types import SimpleNamespace
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: SimpleNamespace(origin="/nonexistent/__init__.py"))
    images2, y2 = data._digits_arrays()
    assert np.array_equal(images2, ref.images) and np.array_equal(y2, ref.target)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.MissingDatasetError, match="pip install scikit-learn"):
        data._digits_arrays()


def test_loading_digits_does_not_import_scikit_learn():
    """sklearn.datasets brings scipy in (80 MB and 0.4 s in every training process)."""
    import subprocess
    import sys

    code = ("import sys; from fedmpq import data; ds = data.load('digits'); "
            "print(len(ds.train_y) + len(ds.test_y), 'sklearn' in sys.modules, 'scipy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["1797", "False", "False"], out.stderr[-2000:]
