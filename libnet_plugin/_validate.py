"""Checks of user-given settings shared by the package's modules (clear ``ValueError`` messages)."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

__all__ = ["check_int", "check_layers", "check_float_dtype", "dtype_name", "FLOAT_DTYPES", "accepted_settings", "construct"]

T = TypeVar("T")

#: floating dtypes accepted by name (e.g. a library's ``score_dtype``)
FLOAT_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
                "float16": torch.float16}


def check_int(value: Any, name: str, *, minimum: int = 1, layer: str | None = None) -> int:
    """``value`` as an ``int`` after checking it is an integer (not a bool) of at least ``minimum``.

    Args:
        value: the setting (a Python or NumPy integer).
        name: the setting's name, for the message.
        minimum: the smallest value allowed.
        layer: the layer the setting is for, named in the message when given.

    Raises:
        ValueError: naming the setting, the layer, what is allowed and what was given.

    Example:
        >>> check_int(3, "k")
        3
        >>> check_int(0, "screen_dim", minimum=0, layer="conv1")
        0
        >>> check_int(2.5, "k")
        Traceback (most recent call last):
        ...
        ValueError: k must be a positive integer, got 2.5
    """
    try:
        number = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        number = None
    if number is None or number < minimum:
        where = f" for layer {layer!r}" if layer else ""
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name}{where} must be {allowed}, got {value!r}")
    return int(number)


def check_layers(layers: Sequence[str] | None, probed: Sequence[str]) -> list[str]:
    """The layers asked for (all of ``probed`` when ``None``), after checking each is probed.

    Raises:
        LayerNotFoundError: naming the unknown layers and the probed ones.
    """
    from .errors import LayerNotFoundError

    if layers is None:
        return list(probed)
    unknown = [l for l in layers if l not in probed]
    if unknown:
        raise LayerNotFoundError(f"layers {unknown} are not probed by this network; probed layers: {list(probed)}")
    return list(layers)


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype is saved under: ``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def check_float_dtype(value: Any, name: str, *, layer: str | None = None) -> torch.dtype:
    """A floating dtype given as a ``torch.dtype`` or its name (``"bfloat16"``, ``"torch.float16"``...).

    Example:
        >>> check_float_dtype("bfloat16", "score_dtype")
        torch.bfloat16
    """
    dtype = value if isinstance(value, torch.dtype) else FLOAT_DTYPES.get(str(value).removeprefix("torch."))
    if dtype not in FLOAT_DTYPES.values():
        where = f" for layer {layer!r}" if layer else ""
        raise ValueError(f"{name}{where} must be one of {sorted(FLOAT_DTYPES)}, got {value!r}")
    return dtype


def accepted_settings(cls: type) -> list[str]:
    """The keyword settings ``cls(...)`` accepts, following ``**settings`` passed on to base classes.

    Example:
        >>> class A:
        ...     def __init__(self, a=1): ...
        >>> class B(A):
        ...     def __init__(self, b=2, **settings): super().__init__(**settings)
        >>> accepted_settings(B)
        ['a', 'b']
    """
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names.update(p.name for p in params if p.name != "self"
                     and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return sorted(names)


def construct(cls: type[T], settings: Mapping[str, Any]) -> T:
    """``cls(**settings)``, after rejecting settings that ``cls`` does not accept.

    Raises:
        TypeError: naming the class, the unknown settings and the ones it accepts.

    Example:
        >>> class Score:
        ...     def __init__(self, k=3): self.k = k
        >>> construct(Score, {"k": 5}).k
        5
        >>> construct(Score, {"K": 5})
        Traceback (most recent call last):
        ...
        TypeError: Score got unknown setting(s) ['K']; it accepts ['k']
    """
    accepted = accepted_settings(cls)
    unknown = sorted(set(settings) - set(accepted))
    if unknown:
        raise TypeError(f"{cls.__name__} got unknown setting(s) {unknown}; it accepts {accepted}")
    return cls(**settings)
