"""Atomic, pickle-free save/load: one safetensors file with the settings as JSON in its metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._validate import dtype_name
from .errors import SaveFormatError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save_atomic", "load_checked", "atomic_write_bytes"]

FORMAT_NAME = "libnet-plugin"
#: Bumped whenever a saved file's layout changes; a file of another version is refused with a clear error.
FORMAT_VERSION = 1


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A failure at any point leaves an earlier file at ``path`` intact. The parent folder must exist.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot save to {str(path)!r}: the folder {str(parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def _json_default(value: Any) -> Any:
    """JSON for the settings' non-JSON values: a ``torch.dtype`` is saved by name (``"bfloat16"``)."""
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    raise TypeError(f"a saved setting must be JSON-serialisable (numbers, strings, lists, dicts) or a torch.dtype, "
                    f"got {type(value).__name__}: {value!r}")


def save_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], kind: str, config: dict[str, Any]) -> Path:
    """Save ``tensors`` (safetensors) with ``config`` (JSON) and the format version, atomically."""
    from safetensors.torch import save

    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": json.dumps(config, sort_keys=True, default=_json_default),
    }
    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    return atomic_write_bytes(path, data)


def load_checked(path: str | os.PathLike, kind: str, map_location: Any = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_atomic`; check format, version and kind. Never unpickles."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers/truncation
        raise SaveFormatError(f"{str(path)!r} is not a readable libnet-plugin file (corrupted or truncated?): {exc}") from exc
    if metadata.get("format") != FORMAT_NAME:
        raise SaveFormatError(f"{str(path)!r} is a safetensors file but not one saved by libnet-plugin "
                              f"(format {metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise SaveFormatError(f"{str(path)!r} was saved with libnet-plugin file format version {version}, "
                              f"this version reads format version {FORMAT_VERSION}")
    if metadata.get("kind") != kind:
        raise SaveFormatError(f"{str(path)!r} holds a {metadata.get('kind')!r}, expected a {kind!r}")
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise SaveFormatError(f"{str(path)!r} has unreadable settings: {exc}") from exc
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, config
