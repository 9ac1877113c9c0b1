"""What every experiment needs around its numbers: stage timers, devices, atomic reports, the environment.

:class:`StageTimer` times the stages; :func:`write_json_atomic` / :func:`write_text_atomic` write a
report so that an interrupted run never leaves a half-written file; :func:`markdown_table` and
:func:`to_jsonable` render it; :func:`environment_info` records what it ran on.

Example:
    >>> print(markdown_table(["layer", "nodes"], [["conv1", 647], ["fc2", 77]]))
    | layer | nodes |
    |---|---|
    | conv1 | 647 |
    | fc2 | 77 |
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import LibnetError
from ..serialization import atomic_write_bytes, current_umask

__all__ = ['StageTimer', 'resolve_device', 'ensure_writable_dir', 'to_jsonable', 'write_json_atomic', 'write_text_atomic', 'markdown_table', 'environment_info', 'ExperimentError']


class StageTimer:
    """Wall time of the named stages of an experiment.

    Args:
        log: where to print one line per finished stage (``None``: silent).

    Example:
        >>> timer = StageTimer(log=None)
        >>> with timer.stage("load"):
        ...     pass
        >>> list(timer.seconds)
        ['load']
    """

    def __init__(self, log: Callable[[str], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.log = log
        self._start = time.perf_counter()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (times add up when a name is used twice)."""
        if self.log:
            self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + dt
            if self.log:
                self.log(f"[{name}] done in {dt:.1f} s")

    @property
    def total(self) -> float:
        """Seconds since the timer was created."""
        return time.perf_counter() - self._start

    def as_dict(self) -> dict[str, float]:
        """``{stage: seconds}`` plus ``"total"``, rounded to 0.01 s."""
        out = {k: round(v, 2) for k, v in self.seconds.items()}
        out["total"] = round(self.total, 2)
        return out

def resolve_device(spec: str) -> tuple[torch.device, str | None]:
    """Turn ``--device`` into a ``torch.device``, refusing a GPU that is not there.

    Args:
        spec: ``"auto"`` (CUDA when available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Returns:
        ``(device, warning)``: ``warning`` is a message to show when ``"auto"`` fell back to the CPU,
        else ``None``.

    Raises:
        ExperimentError: (a ``ValueError``) for an unknown device, ``cuda`` without a usable GPU, or a
            GPU index that does not exist.

    Example:
        >>> resolve_device("cpu")
        (device(type='cpu'), None)
    """
    text = str(spec).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), None
        return torch.device("cpu"), ("--device auto found no CUDA GPU (torch "
                                     f"{torch.__version__}); running on the CPU, which is slow for the full "
                                     "experiment (use --quick, or a GPU machine)")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ExperimentError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device, None
    if device.type != "cuda":
        raise ExperimentError(f"--device {spec!r} is not supported here; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = f"built with CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ExperimentError(f"--device {spec} was requested but no CUDA GPU is available (torch "
                              f"{torch.__version__}, {build}); use --device cpu, or --device auto to fall back "
                              "to the CPU with a warning")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ExperimentError(f"--device {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                              f"device(s), numbered 0..{count - 1}")
    return device, None

def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that a file can be written there; return it.

    Raises:
        NotADirectoryError: ``path`` exists and is not a folder.
        PermissionError: the folder cannot be created or written to (the message names it).
    """
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(f"output folder {str(p)!r} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".write-test-", delete=True):
            pass
    except OSError as exc:
        raise PermissionError(f"output folder {str(p)!r} is not writable: {exc.strerror or exc}") from exc
    return p

#: a staging folder of an interrupted run older than this many seconds is removed by the next run
STALE_STAGE_SECONDS = 6 * 3600
#: the manifest every run writes into its folder: the name, size and SHA-256 of each file it wrote
RUN_MANIFEST = ".libnet-run"
_MANIFEST_FORMAT = "libnet-plugin run manifest"
_MANIFEST_MAX_BYTES = 16 << 20
_NAMED_AT_MOST = 10


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_run_manifest(folder: str | os.PathLike) -> Path:
    """Write :data:`RUN_MANIFEST` into ``folder``: every file and folder under it, with sizes and SHA-256.

    A later run may replace ``folder`` only when everything in it is listed there, unchanged (see
    :func:`foreign_entries`). Links and other special files are not listed (a run writes none).

    Example:
        >>> import tempfile
        >>> run = Path(tempfile.mkdtemp())
        >>> _ = (run / "report.json").write_text("{}")
        >>> _ = write_run_manifest(run)
        >>> foreign_entries(run)
        (True, [])
        >>> _ = (run / "thesis.tex").write_text("mine")
        >>> foreign_entries(run)
        (True, ['thesis.tex'])
    """
    root = Path(folder)
    files: dict[str, dict[str, Any]] = {}
    folders: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):  # links to folders are not followed
        here = Path(dirpath)
        for d in sorted(dirnames):
            if not (here / d).is_symlink():
                folders.append((here / d).relative_to(root).as_posix())
        for f in sorted(filenames):
            p = here / f
            rel = p.relative_to(root).as_posix()
            if rel == RUN_MANIFEST or p.is_symlink() or not p.is_file():
                continue
            files[rel] = {"size": p.stat().st_size, "sha256": _sha256(p)}
    manifest = {"format": _MANIFEST_FORMAT, "version": 1,
                "about": "the files a libnet-plugin run wrote here; a later run replaces this folder only when it "
                         "holds nothing else, unchanged", "files": files, "folders": folders}
    return atomic_write_bytes(root / RUN_MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _read_manifest(folder: Path) -> tuple[dict[str, tuple[int, str]], set[str]] | None:
    """``({file: (size, sha256)}, {folder})`` of the folder's run manifest; ``None`` when there is no valid one."""
    path = folder / RUN_MANIFEST
    try:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > _MANIFEST_MAX_BYTES:
            return None
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if (not isinstance(data, dict) or data.get("format") != _MANIFEST_FORMAT or data.get("version") != 1
            or not isinstance(data.get("files"), dict) or not isinstance(data.get("folders"), list)):
        return None
    files: dict[str, tuple[int, str]] = {}
    for name, entry in data["files"].items():
        if not isinstance(entry, dict) or not _plain_relative(name):
            return None
        size, digest = entry.get("size"), entry.get("sha256")
        if (isinstance(size, bool) or not isinstance(size, int) or size < 0 or not isinstance(digest, str)
                or len(digest) != 64):
            return None
        files[name] = (size, digest)
    if not all(isinstance(d, str) and _plain_relative(d) for d in data["folders"]):
        return None
    return files, set(data["folders"])


def _plain_relative(name: str) -> bool:
    """Whether ``name`` is a relative path of plain parts (no ``..``, ``.``, empty part or leading ``/``)."""
    parts = name.split("/")
    return bool(name) and all(part not in ("", ".", "..") for part in parts) and "\\" not in name


def foreign_entries(folder: str | os.PathLike) -> tuple[bool, list[str]]:
    """What in ``folder`` a run did not write: ``(has_manifest, names)``, relative paths (at most 11).

    A name is foreign when the folder's :data:`RUN_MANIFEST` does not list it, or lists it with another
    size or SHA-256 (changed since the run wrote it); links and special files are always foreign, and so is
    everything in a folder without a valid manifest (an empty ``report.json`` proves nothing). A folder
    that does not exist or is empty has nothing foreign. Links are never followed.
    """
    root = Path(folder)
    if not root.is_dir():
        return False, []
    manifest = _read_manifest(root)
    if manifest is None:
        names = []
        with os.scandir(root) as it:
            for entry in it:
                names.append(entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""))
                if len(names) > _NAMED_AT_MOST:
                    break
        return False, sorted(names)
    files, folders = manifest
    foreign: list[str] = []
    pending = [root]
    while pending and len(foreign) <= _NAMED_AT_MOST:
        here = pending.pop()
        with os.scandir(here) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = Path(entry.path).relative_to(root).as_posix()
            if rel == RUN_MANIFEST:
                continue
            if entry.is_symlink():
                foreign.append(f"{rel} (a link)")
            elif entry.is_dir(follow_symlinks=False):
                if rel in folders:
                    pending.append(Path(entry.path))
                else:
                    foreign.append(rel + "/")
            elif not entry.is_file(follow_symlinks=False) or rel not in files:
                foreign.append(rel)
            elif (entry.stat(follow_symlinks=False).st_size != files[rel][0]
                  or _sha256(Path(entry.path)) != files[rel][1]):
                foreign.append(f"{rel} (changed since the run wrote it)")
    return True, sorted(foreign)


def _named(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_NAMED_AT_MOST])
    return shown + (" and more" if len(names) > _NAMED_AT_MOST else "")


def _resolve_out(final: str | os.PathLike) -> Path:
    """``final`` with ``~``, ``..`` and links resolved: a link given as the folder resolves to its target."""
    try:
        return Path(final).expanduser().resolve()
    except (OSError, RuntimeError) as exc:  # a loop of links
        raise ExperimentError(f"output folder {str(final)!r} cannot be resolved: {exc}") from exc


def check_run_folder(final: str | os.PathLike) -> Path:
    """``final`` resolved (``..`` and links), after checking that a run may replace it (see :func:`staged_output`).

    A run may replace a folder that does not exist, is empty, or holds only files an earlier run wrote,
    unchanged: each listed in its :data:`RUN_MANIFEST` with its size and SHA-256. A folder without a
    manifest (one an older version made included) is refused when it holds anything. An ``--out`` that is
    a link keeps its link: the returned path is the target, where the run is written.

    Raises:
        NotADirectoryError: it is a file. PermissionError: its parent folder is not writable.
        ExperimentError: it is (or holds) the current folder, or it holds files that are not a run's (the
            message names them).
    """
    given = final
    final = _resolve_out(final)
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"output folder {str(given)!r} exists and is not a folder")
    cwd = Path.cwd().resolve()
    if final == cwd or final in cwd.parents or final.parent == final:
        where = "" if str(final) == str(given) else f" (that is {str(final)!r})"
        raise ExperimentError(f"output folder {str(given)!r}{where} holds the current folder: a run replaces its "
                              "output folder as a whole, so give it a folder of its own (e.g. runs/mnist)")
    has_manifest, foreign = foreign_entries(final)
    if foreign:
        where = "" if str(final) == str(given) else f" (that is {str(final)!r})"
        why = ("" if has_manifest else f"; it has no run manifest ({RUN_MANIFEST}) to show that a run wrote them "
               "(a run folder made by a version before manifests has none either: move or delete it yourself)")
        raise ExperimentError(f"output folder {str(given)!r}{where} holds files that are not an earlier run's: "
                              f"{_named(foreign)}{why}. A run replaces its output folder as a whole, so it refuses "
                              "one that holds anything else; give a new or empty folder, or move those files away")
    try:
        ensure_writable_dir(final.parent)
    except (NotADirectoryError, PermissionError) as exc:
        raise PermissionError(f"output folder {str(given)!r} is not writable: {exc}") from exc
    return final


@contextmanager
def staged_output(final: str | os.PathLike) -> Iterator[Path]:
    """Write a run into a fresh hidden folder beside ``final``; put it in place only when the block completes.

    ``final`` must be new, empty, or an earlier run's folder holding only the files that run wrote (see
    :func:`check_run_folder`; anything else, or the current folder, is refused with
    :class:`ExperimentError` before any work). A failed or interrupted run leaves ``final`` exactly as it
    was (an earlier complete report stays), and no empty folder: the staging folder ``.<name>.partial-*``
    is removed on failure, and one left by a killed run is removed by a later run. On success the run's
    :data:`RUN_MANIFEST` is written, ``final`` is checked again and the new folder replaces it in two
    renames; of the earlier folder only the files its manifest lists are deleted. When ``final`` was given
    files of someone else's during the run, the new run is kept beside it as ``<name>.new-*`` instead and
    :class:`ExperimentError` says so.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> with staged_output(root / "run") as stage:
        ...     _ = (stage / "report.json").write_text("{}")
        >>> sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "run").iterdir())
        (['run'], ['.libnet-run', 'report.json'])
    """
    final = check_run_folder(final)
    parent = final.parent
    now = time.time()
    for stale in parent.glob(f".{final.name}.partial-*"):
        try:
            if now - stale.stat().st_mtime > STALE_STAGE_SECONDS:
                shutil.rmtree(stale)
        except OSError:
            pass
    stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=parent))
    try:
        yield stage
        write_run_manifest(stage)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a run folder gets the usual permissions
    _swap_in(stage, final)


def _swap_in(stage: Path, final: Path) -> None:
    """Put the complete run ``stage`` at ``final``, deleting of an earlier run there only what its manifest lists."""
    if not final.exists():
        os.replace(stage, final)
        return
    _, foreign = foreign_entries(final)
    if foreign:  # files were put there during the run: keep both
        kept = Path(tempfile.mkdtemp(prefix=f"{final.name}.new-", dir=final.parent))
        os.replace(stage, kept)
        raise ExperimentError(f"output folder {str(final)!r} was given files that are not a run's while the run was "
                              f"going on ({_named(foreign)}); it is left as it is, and the complete run is in "
                              f"{str(kept)!r}")
    old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.rmdir(old)
    os.replace(final, old)
    os.replace(stage, final)
    _remove_run(old)


def _remove_run(folder: Path) -> None:
    """Delete the files ``folder``'s manifest lists (unchanged), then its empty folders; warn of anything left."""
    manifest = _read_manifest(folder)
    files, folders = manifest if manifest is not None else ({}, set())
    for rel, (size, digest) in files.items():
        p = folder / rel
        try:
            if (not p.is_symlink() and p.is_file() and folder in p.resolve().parents
                    and p.stat().st_size == size and _sha256(p) == digest):
                p.unlink()
        except OSError:
            pass
    if manifest is not None:
        (folder / RUN_MANIFEST).unlink(missing_ok=True)
    for rel in sorted(folders, key=lambda r: -r.count("/")):
        try:
            (folder / rel).rmdir()
        except OSError:
            pass
    try:
        folder.rmdir()
    except OSError:
        warnings.warn(f"the earlier run folder was replaced, but files that run did not write appeared in it; they "
                      f"are kept in {str(folder)!r}", RuntimeWarning, stacklevel=3)


def relocate(obj: Any, old: str | os.PathLike, new: str | os.PathLike) -> Any:
    """``obj`` (JSON types) with every string that names a path under ``old`` moved under ``new``."""
    a, b = str(old), str(new)
    if isinstance(obj, str):
        return b + obj[len(a):] if obj == a or obj.startswith(a + os.sep) else obj
    if isinstance(obj, dict):
        return {k: relocate(v, old, new) for k, v in obj.items()}
    if isinstance(obj, list):
        return [relocate(v, old, new) for v in obj]
    return obj


def to_jsonable(obj: Any) -> Any:
    """Turn tensors, numpy values, paths and tuples into JSON types; NaN and infinity become ``None``.

    Example:
        >>> to_jsonable({"a": torch.tensor([1.5, float("nan")]), 0.5: (1, 2)})
        {'a': [1.5, None], '0.5': [1, 2]}
    """
    if isinstance(obj, Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, Mapping):
        return {(k if isinstance(k, str) else f"{k:g}" if isinstance(k, float) else str(k)): to_jsonable(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"cannot turn a {type(obj).__name__} into JSON")

def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` (through :func:`to_jsonable`) as indented JSON, atomically (temp file + replace)."""
    text = json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    return atomic_write_bytes(path, text.encode("utf-8"))

def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 text atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))

def _fmt(v: Any, floatfmt: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    if isinstance(v, float):
        return format(v, floatfmt)
    return str(v)

def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], floatfmt: str = ".3f") -> str:
    """A GitHub-flavoured markdown table; floats formatted with ``floatfmt``, NaN/None as ``n/a``.

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 0.5], ["x", None]]))
        | a | b |
        |---|---|
        | 1 | 0.500 |
        | x | n/a |
    """
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        if len(r) != len(headers):
            raise ValueError(f"a row has {len(r)} cells, the table has {len(headers)} columns")
        lines.append("| " + " | ".join(_fmt(v, floatfmt) for v in r) + " |")
    return "\n".join(lines)

def environment_info() -> dict[str, Any]:
    """Versions and machine facts for a report: Python, torch, numpy, scikit-learn, advertorch, CPUs."""
    from importlib import metadata

    from .._version import __version__

    versions = {"python": sys.version.split()[0], "libnet_plugin": __version__, "torch": torch.__version__,
                "numpy": np.__version__}
    for dist in ("scikit-learn", "advertorch", "matplotlib", "onnxruntime", "mlxtend", "safetensors"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"versions": versions, "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


class ExperimentError(LibnetError, ValueError):
    """A bad setting or input found before an experiment starts its long computations."""
