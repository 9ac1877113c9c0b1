"""Turning what users pass (Tensor, (X, y), Dataset, DataLoader, iterable of batches) into batches.

A batch's inputs are a Tensor, or a :class:`MultiInput` for models called with several tensors:
positionally (``model(ids, mask)``) or by keyword (``model(input_ids=..., attention_mask=...)``, as
HuggingFace models are). How the data says which is which:

- a Tensor ``X``, or ``(X, y)`` with ``y`` integer labels ``[N]``;
- several inputs: ``((ids, mask), y)`` or ``((ids, mask),)`` -> ``model(ids, mask)``; a tuple of
  tensors of equal length that is not an ``(X, y)`` pair, ``(ids, mask)``, is the same as ``((ids, mask),)``;
- keyword inputs: a dict (or a HuggingFace ``BatchEncoding``) of equal-length tensors; the first key among
  ``label``, ``labels``, ``y``, ``target``, ``targets`` holds the labels and every other key is passed by
  name. A dict whose only tensor (besides the labels) sits under one of the keys ``x``, ``input``, ``inputs``,
  ``image``, ``images``, ``pixel_values`` passes that tensor alone, positionally; with other tensors beside it,
  every tensor is passed by name (``{"x": x, "mask": m}`` -> ``model(x=x, mask=m)``), never cut to one, and the
  torch probe refuses keys that ``forward`` does not take;
- a Dataset, a DataLoader or any iterable of such batches (a batch ``[inputs, y]`` whose first item is a
  list or tuple of tensors holds several positional inputs).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["iter_batches", "is_one_shot", "known_rows", "progress_bar", "MultiInput", "as_inputs", "input_tensors", "n_rows", "per_input_shape"]


class MultiInput:
    """The inputs of one batch for a model called with several tensors: positional (a tuple) or by keyword (a dict).

    It behaves like a batch tensor where the library needs one: ``len``, row indexing and slicing, ``.to``.

    Args:
        parts: a tuple of tensors (positional arguments) or a mapping of name to tensor (keyword
            arguments), all with the same first dimension (the examples).

    Example:
        >>> ids, mask = torch.zeros(4, 7, dtype=torch.long), torch.ones(4, 7, dtype=torch.long)
        >>> batch = MultiInput({"input_ids": ids, "attention_mask": mask})
        >>> len(batch), len(batch[1:3]), batch[[0, 2]].parts["input_ids"].shape
        (4, 2, torch.Size([2, 7]))
    """

    def __init__(self, parts: Sequence[Tensor] | Mapping[str, Tensor]):
        if isinstance(parts, Mapping):
            self.parts: tuple[Tensor, ...] | dict[str, Tensor] = {str(k): v for k, v in parts.items()}
            tensors = list(self.parts.values())
        else:
            self.parts = tuple(parts)
            tensors = list(self.parts)
        if not tensors or not all(isinstance(t, Tensor) and t.dim() >= 1 for t in tensors):
            raise TypeError("a multi-input batch needs one or more tensors with a batch dimension, got "
                            f"{[type(t).__name__ for t in tensors]}")
        lengths = {int(t.shape[0]) for t in tensors}
        if len(lengths) != 1:
            raise ValueError(
                f"the inputs of a batch must have the same number of examples (first dimension), got "
                f"{[int(t.shape[0]) for t in tensors]}: each row of every input is one example. A model fed a flat "
                "token tensor with offsets (nn.EmbeddingBag(text, offsets)) has no rows to split; pad the tokens "
                "to ids [B, T] (nn.EmbeddingBag takes 2-D ids without offsets, padding_idx ignores the padding)")
        self._n = lengths.pop()

    def __repr__(self) -> str:
        shapes = ({k: list(v.shape) for k, v in self.parts.items()} if isinstance(self.parts, dict)
                  else [list(t.shape) for t in self.parts])
        return f"MultiInput({shapes})"

    def __len__(self) -> int:
        return self._n

    def tensors(self) -> list[Tensor]:
        """The tensors.

        Returns:
            the tensors, in order.
        """
        return list(self.parts.values()) if isinstance(self.parts, dict) else list(self.parts)

    def map(self, fn: Any) -> MultiInput:
        """A new batch with ``fn(tensor)`` for every tensor.

        Args:
            fn: ``Tensor -> Tensor``.

        Returns:
            a new :class:`MultiInput` of the same kind.
        """
        if isinstance(self.parts, dict):
            return MultiInput({k: fn(v) for k, v in self.parts.items()})
        return MultiInput(tuple(fn(t) for t in self.parts))

    def __getitem__(self, index: Any) -> MultiInput:
        return self.map(lambda t: t[index])

    def to(self, *args: Any, **kwargs: Any) -> MultiInput:
        """Every tensor moved or cast with ``Tensor.to``.

        Args:
            *args: as ``Tensor.to`` takes them (a device, a dtype).
            **kwargs: as ``Tensor.to`` takes them.

        Returns:
            a new :class:`MultiInput`.
        """
        return self.map(lambda t: t.to(*args, **kwargs))

    def signature(self) -> tuple[Any, ...]:
        """Per-example shapes and dtypes of the parts: batches can be concatenated when they agree.

        Returns:
            a hashable tuple.
        """
        items = self.parts.items() if isinstance(self.parts, dict) else enumerate(self.parts)
        return tuple((k, tuple(t.shape[1:]), t.dtype) for k, t in items)

    @staticmethod
    def cat(batches: Sequence[MultiInput]) -> MultiInput:
        """Concatenate batches of the same :meth:`signature` along the examples.

        Args:
            batches: the batches.

        Returns:
            one :class:`MultiInput`.
        """
        first = batches[0].parts
        if isinstance(first, dict):
            return MultiInput({k: torch.cat([b.tensors()[j] for b in batches]) for j, k in enumerate(first)})
        return MultiInput(tuple(torch.cat([b.tensors()[i] for b in batches]) for i in range(len(first))))

    def call(self, model: Any) -> Any:
        """Call ``model`` on the parts.

        Args:
            model: the model.

        Returns:
            ``model(*parts)`` or ``model(**parts)``.
        """
        return model(**self.parts) if isinstance(self.parts, dict) else model(*self.parts)


def as_inputs(x: Any) -> Tensor | MultiInput:
    """One batch's inputs as a Tensor or a :class:`MultiInput`: a dict (or ``BatchEncoding``) of tensors is
    passed by keyword (labels left out, see the module docstring), a tuple or list of tensors positionally.

    Args:
        x: a Tensor, a :class:`MultiInput`, a dict (or ``BatchEncoding``) of tensors, or a tuple or list of them.

    Returns:
        a Tensor (as given) or a :class:`MultiInput`.

    Example:
        >>> as_inputs({"input_ids": torch.zeros(2, 3, dtype=torch.long), "labels": torch.tensor([0, 1])})
        MultiInput({'input_ids': [2, 3]})
    """
    if isinstance(x, (Tensor, MultiInput)):
        return x
    if isinstance(x, Mapping):
        return _split_mapping(x)[0]
    if _is_tensors(x):
        return MultiInput(x)
    raise TypeError(f"inputs must be a Tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}")


def input_tensors(x: Tensor | MultiInput) -> list[Tensor]:
    """The tensors of one batch's inputs: ``[x]`` for a Tensor, every part of a :class:`MultiInput`."""
    return x.tensors() if isinstance(x, MultiInput) else [x]


def n_rows(x: Tensor | MultiInput) -> int:
    """Examples in a batch."""
    return len(x) if isinstance(x, MultiInput) else int(x.shape[0])


def per_input_shape(x: Tensor | MultiInput) -> tuple[int, ...] | None:
    """The shape of one example of a Tensor batch; ``None`` for a :class:`MultiInput` (sequence lengths vary)."""
    return None if isinstance(x, MultiInput) else tuple(x.shape[1:])

_X_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
_Y_KEYS = ("y", "label", "labels", "target", "targets")


def _is_labels(y: Any, n: int) -> bool:
    return isinstance(y, Tensor) and y.dim() == 1 and not y.is_floating_point() and y.shape[0] == n


def _is_tensors(x: Any) -> bool:
    return isinstance(x, (tuple, list)) and len(x) > 0 and all(isinstance(t, Tensor) for t in x)


def _split_mapping(item: Mapping[str, Any]) -> tuple[Tensor | MultiInput, Tensor | None]:
    y_key = next((k for k in _Y_KEYS if k in item), None)
    y = item[y_key] if y_key is not None else None
    x_key = next((k for k in _X_KEYS if k in item), None)
    if x_key is not None and not any(isinstance(v, Tensor) for k, v in item.items() if k not in (x_key, y_key)):
        return item[x_key], y
    kwargs = {k: v for k, v in item.items() if k != y_key and (x_key is None or isinstance(v, Tensor))}
    if not kwargs or not all(isinstance(v, Tensor) for v in kwargs.values()):
        raise TypeError(f"a dict batch needs one of the keys {_X_KEYS} or tensors to pass by keyword, got "
                        f"{ {k: type(v).__name__ for k, v in item.items()} }")
    return MultiInput(kwargs), y


def _split_data(data: Any) -> tuple[Tensor | MultiInput, Tensor | None] | None:
    """``(inputs, labels)`` when ``data`` is a whole data set held in tensors; ``None`` for batches to iterate."""
    if isinstance(data, Tensor):
        return data, None
    if isinstance(data, Mapping) and data and all(isinstance(v, Tensor) for v in data.values()):
        return _split_mapping(data)
    if isinstance(data, tuple) and data:
        if len(data) in (1, 2) and _is_tensors(data[0]):  # ((ids, mask),) or ((ids, mask), y)
            x: Tensor | MultiInput = MultiInput(data[0])
            if len(data) == 1 or _is_labels(data[1], len(x)):
                return x, (data[1] if len(data) == 2 else None)
        if len(data) == 2 and isinstance(data[0], Tensor) and _is_labels(data[1], data[0].shape[0]):
            return data[0], data[1]
        if (len(data) == 2 and all(isinstance(t, Tensor) for t in data) and data[1].dim() == 1
                and data[1].is_floating_point() and data[0].dim() > 1 and data[1].shape[0] == data[0].shape[0]):
            raise ValueError(f"(X, y) with y of dtype {data[1].dtype}: labels must be integer class indices "
                             "(y.long()); for a model with two inputs pass ((x1, x2),) or ((x1, x2), y)")
        if _is_tensors(data) and len({t.shape[0] for t in data}) == 1 and data[0].dim() >= 1:
            return MultiInput(data), None  # (ids, mask): several inputs of the same examples
    return None


def _split_item(item: Any) -> tuple[Tensor | MultiInput, Tensor | None]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, Mapping):
        return _split_mapping(item)
    if isinstance(item, (tuple, list)) and item and _is_tensors(item[0]):
        y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        return MultiInput(item[0]), y
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        return item[0], y
    raise TypeError(
        f"cannot read a batch of type {type(item).__name__}; expected a Tensor, an (x, y) tuple/list, an "
        "((inputs...), y) tuple/list, or a dict of tensors")


def iter_batches(data: Any, batch_size: int = 256) -> Iterator[tuple[Tensor | MultiInput, Tensor | None]]:
    """Yield ``(x, y_or_None)`` batches from a Tensor, an ``(X, y)`` pair of Tensors, a Dataset, a
    DataLoader, or any iterable of batches (Tensors, tuples/lists, dicts)."""
    whole = _split_data(data)
    if whole is not None:
        x, y = whole
        for i in range(0, n_rows(x), batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])
        return
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    if not isinstance(data, Iterable):
        raise TypeError(f"expected a Tensor, an (X, y) tuple, a Dataset, a DataLoader or an iterable of batches, "
                        f"got {type(data).__name__}")
    for item in data:
        x, y = _split_item(item)
        if isinstance(x, Tensor) and x.dim() == 0:
            raise ValueError("a batch must have a leading batch dimension, got a 0-d tensor")
        yield x, y


def collect(data: Any, run: Any, fn: Any, batch_size: int) -> Any:
    """``fn(run(batch))`` over a Tensor (one batch) or every batch of ``data``, concatenated.

    ``fn`` returns a Tensor or a ``{key: Tensor}`` dict; dicts are concatenated key by key. Empty
    batches are skipped; data without any row raises ``ValueError``.

    Example:
        >>> collect(torch.arange(5.0), lambda x: x, lambda r: r * 2, batch_size=2).tolist()
        [0.0, 2.0, 4.0, 6.0, 8.0]
    """
    if isinstance(data, (Tensor, MultiInput)):
        return fn(run(data))
    parts = [fn(run(xb)) for xb, _ in iter_batches(data, batch_size) if n_rows(xb)]
    if not parts:
        raise ValueError("received no inputs (empty data)")
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def known_rows(data: Any) -> int | None:
    """Inputs in ``data`` when known without iterating it: a Tensor, an ``(X, y)`` pair or dict of whole
    data, a sized map-style Dataset or a DataLoader over one; ``None`` otherwise."""
    try:
        whole = _split_data(data)
    except Exception:  # not a whole-data form: the iterable forms below
        whole = None
    if whole is not None:
        return n_rows(whole[0])
    ds = data.dataset if isinstance(data, torch.utils.data.DataLoader) else data
    if isinstance(ds, torch.utils.data.Dataset) and not isinstance(ds, torch.utils.data.IterableDataset):
        try:
            return len(ds)  # type: ignore[arg-type]
        except TypeError:
            return None
    return None


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
