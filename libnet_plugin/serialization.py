"""Atomic, pickle-free save/load: one safetensors file with the settings as JSON in its metadata."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import os
import re
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ._validate import dtype_name
from .errors import SaveFormatError, SaveIntegrityError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SIGNATURE_ALGORITHM", "save_atomic", "load_checked", "atomic_write_bytes",
           "current_umask", "parse_json", "file_digests"]

FORMAT_NAME = "libnet-plugin"
#: Bumped whenever a saved file's layout changes; a file of another version is refused with a clear error.
FORMAT_VERSION = 1
#: How a file saved with ``key=`` is signed: an HMAC-SHA256 over its whole header but the signature.
SIGNATURE_ALGORITHM = "hmac-sha256"
#: Deepest nesting of ``[`` / ``{`` accepted in a saved file's JSON metadata (the settings need fewer than 10).
MAX_JSON_DEPTH = 64


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


def file_digests(kind: str, config_json: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The digests a saved file carries in its ``"digests"`` metadata: SHA-256 of its kind and settings
    (``config_json``, the ``"config"`` metadata as written), and of each tensor. :func:`load_checked`
    refuses a file whose digests do not match; a tool that rewrites a file's settings or tensors (or a
    test that builds a malformed file) recomputes them with this function."""
    return {"algorithm": "sha256", "settings": hashlib.sha256(f"{kind}|{config_json}".encode()).hexdigest(),
            "tensors": {k: _tensor_digest(v) for k, v in sorted(tensors.items())}}


def _key_bytes(key: Any) -> bytes:
    """The HMAC key as bytes: ``bytes`` as given, ``str`` encoded as UTF-8; never empty."""
    if isinstance(key, str):
        key = key.encode("utf-8")
    elif isinstance(key, (bytes, bytearray, memoryview)):
        key = bytes(key)
    else:
        raise TypeError(f"key must be bytes or str (for example os.environ['LIBNET_KEY']), got {type(key).__name__}")
    if not key:
        raise ValueError("key must not be empty: an empty key signs nothing")
    return key


def _signature(metadata: dict[str, str], key: bytes) -> str:
    """HMAC-SHA256 (hex) of every metadata entry but the signature: format, version, kind, settings and digests.

    The digests hold the SHA-256 of every tensor (dtype, shape, bytes) and of the kind and settings, so
    the signature covers the whole file; the tensors themselves are checked against their digests.
    """
    body = json.dumps({k: v for k, v in metadata.items() if k != "signature"}, sort_keys=True)
    return hmac.new(key, body.encode("utf-8"), hashlib.sha256).hexdigest()


# linear-time passes (no backtracking): escapes out, then strings out, then everything but brackets out
_JSON_ESCAPE = re.compile(r"\\.", re.S)
_JSON_STRING = re.compile(r'"[^"]*"')
_JSON_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_JSON_DEPTH = {"[": 1, "{": 1, "]": -1, "}": -1}


def parse_json(text: Any, what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` of a saved file's metadata entry, refusing (:class:`SaveFormatError`) text that is not
    a string, not JSON, or nested deeper than ``max_depth`` (checked before parsing, so a file of 200,000
    nested brackets costs one scan, never a RecursionError).

    Example:
        >>> parse_json('{"a": [1, 2]}', "the settings")
        {'a': [1, 2]}
        >>> parse_json("[" * 100 + "]" * 100, "the digests")
        Traceback (most recent call last):
        ...
        libnet_plugin.errors.SaveFormatError: the digests are nested deeper than 64 levels (modified or corrupted)
    """
    if not isinstance(text, str):
        raise SaveFormatError(f"{what} are not text (got {type(text).__name__})")
    brackets = _JSON_NOT_BRACKET.sub("", _JSON_STRING.sub("", _JSON_ESCAPE.sub("", text)))
    if brackets and max(itertools.accumulate(map(_JSON_DEPTH.__getitem__, brackets))) > max_depth:
        raise SaveFormatError(f"{what} are nested deeper than {max_depth} levels (modified or corrupted)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise SaveFormatError(f"{what} are not readable JSON ({exc})") from exc


def save_atomic(path: str | os.PathLike, tensors: dict[str, Tensor], kind: str, config: dict[str, Any], *,
                key: bytes | str | None = None) -> Path:
    """Save ``tensors`` (safetensors) with ``config`` (JSON) and the format version, atomically.

    The file also carries SHA-256 digests of its settings and of every tensor (dtype, shape, bytes), which
    :func:`load_checked` verifies: a file corrupted, truncated or accidentally changed after it was written
    is refused. Whoever can write the file can recompute those digests, though; with ``key`` (bytes or a
    str) the file is also signed (HMAC-SHA256 over its header, digests included), and
    ``load_checked(..., key=key)`` refuses any file that was edited without the key.
    """
    from safetensors.torch import save

    secret = None if key is None else _key_bytes(key)
    cpu = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    config_json = json.dumps(config, sort_keys=True, default=_json_default)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "kind": kind,
        "config": config_json,
        "digests": json.dumps(file_digests(kind, config_json, cpu), sort_keys=True),
    }
    if secret is not None:
        metadata["signature"] = json.dumps({"algorithm": SIGNATURE_ALGORITHM, "value": _signature(metadata, secret)},
                                           sort_keys=True)
    data = save(cpu, metadata=metadata)
    return atomic_write_bytes(path, data)


def _check_digests(path: Path, kind: str, metadata: dict[str, str], tensors: dict[str, Tensor]) -> None:
    if "digests" not in metadata:
        warnings.warn(f"{str(path)!r} carries no digests (it was written by libnet-plugin 0.1.0 before digests "
                      "existed), so changes to it cannot be detected; load and save it again to add them",
                      UserWarning, stacklevel=3)
        return
    where = f"{str(path)!r} was modified or corrupted after it was saved"
    saved = parse_json(metadata["digests"], f"the digests of {str(path)!r}", max_depth=2)
    if not isinstance(saved, dict):
        raise SaveFormatError(f"{where}: its digests are not a JSON object")
    if saved.get("algorithm") != "sha256":
        raise SaveFormatError(f"{where}: unknown digest algorithm {saved.get('algorithm')!r}")
    want = file_digests(kind, metadata["config"], tensors)
    if saved.get("settings") != want["settings"]:
        raise SaveFormatError(f"{where}: its settings (or kind) differ from those it was saved with")
    got = saved.get("tensors")
    if not isinstance(got, dict) or set(got) != set(want["tensors"]):
        names = sorted(set(got if isinstance(got, dict) else {}) ^ set(want["tensors"]))
        raise SaveFormatError(f"{where}: tensors were added or removed ({names[:5]})")
    changed = [k for k, d in want["tensors"].items() if got[k] != d]
    if changed:
        raise SaveFormatError(f"{where}: the data, dtype or shape of the tensor(s) {changed[:5]} changed")


def _check_signature(path: Path, metadata: dict[str, str], key: bytes) -> None:
    """Refuse (:class:`SaveIntegrityError`) a file that is unsigned, or whose signature ``key`` does not verify."""
    if "signature" not in metadata:
        raise SaveIntegrityError(f"{str(path)!r} is not signed, but a key was given: it was saved without key= (or "
                                 "its signature was removed); refusing it. Save it again with key=... to sign it")
    sig = parse_json(metadata["signature"], f"the signature of {str(path)!r}", max_depth=1)
    if not isinstance(sig, dict) or sig.get("algorithm") != SIGNATURE_ALGORITHM or not isinstance(sig.get("value"), str):
        raise SaveIntegrityError(f"{str(path)!r} carries a signature this version cannot check (expected "
                                 f"{SIGNATURE_ALGORITHM!r}); refusing it")
    if "digests" not in metadata:
        raise SaveIntegrityError(f"{str(path)!r} is signed but carries no digests; refusing it")
    if not hmac.compare_digest(sig["value"], _signature(metadata, key)):
        raise SaveIntegrityError(f"{str(path)!r} does not verify with the key given: it was edited after it was "
                                 "signed, or signed with another key; refusing it")


def load_checked(path: str | os.PathLike, kind: str, map_location: Any = None, *,
                 key: bytes | str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a file written by :func:`save_atomic`; check format, version, kind and digests. Never unpickles.

    With ``key`` the file must carry a signature made with that key (``save_atomic(..., key=key)``): an
    unsigned file, or one edited after it was signed (even with its digests recomputed), is refused. A
    signed file loaded without a key is checked against its digests only.

    Returns:
        ``(tensors, settings)``, the settings a JSON object (``dict``).

    Raises:
        SaveFormatError: the file is not a libnet-plugin file, of another format version or kind, or was
            modified or corrupted after it was saved (a digest differs; the message says what), or its
            metadata are malformed.
        SaveIntegrityError: (a ``SaveFormatError``) ``key`` was given and the file is unsigned or does not
            verify with it.
    """
    from safetensors import safe_open

    secret = None if key is None else _key_bytes(key)
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
    if secret is not None:
        _check_signature(path, metadata, secret)
    _check_digests(path, kind, metadata, tensors)
    config = parse_json(metadata["config"], f"the settings of {str(path)!r}")
    if not isinstance(config, dict):
        raise SaveFormatError(f"the settings of {str(path)!r} are a JSON {type(config).__name__}, expected an object")
    if map_location is not None:
        tensors = {k: v.to(map_location) for k, v in tensors.items()}
    return tensors, config
