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

import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
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
#: files that mark a folder as a run's (the first is written into every staged run; the others are the
#: reports of runs made before staging), so that a rerun may replace it
RUN_MARKERS = (".libnet-run", "report.json", "detectors.json")


def check_run_folder(final: str | os.PathLike) -> Path:
    """``final`` as an absolute path, after checking that a run may replace it (see :func:`staged_output`).

    Raises:
        NotADirectoryError: it is a file. PermissionError: its parent folder is not writable.
        ExperimentError: it is (or holds) the current folder, or it holds files that are not a run's.
    """
    final = Path(final).expanduser().absolute()
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"output folder {str(final)!r} exists and is not a folder")
    cwd = Path.cwd().absolute()
    if final == cwd or final in cwd.parents or final.parent == final:
        raise ExperimentError(f"output folder {str(final)!r} holds the current folder: a run replaces its output "
                              "folder as a whole, so give it a folder of its own (e.g. runs/mnist)")
    if final.is_dir() and any(final.iterdir()) and not any((final / m).exists() for m in RUN_MARKERS):
        raise ExperimentError(f"output folder {str(final)!r} holds files that are not an earlier run's; a run "
                              "replaces its output folder as a whole, so give it a new or empty folder")
    try:
        ensure_writable_dir(final.parent)
    except (NotADirectoryError, PermissionError) as exc:
        raise PermissionError(f"output folder {str(final)!r} is not writable: {exc}") from exc
    return final


@contextmanager
def staged_output(final: str | os.PathLike) -> Iterator[Path]:
    """Write a run into a fresh hidden folder beside ``final``; put it in place only when the block completes.

    ``final`` must be new, empty, or an earlier run's folder (it is replaced as a whole; a folder with other
    files, or the current folder, is refused with :class:`ExperimentError` before any work). A failed or
    interrupted run leaves ``final`` exactly as it was (an earlier complete report stays), and no empty
    folder: the staging folder ``.<name>.partial-*`` is removed on failure, and one left by a
    killed run is removed by a later run. On success the new folder replaces ``final`` in two renames.

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
        (stage / RUN_MARKERS[0]).write_text("a libnet-plugin run folder: the next run into it replaces it whole\n")
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(stage, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a run folder gets the usual permissions
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
        os.rmdir(old)
        os.replace(final, old)
        os.replace(stage, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, final)


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
