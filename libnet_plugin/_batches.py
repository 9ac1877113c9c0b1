"""Turning what users pass (Tensor, (X, y), Dataset, DataLoader, iterable of batches) into batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["iter_batches", "is_one_shot", "progress_bar"]

_X_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def _is_xy_pair(data: Any) -> bool:
    return (isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
            and data[1].dim() == 1 and not data[1].is_floating_point() and data[0].shape[0] == data[1].shape[0])


def _split_item(item: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, dict):
        x = next((item[k] for k in _X_KEYS if k in item), None)
        if x is None:
            raise TypeError(f"a dict batch needs one of the keys {_X_KEYS}, got {sorted(item)}")
        y = next((item[k] for k in _Y_KEYS if k in item), None)
        return x, y
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        return item[0], y
    raise TypeError(
        f"cannot read a batch of type {type(item).__name__}; expected a Tensor, an (x, y) tuple/list, or a dict "
        "with an 'x' key")


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y_or_None)`` batches from a Tensor, an ``(X, y)`` pair of Tensors, a Dataset, a
    DataLoader, or any iterable of batches (Tensors, tuples/lists, dicts)."""
    if isinstance(data, Tensor) or _is_xy_pair(data):
        x, y = (data, None) if isinstance(data, Tensor) else data
        for i in range(0, x.shape[0], batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"expected a Tensor, an (X, y) tuple, a Dataset, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    for item in data:
        x, y = _split_item(item)
        if x.dim() == 0:
            raise ValueError("a batch must have a leading batch dimension, got a 0-d tensor")
        yield x, y


def is_one_shot(data: Any) -> bool:
    """True when ``data`` is an iterator (a generator, ``iter(...)``) that cannot be iterated twice.

    Checked by type, without calling ``iter`` (which would start a DataLoader's worker processes).
    """
    return isinstance(data, Iterator)


def progress_bar(it: Iterable[Any], desc: str, progress: bool | None, total: int | None = None,
                 unit: str = "batch") -> Iterable[Any]:
    """A tqdm bar over ``it`` that vanishes when done; ``progress=None`` shows it only on a terminal."""
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, unit=unit, leave=False, disable=None if progress is None else not progress)
