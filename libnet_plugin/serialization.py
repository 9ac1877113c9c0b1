"""Atomic, pickle-free save/load: one safetensors file with the settings as JSON in its metadata."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._validate import dtype_name
from .errors import SaveFormatError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "save_atomic", "load_checked", "atomic_write_bytes", "current_umask"]

FORMAT_NAME = "libnet-plugin"
#: Bumped whenever a saved file's layout changes; a file of another version is refused with a clear error.
FORMAT_VERSION = 1


_UMASK_LOCK = threading.Lock()
#: a temp file of an interrupted save older than this many seconds is removed by the next save of that file
STALE_TEMP_SECONDS = 600


def current_umask() -> int:
    """The process's umask (read by setting it, under a lock)."""
    with _UMASK_LOCK:  # os.umask can only be read by setting it
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _clean_stale_temps(parent: Path, name: str) -> None:
    now = time.time()
    for stale in parent.glob(f".{name}.*.tmp"):
        try:
            if now - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                stale.unlink()
        except OSError:
            pass  # another process's file, or already gone


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder and ``os.replace``.

    A failure at any point leaves an earlier file at ``path`` intact. The parent folder must exist. The
    file gets the permissions any other writer would give it (``0o666`` less the umask). Saving onto a
    symbolic link writes through to the link's target (the link stays). The temp file is hidden
    (``.<name>.<random>.tmp``); one left by an interrupted save is removed by a later save of that file.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot save to {str(path)!r}: the folder {str(parent)!r} does not exist")
    _clean_stale_temps(parent, path.name)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
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


def _tensor_digest(t: Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256(f"{dtype_name(t.dtype) if t.is_floating_point() else t.dtype}|{list(t.shape)}|".encode())
    flat = t.detach().contiguous().cpu().reshape(-1)
    h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return h.hexdigest()


def _digests(kind: str, config_json: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The digests a file carries: of its kind and settings, and of each tensor."""
    return {"algorithm": "sha256", "settings": hashlib.sha256(f"{kind}|{config_json}".encode()).hexdigest(),
            "tensors": {k: _tensor_digest(v) for k, v in sorted(tensors.items())}}


def save_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], kind: str, config: dict[str, Any]) -> Path:
    """Save ``tensors`` (safetensors) with ``config`` (JSON) and the format version, atomically.

    The file also carries SHA-256 digests of its settings and of every tensor (dtype, shape, bytes), which
    :func:`load_checked` verifies: a file modified or corrupted after it was written is refused.
    """
    from safetensors.torch import save

    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config_json = json.dumps(config, sort_keys=True, default=_json_default)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": config_json,
        "digests": json.dumps(_digests(kind, config_json, cpu), sort_keys=True),
    }
    data = save(cpu, metadata=metadata)
    return atomic_write_bytes(path, data)


def _check_digests(path: Path, kind: str, metadata: dict[str, str], tensors: dict[str, Tensor]) -> None:
    if "digests" not in metadata:
        warnings.warn(f"{str(path)!r} carries no digests (it was written by libnet-plugin 0.1.0 before digests "
                      "existed), so changes to it cannot be detected; load and save it again to add them",
                      UserWarning, stacklevel=3)
        return
    where = f"{str(path)!r} was modified or corrupted after it was saved"
    try:
        saved = json.loads(metadata["digests"])
        want = _digests(kind, metadata["config"], tensors)
        if saved.get("algorithm") != "sha256":
            raise SaveFormatError(f"{where}: unknown digest algorithm {saved.get('algorithm')!r}")
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise SaveFormatError(f"{where}: its digests are unreadable ({exc})") from exc
    if saved.get("settings") != want["settings"]:
        raise SaveFormatError(f"{where}: its settings (or kind) differ from those it was saved with")
    got = saved.get("tensors")
    if not isinstance(got, dict) or set(got) != set(want["tensors"]):
        names = sorted(set(got or {}) ^ set(want["tensors"]))
        raise SaveFormatError(f"{where}: tensors were added or removed ({names[:5]})")
    changed = [k for k, d in want["tensors"].items() if got[k] != d]
    if changed:
        raise SaveFormatError(f"{where}: the data, dtype or shape of the tensor(s) {changed[:5]} changed")


def load_checked(path: str | os.PathLike, kind: str, map_location: Any = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_atomic`; check format, version, kind and digests. Never unpickles.

    Raises:
        SaveFormatError: the file is not a libnet-plugin file, of another format version or kind, or was
            modified or corrupted after it was saved (a digest differs; the message says what).
    """
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
    if "config" not in metadata:
        raise SaveFormatError(f"{str(path)!r} has no settings")
    _check_digests(path, kind, metadata, tensors)
    try:
        config = json.loads(metadata["config"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise SaveFormatError(f"{str(path)!r} has unreadable settings: {exc}") from exc
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, config
