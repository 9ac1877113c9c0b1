"""Collectives behind a fit across processes with ``torch.distributed`` (launched by ``torchrun``).

Inside an initialised process group of two or more ranks, :meth:`LibraryNetwork.fit
<libnet_plugin.LibraryNetwork.fit>` on every rank (each streaming its own shard) builds the libraries a
single process would build from the same batches taken in (step, rank) order: step 0 of rank 0, step 0
of rank 1, ..., step 1 of rank 0, ... At every step the ranks exchange how many inputs they hold (a rank
whose shard has run out sends none), then their batch's activations, in rank order, so that every rank
extends its libraries with the same rows in the same order; the libraries are identical on every rank,
and no broadcast of the libraries is needed. The Hebbian readouts (Eq. 2) are sums over the inputs: each
rank accumulates its own shard, then one all-reduce adds them up. The detectors fitted on training data
do the same (Mahalanobis: class sums all-reduced; deep k-NN: the activations all-gathered), and
:meth:`ConsistencyDetector.calibrate <libnet_plugin.ConsistencyDetector.calibrate>` all-gathers the clean
scores, so detectors too come out the same on every rank. ``thresholds="auto"`` replays the reservoir
sampling over all ranks' positions, so every rank draws the sample one process would draw. A rank that fails at a step tells the
others at the next exchange, and every rank raises :class:`DistributedFitError` naming it (set a
timeout on the process group for ranks that die without a word).

Only the rows that the current library does not already decide travel (:func:`undecided_rows`: a row with
a node at cosine clearly above theta is never stored by the sequential rule), with their positions; every
rank then runs the library's own rule on them, in rank order.

Example:
    >>> world() is None  # no process group in this interpreter
    True
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

from .errors import LibnetError

__all__ = ["STATS", "reset_stats", "node_cosines", "undecided_rows", "DECIDED_MARGIN", "DistributedFitError", "world", "exchange_sizes", "gather_rows", "all_reduce_sum", "gather_all",
           "sum_over_ranks", "DistributedScoringError", "all_gather_same"]


#: bytes sent and seconds spent in this process's collectives (for benchmarks; see :func:`reset_stats`)
STATS: dict[str, float] = {"bytes": 0.0, "seconds": 0.0, "calls": 0.0}


def reset_stats() -> None:
    """Zero :data:`STATS`."""
    STATS.update(bytes=0.0, seconds=0.0, calls=0.0)


def _timed(fn: Any, *args: Any, nbytes: int) -> None:
    t0 = time.perf_counter()
    fn(*args)
    STATS["seconds"] += time.perf_counter() - t0
    STATS["bytes"] += nbytes
    STATS["calls"] += 1


class DistributedFitError(LibnetError, RuntimeError):
    """A rank of a distributed fit failed; every rank raises this instead of waiting for it.

    Example:
        >>> import libnet_plugin as lnp
        >>> issubclass(lnp.DistributedFitError, lnp.LibnetError), issubclass(lnp.DistributedFitError, RuntimeError)
        (True, True)
    """


class DistributedScoringError(LibnetError, RuntimeError):
    """A rank of a node-sharded scoring call (:mod:`libnet_plugin.sharding`) failed, or the ranks were not
    called alike; every rank raises this instead of waiting for it."""


def world() -> tuple[Any, int, int] | None:
    """``(torch.distributed, rank, world size)`` inside an initialised group of two or more ranks, else ``None``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return dist, dist.get_rank(), dist.get_world_size()


def _wire_device(dist: Any, fallback: torch.device) -> torch.device:
    """Where collective tensors live: CUDA for NCCL, the CPU otherwise (gloo)."""
    return fallback if dist.get_backend() == "nccl" else torch.device("cpu")


def exchange_sizes(dist: Any, rank: int, size: int, n_local: int, error: str | None, device: torch.device,
                   extra: list[int] | None = None, *, stage: str = "the distributed fit",
                   error_type: type[Exception] = DistributedFitError) -> tuple[list[int], list[int]]:
    """All-gather each rank's number of inputs at this step (and ``extra`` integers, max over the ranks).

    Returns:
        ``(inputs per rank, extra maximised over the ranks)``.

    Raises:
        DistributedFitError: on every rank, when any rank reports an ``error`` (``error_type``, with
            ``stage`` naming what failed, when given).
    """
    extra = list(extra or [])
    local = torch.tensor([n_local, 1 if error else 0, *extra], dtype=torch.long, device=_wire_device(dist, device))
    parts = [torch.zeros_like(local) for _ in range(size)]
    _timed(dist.all_gather, parts, local, nbytes=local.numel() * local.element_size())
    failed = [r for r, p in enumerate(parts) if int(p[1])]
    if failed:
        mine = f": {error}" if error else ""
        raise error_type(f"rank(s) {failed} failed during {stage} (this is rank {rank}{mine}); every rank stops")
    stacked = torch.stack(parts)
    return [int(p[0]) for p in parts], [int(v) for v in stacked[:, 2:].amax(dim=0)] if extra else []


def gather_rows(dist: Any, rows: Tensor, sizes: list[int], width: int, dtype: torch.dtype,
                device: torch.device) -> Tensor:
    """All-gather the rows ``[n_r, width]`` of every rank, concatenated in rank order ``[sum n_r, width]``."""
    wire = _wire_device(dist, device)
    biggest = max(sizes)
    padded = torch.zeros(biggest, width, dtype=dtype, device=wire)
    if rows.shape[0]:
        padded[: rows.shape[0]] = rows.to(wire, dtype)
    parts = [torch.empty_like(padded) for _ in sizes]
    _timed(dist.all_gather, parts, padded, nbytes=padded.numel() * padded.element_size())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]).to(device)


def all_gather_same(dist: Any, tensor: Tensor, device: torch.device) -> list[Tensor]:
    """All-gather a tensor of the same shape and dtype on every rank; returns one per rank, in rank order,
    on ``device`` (counted in :data:`STATS`)."""
    wire = _wire_device(dist, device)
    local = tensor.detach().to(wire).contiguous()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    _timed(dist.all_gather, parts, local, nbytes=local.numel() * local.element_size())
    return [p.to(device) for p in parts]


def all_reduce_sum(dist: Any, tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The element-wise sums over the ranks of each tensor (same names and shapes on every rank)."""
    wire = _wire_device(dist, device)
    out = {}
    for name in sorted(tensors):
        t = tensors[name].detach().to(wire).clone()
        _timed(dist.all_reduce, t, nbytes=t.numel() * t.element_size())
        out[name] = t.to(tensors[name].device)
    return out


def gather_all(rows: Tensor, device: torch.device, what: str) -> Tensor:
    """``rows`` ``[n, ...]`` of every rank concatenated in rank order (itself outside a process group).

    Every rank must have at least one row: a rank without any raises :class:`DistributedFitError` on all.
    """
    group = world()
    if group is None:
        return rows
    dist, rank, size = group
    error = None if rows.shape[0] else f"rank {rank} has no {what}"
    trailing = list(rows.shape[1:])
    if len(trailing) > 3:
        raise ValueError(f"gather_all takes rows of at most 3 trailing dimensions, got {list(rows.shape)}")
    # a fixed-length description, so that a rank without rows (which then fails on all) sends the same shape
    sizes, _ = exchange_sizes(dist, rank, size, int(rows.shape[0]), error, device,
                              [len(trailing), *trailing, *[0] * (3 - len(trailing))])
    flat = rows.reshape(rows.shape[0], -1)
    width = int(flat.shape[1])
    return gather_rows(dist, flat, sizes, width, rows.dtype, device).reshape(sum(sizes), *trailing)


def sum_over_ranks(tensors: dict[str, Tensor], n_local: int, device: torch.device, what: str) -> tuple[dict[str, Tensor], int]:
    """The sums over the ranks of ``tensors`` and of ``n_local`` (themselves outside a process group)."""
    group = world()
    if group is None:
        return tensors, n_local
    dist, rank, size = group
    sizes, _ = exchange_sizes(dist, rank, size, n_local, None if n_local else f"rank {rank} has no {what}", device)
    return all_reduce_sum(dist, tensors, device), sum(sizes)


#: a row counts as decided only when its best cosine clears the threshold by this much, so that a
#: borderline row is always left to the library's own (exact) rule
DECIDED_MARGIN = 1e-4


def node_cosines(library: Any, haps: Tensor) -> Tensor | None:
    """float32 cosines ``[B, M]`` of the rows of ``haps`` to every node of ``library`` (in its own space),
    ``None`` for an empty library or one that does not expose its nodes."""
    from .library import NodeLibrary

    if not isinstance(library, NodeLibrary) or library.size == 0:
        return None
    nodes = library.nodes
    return library.transform(haps).to(nodes.device, torch.float32) @ nodes.float().T


def undecided_rows(library: Any, haps: Tensor, cos: Tensor | None = None) -> Tensor:
    """Positions ``LongTensor[k]`` of the rows of ``haps`` that ``library`` does not already decide.

    A row is decided when some node of the library is at cosine ``>= threshold + DECIDED_MARGIN`` (float32,
    in the library's own space): the leader rule never stores it, whatever comes before it. Libraries
    that do not expose their nodes keep every row. ``cos``: the rows' :func:`node_cosines`, when computed
    already.
    """
    every = torch.arange(haps.shape[0], device=haps.device)
    if haps.shape[0] == 0:
        return every
    cos = node_cosines(library, haps) if cos is None else cos
    if cos is None:
        return every
    best = cos.amax(dim=1)
    return every[(best < float(library.threshold) + DECIDED_MARGIN).to(every.device)]
