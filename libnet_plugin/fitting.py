"""The fit engine: runs the training data through the model and fills the libraries and readouts.

:meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>` calls :func:`fit_network`, which picks the
budget for keeping the HAPs (:func:`default_cache_bytes`) and the thresholds (``"auto"``: from the first
batches of pass 1, :func:`_hold_first_batches`), and runs :func:`stream_fit`:

- pass 1 (:class:`_FirstPass`) runs the model (through the probe, :mod:`libnet_plugin.probe`) over the data
  once and feeds every batch of HAPs, in order, to the libraries (:mod:`libnet_plugin.library`), each
  observed by its Hebbian pair pass (:mod:`libnet_plugin.hebbian_pass`), keeping the HAPs while they fit the
  budget;
- pass 2 (:func:`_second_pass`) accumulates the readouts (:mod:`libnet_plugin.readout`) from the kept HAPs,
  and from the model run again on the inputs after them;
- inside a ``torch.distributed`` process group, :func:`_stream_fit_distributed` does both passes on every
  rank's shard with the collectives of :mod:`libnet_plugin.distributed`.

docs/design.md ("How a fit flows") follows one batch through these steps.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ._batches import is_one_shot, iter_batches, known_rows, n_rows, per_input_shape, progress_bar
from ._validate import check_int
from .errors import ShapeMismatchError
from .hebbian_pass import HebbianPairPass, dense_pass_reason
from .library import validate_threshold
from .probe import ProbeResult
from .thresholds import DEFAULT_SAMPLE_SIZE

__all__ = ["stream_fit", "StreamFit", "default_cache_bytes", "fit_network", "NetworkFit", "CACHE_SHARE",
           "CACHE_FALLBACK_BYTES", "resolve_thresholds",
           "check_cache_bytes", "check_cache_dtype", "CACHE_DTYPES"]

log = logging.getLogger(__name__)

#: ``cache_bytes="auto"``: this share of the memory available when ``fit`` starts (host memory, or the free
#: memory of the CUDA device the HAPs live on)
CACHE_SHARE = 0.25
#: ``cache_bytes="auto"`` where the available memory cannot be read (no ``/proc/meminfo`` nor ``sysconf``)
CACHE_FALLBACK_BYTES = 1 << 30


def _available_host_memory() -> int | None:
    """Bytes of host memory available now: ``MemAvailable`` of ``/proc/meminfo`` (Linux), else the free
    physical pages by ``os.sysconf``; ``None`` when neither can be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return int(pages) * int(size) if pages > 0 and size > 0 else None
    except (AttributeError, ValueError, OSError):
        return None


def default_cache_bytes(device: Any = "cpu") -> tuple[int, str]:
    """The budget ``cache_bytes="auto"`` stands for, and where it comes from (for the log).

    :data:`CACHE_SHARE` (a quarter) of the memory available now where the HAPs live: the free memory of a
    CUDA device, else the host's available memory (``/proc/meminfo``, else ``os.sysconf``); a fixed
    :data:`CACHE_FALLBACK_BYTES` (1 GiB) where it cannot be read.

    Example:
        >>> budget, source = default_cache_bytes("cpu")
        >>> budget > 0
        True
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(CACHE_SHARE * free), f"{CACHE_SHARE:g} of the {free / 2**30:.1f} GiB free on {device}"
        except (RuntimeError, AssertionError):
            pass
    available = _available_host_memory()
    if available is None:
        return CACHE_FALLBACK_BYTES, "the fixed default (the available memory could not be read)"
    return int(CACHE_SHARE * available), f"{CACHE_SHARE:g} of the {available / 2**30:.1f} GiB of memory available"


def _hap_bytes(haps: Mapping[str, Tensor]) -> int:
    return sum(h.numel() * h.element_size() for h in haps.values())


#: dtypes the kept HAPs may be stored in (``cache_dtype``), with their unit roundoff u
CACHE_DTYPES = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}


def check_cache_dtype(dtype: Any) -> torch.dtype:
    """A ``cache_dtype`` setting checked: ``None`` (float32), a dtype or its name in :data:`CACHE_DTYPES`."""
    if dtype is None:
        return torch.float32
    value = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if value not in CACHE_DTYPES:
        raise ValueError(f"cache_dtype must be one of float32, float16, bfloat16 (or None), got {dtype!r}")
    return value


def _stored(haps: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """The HAPs as kept in memory: in ``dtype`` (float16 refuses values beyond its range, naming the layer)."""
    out = {}
    for l, h in haps.items():
        s = h if h.dtype == dtype else h.to(dtype)
        if dtype == torch.float16 and h.numel() and not bool(torch.isfinite(s).all()) and bool(torch.isfinite(h).all()):
            raise ValueError(f"layer {l!r}: activations up to {float(h.abs().max()):.4g} overflow "
                             f"cache_dtype=float16 (largest value 65504); use cache_dtype='bfloat16' or float32")
        out[l] = s
    return out


def _forward(probe: Any, train: Any, batch_size: int) -> Any:
    """``(per-input shape, probe result)`` of every non-empty batch of ``train``, in order: one forward pass."""
    for x, _ in iter_batches(train, batch_size):
        if n_rows(x):
            yield per_input_shape(x), probe.run(x)


@dataclass
class _Held:
    """The first batches of pass 1 that :func:`_hold_first_batches` kept, and the rest of that pass."""

    runs: list[tuple[Any, ProbeResult]]
    rest: Any  # the forward pass, going on after the kept batches (exhausted when ``complete``)
    complete: bool  # the data ended while the batches were kept: they are the whole forward pass
    kept_bytes: int

    @property
    def rows(self) -> int:
        return sum(int(r.outputs.shape[0]) for _, r in self.runs)


def _hold_first_batches(probe: Any, train: Any, batch_size: int, budget: int, sample_rows: int,
                        progress: bool | None, cache_dtype: torch.dtype = torch.float32) -> _Held:
    """Start pass 1 and keep its probe results while their HAPs fit ``budget`` (for data of a known size,
    while the first batch does not show that all of them will not) or, beyond the budget, until they hold
    ``sample_rows`` inputs (what ``thresholds="auto"`` needs before the libraries can start), their HAPs
    stored in ``cache_dtype``."""
    total = known_rows(train)
    gen = iter(progress_bar(_forward(probe, train, batch_size), "libraries (pass 1)", progress))
    runs: list[tuple[Any, ProbeResult]] = []
    kept = rows = 0
    over = False
    for shape, res in gen:
        res = ProbeResult(res.outputs, _stored(res.haps, cache_dtype))
        runs.append((shape, res))
        kept += _hap_bytes(res.haps)
        rows += int(res.outputs.shape[0])
        over = over or kept > budget or (total is not None and kept / rows * total > budget)
        if over and rows >= sample_rows:
            return _Held(runs, gen, False, kept)
    return _Held(runs, gen, True, kept)


_ONE_SHOT_MESSAGE = (
    "the training data is a one-shot iterator and its activations do not fit cache_bytes={cache_bytes}, so the "
    "Hebbian pass cannot see it a second time; pass a re-iterable (Tensor, Dataset, DataLoader, list of "
    "batches) or raise cache_bytes")


@dataclass
class StreamFit:
    """What :func:`stream_fit` returns.

    Attributes:
        readouts: ``{layer: [readout per library, same order]}``, accumulated over all training inputs.
        n_train / n_classes / input_shape: what the training data held.
        answers: the model's answers on the training inputs, ``LongTensor[N]`` (CPU), in visiting order.
    """

    readouts: dict[str, list[Any]]
    n_train: int
    n_classes: int
    input_shape: tuple[int, ...] | None
    answers: Tensor
    #: layers whose activations were the same for every training input (an all-zero or constant layer)
    constant_layers: list[str] = field(default_factory=list)
    #: whether every probed layer gave the very same activations for every input (two or more layers)
    same_haps: bool = False
    #: forward passes of the model over ``train`` made here (0: all from ``runs``, 1: HAPs cached, 2: streamed)
    forward_passes: int = 2
    #: inputs whose HAPs pass 1 kept for pass 2 (a first part of the data when they did not all fit)
    cached_rows: int = 0



def _float(h: Tensor) -> Tensor:
    """HAPs kept in float16 or bfloat16 back in float32 (others as they are)."""
    return h.float() if h.dtype in (torch.float16, torch.bfloat16) else h


class _FirstPass:
    """Pass 1 of :func:`stream_fit`: every batch's HAPs, in order, to every library of its layer (each
    observed by its pair pass), the model's answers, and the HAPs kept for pass 2 while they fit the budget."""

    def __init__(self, libraries: Mapping[str, Sequence[Any]], new_readout: Callable[[int], Any], *,
                 cache_bytes: int, keep_all: bool, one_shot: bool, cache_dtype: torch.dtype = torch.float32):
        self.libraries = libraries
        self.cache_dtype = cache_dtype
        self.new_readout = new_readout
        self.layers = list(libraries)
        self.cache_bytes = cache_bytes
        self.keep_all = keep_all  # the batches come from a whole forward pass already kept: keep them all
        self.one_shot = one_shot
        # keep pass 1's HAPs for pass 2 only within the budget (none at all with the budget 0)
        self.cache: list[dict[str, Tensor]] | None = [] if cache_bytes > 0 or keep_all else None
        self.cached_bytes = self.cached_rows = 0
        self.full = False  # the budget was reached: the cache holds the batches before that point
        self.answers: list[Tensor] = []
        self.n = 0
        self.n_classes: int | None = None
        self.input_shape: tuple[int, ...] | None = None
        self.readouts: dict[str, list[Any]] = {}
        self.passes: dict[tuple[str, int], HebbianPairPass] = {}  # (layer, library number) -> its pair pass
        self._firsts: dict[str, Tensor] = {}
        self.constant: set[str] = set()
        self.same = False

    def visit(self, shape: Any, res: ProbeResult) -> None:
        """One batch of pass 1: its per-input shape and probe result."""
        rows = int(res.outputs.shape[0])
        self._check(shape, res)
        if self.n == 0:  # the readouts (and the pair passes that record pass 1 for them) from the first batch on
            self.readouts = {l: [self.new_readout(self.n_classes) for _ in self.libraries[l]] for l in self.layers}
            self.passes = _pair_passes(self.libraries, self.readouts, record=True)
        idx = torch.arange(self.n, self.n + rows)
        for layer in self.layers:
            haps = _float(res.haps[layer])  # batches held in cache_dtype go back to float32
            for j, lib in enumerate(self.libraries[layer]):
                pp = self.passes.get((layer, j))
                if pp is not None and pp.record:
                    pp.begin(self.n)
                    lib.partial_fit(haps, idx, observer=pp)
                else:
                    lib.partial_fit(haps, idx)
        self.answers.append(res.answers.cpu())
        self.n += rows
        self._keep(res, rows)

    def _check(self, shape: Any, res: ProbeResult) -> None:
        """The batch's shape against the earlier ones; which layers are still constant, or all the same."""
        layers = self.layers
        if self.n == 0:
            self.input_shape = shape
        elif shape != self.input_shape:
            raise ShapeMismatchError(f"training batch has per-input shape {shape}, earlier batches had "
                                     f"{self.input_shape}")
        self.n_classes = int(res.outputs.shape[1])
        if self.n == 0:
            self._firsts = {l: res.haps[l][:1] for l in layers}
            self.constant = set(layers)
            self.same = len(layers) > 1 and all(res.haps[l].shape == res.haps[layers[0]].shape for l in layers)
        self.constant = {l for l in self.constant if bool((res.haps[l] == self._firsts[l]).all())}
        self.same = self.same and all(torch.equal(res.haps[l], res.haps[layers[0]]) for l in layers[1:])

    def _keep(self, res: ProbeResult, rows: int) -> None:
        if self.cache is None or self.full:
            return
        more = sum(res.haps[l].numel() for l in self.layers) * self.cache_dtype.itemsize
        if not self.keep_all and self.cached_bytes + more > self.cache_bytes:
            if self.one_shot:  # stop now rather than after a whole wasted pass
                raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=self.cache_bytes))
            self.full = True  # the batches kept so far are read back in pass 2, the rest runs the model again
        else:
            self.cache.append(_stored({l: res.haps[l] for l in self.layers}, self.cache_dtype))
            self.cached_bytes += more
            self.cached_rows += rows

    def end(self) -> Tensor:
        """End of pass 1: the readouts sized to the complete libraries; returns the model's answers."""
        if self.n == 0 or self.n_classes is None:
            raise ValueError("fit received no training inputs (empty data)")
        for l in self.layers:
            for lib, ro in zip(self.libraries[l], self.readouts[l]):
                ro.reset(lib.size)
        for pp in self.passes.values():
            pp.end_first_pass(self.n)
        return torch.cat(self.answers)


def _second_pass(probe: Any, train: Any, batch_size: int, first: _FirstPass, answers: Tensor,
                 progress: bool | None, desc: str) -> None:
    """Pass 2 of :func:`stream_fit`: every readout from the HAPs pass 1 kept, then (when they did not all fit)
    from the model run again on the inputs after them."""

    def hap_batches():
        cache = first.cache
        if cache is not None:
            yield from cache
            if not first.full:
                return
        skip = len(cache) if cache is not None else 0
        for xb, _ in iter_batches(train, batch_size):
            if n_rows(xb):
                if skip:  # read from the cache above
                    skip -= 1
                    continue
                yield probe.run(xb).haps

    seen = 0
    for haps in progress_bar(hap_batches(), f"{desc} (pass 2)", progress):
        haps = {l: _float(h) for l, h in haps.items()}
        b = haps[first.layers[0]].shape[0]
        _accumulate(first.libraries, first.readouts, first.passes, haps, answers[seen:seen + b], seen)
        seen += b
    if seen != first.n:
        raise ValueError(f"the training data gave {first.n} inputs in the first pass and {seen} in the second; "
                         "pass data that yields the same inputs every time it is iterated")
    for pp in first.passes.values():
        pp.finalize()


def stream_fit(probe: Any, train: Any, libraries: Mapping[str, Sequence[Any]], new_readout: Callable[[int], Any], *,
               batch_size: int = 256, cache_bytes: int = 0, progress: bool | None = None,
               desc: str = "libraries", runs: Sequence[tuple[Any, ProbeResult]] | None = None,
               cache_dtype: Any = None) -> StreamFit:
    """The two streaming passes behind :meth:`LibraryNetwork.fit`, for any number of libraries per layer.

    Pass 1 runs the model over ``train`` once and feeds every batch of HAPs, in order, to all libraries
    of that layer (``partial_fit``). Pass 2, once the libraries are complete (docs/method.md section 3),
    accumulates one readout per library from the HAPs kept in pass 1 while they fit ``cache_bytes``:
    when those of all batches do not fit, the batches kept up to the budget are read back and the model
    runs again on the rest only.
    For an exact library with a Hebbian readout, pass 2 sums Eq. 2 over the (input, node) pairs whose
    gain counts only, found from what the library computed in pass 1
    (:class:`~libnet_plugin.hebbian_pass.HebbianPairPass`); other kinds take the dense pass (the rule in
    :class:`~libnet_plugin.library.Library`'s docstring).

    Args:
        probe: a layer probe (``probe.run(x) -> ProbeResult``).
        train: Tensor, ``(X, y)``, Dataset, DataLoader or iterable of batches, in visiting order.
        libraries: ``{layer: [library, ...]}`` (e.g. one per threshold of a sweep), empty, filled here.
        new_readout: ``new_readout(n_classes)`` returns a fresh readout.
        batch_size / cache_bytes / progress: as for :class:`LibraryNetwork`.
        desc: the progress bars' label.
        runs: the ``(per-input shape, probe result)`` of every batch of ``train``, already computed (one
            forward pass kept whole): both passes read them and the model does not run here.
        cache_dtype: as for :meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>`: the dtype of
            the HAPs kept for pass 2 (pass 1 feeds the libraries the HAPs as they come).

    Returns:
        A :class:`StreamFit`.

    Inside a ``torch.distributed`` process group of two or more ranks, every rank streams its own shard
    and the libraries come out as a single process would build them from the batches in (step, rank)
    order (see :mod:`libnet_plugin.distributed`).
    """
    from .distributed import world

    if (group := world()) is not None:
        return _stream_fit_distributed(probe, train, libraries, new_readout, group, batch_size=batch_size,
                                       progress=progress, desc=desc)
    source = runs if runs is not None else _forward(probe, train, batch_size)
    return _stream_fit_local(probe, train, libraries, new_readout, source, complete=runs is not None,
                             batch_size=batch_size, cache_bytes=cache_bytes, progress=progress, desc=desc,
                             cache_dtype=check_cache_dtype(cache_dtype))


def _stream_fit_local(probe: Any, train: Any, libraries: Mapping[str, Sequence[Any]],
                      new_readout: Callable[[int], Any], source: Any, *, complete: bool, batch_size: int,
                      cache_bytes: int, progress: bool | None, desc: str,
                      cache_dtype: torch.dtype = torch.float32) -> StreamFit:
    """:func:`stream_fit` in one process, pass 1 reading ``source`` (``(per-input shape, probe result)`` of
    every batch of ``train``, in order: the model running on them, or ``complete``: kept whole beforehand)."""
    one_shot = is_one_shot(train) and not complete
    if cache_bytes <= 0 and one_shot:
        raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=cache_bytes))
    first = _FirstPass(libraries, new_readout, cache_bytes=cache_bytes, keep_all=complete, one_shot=one_shot,
                       cache_dtype=cache_dtype)
    for shape, res in progress_bar(source, f"{desc} (pass 1)", progress):
        first.visit(shape, res)
    answers = first.end()
    _second_pass(probe, train, batch_size, first, answers, progress, desc)
    layers = first.layers
    return StreamFit(readouts=first.readouts, n_train=first.n, n_classes=first.n_classes,
                     input_shape=first.input_shape, answers=answers,
                     constant_layers=[l for l in layers if l in first.constant], same_haps=first.same,
                     forward_passes=0 if complete else 1 if first.cache is not None and not first.full else 2,
                     cached_rows=first.n if complete else first.cached_rows)


def _nodes_of_rows(library: Any, before: int, first: int, n: int) -> Tensor:
    """``LongTensor[n]``: the node each of this rank's ``n`` rows (positions ``first ..``) became in the step
    that grew ``library`` from ``before`` nodes, ``-1`` for none."""
    out = torch.full((n,), -1, dtype=torch.long)
    pos = library.node_indices[before:]
    mine = (pos >= first) & (pos < first + n)
    out[pos[mine] - first] = torch.nonzero(mine).flatten() + before
    return out.to(library.device)


def _pair_passes(libraries: Mapping[str, Sequence[Any]], readouts: Mapping[str, Sequence[Any]], *,
                 record: bool) -> dict[tuple[str, int], HebbianPairPass]:
    """A :class:`HebbianPairPass` for every (layer, library number) whose library and readout it serves; the
    others take the dense pass, logged once per layer with the reason (:func:`dense_pass_reason`)."""
    passes = {}
    for l in libraries:
        reasons = set()
        for j, (lib, ro) in enumerate(zip(libraries[l], readouts[l])):
            reason = dense_pass_reason(lib, ro)
            if reason is None:
                passes[(l, j)] = HebbianPairPass(lib, ro, record=record)
            else:
                reasons.add(reason)
        for reason in sorted(reasons):
            log.info("layer %r: the readout takes the dense pass (a [B, M] product per batch): %s", l, reason)
    return passes


def _accumulate(libraries: Mapping[str, Sequence[Any]], readouts: Mapping[str, Sequence[Any]],
                passes: Mapping[tuple[str, int], HebbianPairPass], haps: Mapping[str, Tensor], answers: Tensor,
                seen: int) -> None:
    """Pass 2 for one batch (positions ``seen ..``): every readout of every layer."""
    for l in readouts:
        for j, (lib, ro) in enumerate(zip(libraries[l], readouts[l])):
            pp = passes.get((l, j))
            if pp is not None:
                pp.accumulate(haps[l], answers, seen)
            else:
                ro.accumulate(lib.similarity(haps[l]), answers)


def _stream_fit_distributed(probe: Any, train: Any, libraries: Mapping[str, Sequence[Any]],
                            new_readout: Callable[[int], Any], group: tuple[Any, int, int], *, batch_size: int,
                            progress: bool | None, desc: str) -> StreamFit:
    """:func:`stream_fit` across the ranks of a process group (two passes; no activation cache)."""
    from .distributed import all_reduce_sum, exchange_sizes, gather_rows, node_cosines, undecided_rows

    dist, rank, size = group
    layers = list(libraries)
    local = iter(iter_batches(train, batch_size))
    answers: list[Tensor] = []
    n = n_local = 0
    n_classes = 0
    readouts: dict[str, list[Any]] = {}
    passes: dict[tuple[str, int], HebbianPairPass] = {}
    input_shape: tuple[int, ...] | None = None
    device = torch.device("cpu")
    bar = progress_bar(iter(int, 1), f"{desc} (pass 1, rank {rank})", progress)  # an endless counter
    for _ in bar:
        res, error = None, None
        try:
            xb = next((b for b, _ in local if n_rows(b)), None)
            if xb is not None:
                res = probe.run(xb)
                if input_shape is None:
                    input_shape = per_input_shape(xb)
        except Exception as exc:  # every rank must hear of it, or the others wait at the next collective
            error = f"{type(exc).__name__}: {exc}"
        widths = [int(res.haps[l].shape[1]) if res is not None else 0 for l in layers]
        c = int(res.outputs.shape[1]) if res is not None else 0
        if res is not None:
            device = res.haps[layers[0]].device
        sizes, most = exchange_sizes(dist, rank, size, 0 if res is None else n_rows(xb), error, device,
                                     [*widths, c])
        step = sum(sizes)
        if step == 0:
            break
        if n == 0:  # the readouts, and the pair passes that record this rank's share of pass 1 for them
            n_classes = most[-1]
            readouts = {l: [new_readout(n_classes) for _ in libraries[l]] for l in layers}
            passes = _pair_passes(libraries, readouts, record=True)
        first = n + sum(sizes[:rank])  # this rank's first position in the (step, rank) order
        for l, width in zip(layers, most[:-1]):
            mine = res.haps[l] if res is not None else torch.zeros(0, width, device=device)
            for j, lib in enumerate(libraries[l]):
                # rows the library already decides (a node at cosine >= theta) are never stored by the
                # sequential rule either; only the others travel, in rank order, with their positions
                cos = node_cosines(lib, mine) if mine.shape[0] else None
                keep = undecided_rows(lib, mine, cos)
                counts, _ = exchange_sizes(dist, rank, size, int(keep.numel()), None, device)
                rows = gather_rows(dist, mine[keep], counts, width, torch.float32, device)
                pos = gather_rows(dist, (first + keep).to(torch.float64)[:, None], counts, 1, torch.float64, device)
                before = lib.size
                lib.partial_fit(rows, pos[:, 0].round().to(torch.long).cpu())
                pp = passes.get((l, j))
                if pp is not None and pp.record:
                    pp.on_step(cos, before, _nodes_of_rows(lib, before, first, mine.shape[0]))
        if res is not None:
            answers.append(res.answers.cpu())
            n_local += n_rows(xb)
        n += step
    if n == 0:
        raise ValueError("fit received no training inputs on any rank (empty data)")
    for l in layers:
        for lib, ro in zip(libraries[l], readouts[l]):
            ro.reset(lib.size)
    # the pairs that count, found from this rank's cosines of pass 1 and by scoring its inputs against the
    # nodes stored after them, with their gains in float64: the weights one process gets, up to the order
    # of the sums
    for pp in passes.values():
        pp.end_first_pass(n_local)
    train_answers = torch.cat(answers) if answers else torch.empty(0, dtype=torch.long)
    seen, error = 0, None
    try:
        for xb, _ in progress_bar(iter_batches(train, batch_size), f"{desc} (pass 2, rank {rank})", progress):
            if not n_rows(xb):
                continue
            haps = probe.run(xb).haps
            ans = train_answers[seen:seen + n_rows(xb)]
            _accumulate(libraries, readouts, passes, haps, ans, seen)
            seen += n_rows(xb)
        if seen != n_local:
            raise ValueError(f"the shard gave {n_local} inputs in the first pass and {seen} in the second")
        for pp in passes.values():
            pp.finalize()
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    exchange_sizes(dist, rank, size, seen, error, device)
    for l in layers:  # Eq. 2 is a sum over the inputs: the shards' partial sums add up
        for ro in readouts[l]:
            ro.load_state_dict(all_reduce_sum(dist, ro.state_dict(), device))
    return StreamFit(readouts=readouts, n_train=n, n_classes=n_classes, input_shape=input_shape,
                     answers=train_answers)



def check_cache_bytes(value: Any) -> int | str:
    """A ``cache_bytes`` setting checked: a number of bytes >= 0, or ``"auto"``."""
    if isinstance(value, str) and value != "auto":
        raise ValueError(f"cache_bytes must be a number of bytes >= 0 or 'auto', got {value!r}")
    return value if isinstance(value, str) else check_int(value, "cache_bytes", minimum=0)


def resolve_thresholds(thresholds: Any, layers: list[str]) -> dict[str, float]:
    """``{layer: theta}`` from a ``thresholds`` setting that is not ``"auto"``: one number for every layer or
    one per layer (each checked to lie in (0, 1])."""
    if isinstance(thresholds, Mapping):
        missing = [l for l in layers if l not in thresholds]
        extra = [k for k in thresholds if k not in layers]
        if missing or extra:
            raise ValueError(f"thresholds must give one value per probed layer {layers}; "
                             f"missing {missing}, unknown {extra}")
        return {l: validate_threshold(thresholds[l], l) for l in layers}
    if isinstance(thresholds, str):
        raise ValueError(f"thresholds must be a number or a {{layer: number}} dict, got {thresholds!r}")
    value = validate_threshold(thresholds)
    return {l: value for l in layers}


@dataclass
class NetworkFit:
    """What :func:`fit_network` returns to :meth:`LibraryNetwork.fit`, which adopts it.

    Attributes:
        libraries: ``{layer: library}``, filled.
        fitted: the :class:`StreamFit` of the two passes (readouts, answers, sizes).
        report: ``thresholds="auto"``'s report, ``None`` for given thresholds.
        forward_passes: runs of the model over the training data in all (the auto-threshold sample
            counting as one where it was a run of its own).
        budget: the ``cache_bytes`` budget used; ``how``: the log's account of the passes and the budget.
    """

    libraries: dict[str, Any]
    fitted: StreamFit
    report: dict[str, dict[str, Any]] | None
    forward_passes: int
    budget: int
    how: str


def _fit_layers(net: Any, train: Any, new_readout: Callable[[int], Any], budget: int, progress: bool | None,
                cache_dtype: torch.dtype) -> tuple[dict[str, Any], StreamFit, dict[str, Any] | None, str]:
    """The thresholds, the libraries and :func:`stream_fit` of :func:`fit_network`: ``(libraries, fitted,
    report, note for the log)``."""
    from .distributed import world

    auto = net.auto_thresholds
    runs, rest, n_total, note = None, None, None, ""
    if auto is not None and world() is None:
        from .thresholds import check_sample_size, choose_thresholds_from_haps

        sample = check_sample_size(auto.get("sample_size", DEFAULT_SAMPLE_SIZE))
        held = _hold_first_batches(net.probe, train, net.batch_size, budget, sample, progress, cache_dtype)
        runs = held.runs
        if not held.complete:
            if is_one_shot(train):
                raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=budget))
            rest, n_total = held.rest, known_rows(train)
            if n_total is None:  # the library sizes are extrapolated to the whole data: count it (no model)
                n_total = sum(n_rows(x) for x, _ in iter_batches(train, net.batch_size))
            note = (f"; thresholds='auto' took its sample from the first {held.rows} inputs, held in pass 1 "
                    f"({held.kept_bytes / 2**20:.1f} MB)")
        thetas, report = choose_thresholds_from_haps([r.haps for _, r in runs], net.new_library, layers=net.layers,
                                                     batch_size=net.batch_size, n_total=n_total, **auto)
    elif auto is not None:
        from .thresholds import choose_thresholds

        thetas, report = choose_thresholds(net.probe, train, net.new_library, layers=net.layers,
                                           batch_size=net.batch_size, **auto)
    else:
        thetas, report = resolve_thresholds(net.thresholds, net.layers), None
    libraries = {l: net.new_library(l, thetas[l]) for l in net.layers}
    libs = {l: [lib] for l, lib in libraries.items()}
    if runs is not None and rest is not None:  # pass 1 goes on from the batches held for the sample
        fitted = _stream_fit_local(net.probe, train, libs, new_readout, itertools.chain(runs, rest), complete=False,
                                   batch_size=net.batch_size, cache_bytes=budget, progress=progress, desc="libraries",
                                   cache_dtype=cache_dtype)
    else:
        fitted = stream_fit(net.probe, train, libs, new_readout, batch_size=net.batch_size, cache_bytes=budget,
                            progress=progress, runs=runs, cache_dtype=cache_dtype)
    return libraries, fitted, report, note


def fit_network(net: Any, train: Any, new_readout: Callable[[int], Any], progress: bool | None = None,
                cache_dtype: Any = None) -> NetworkFit:
    """Everything :meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>` computes, without touching
    ``net``'s fitted state: the budget, the thresholds, new libraries and :func:`stream_fit`.

    Forward passes of the model over the training data: **one** when the HAPs of all of it fit the budget
    (both passes, and ``thresholds="auto"``'s sample, read them), else **two**. With ``thresholds="auto"``
    the sample comes from the first pass: its first batches are held until they exceed the budget and
    hold ``sample_size`` inputs (:func:`_hold_first_batches`), theta is chosen from a uniform sample of
    those (:func:`~libnet_plugin.thresholds.choose_thresholds_from_haps`, the library sizes extrapolated to
    the whole data, counted without the model where its size is not known) and the libraries start on the
    held batches before the pass goes on. The libraries need theta from their first input on, so a
    streamed fit's sample is drawn from the first part of the data rather than from all of it (docs/scale.md,
    section 6). Inside a ``torch.distributed`` process group the sample is drawn from all ranks' data and
    the model runs over it first (:func:`~libnet_plugin.thresholds.choose_thresholds`).

    ``net`` provides ``probe``, ``layers``, ``batch_size``, ``device``, ``cache_bytes``, ``thresholds``,
    ``auto_thresholds`` and ``new_library`` (a :class:`~libnet_plugin.LibraryNetwork`);
    ``new_readout(n_classes)`` returns a fresh readout of its kind; ``cache_dtype`` as for ``fit``.
    """
    from .distributed import world

    if isinstance(train, torch.utils.data.DataLoader) and isinstance(train.sampler, torch.utils.data.RandomSampler):
        warnings.warn("the training DataLoader shuffles: libraries depend on the visiting order, and the "
                      "exemplar indices refer to the order of the first pass", stacklevel=3)
    if isinstance(net.cache_bytes, str):
        budget, source = default_cache_bytes(net.device)
    else:
        budget, source = net.cache_bytes, "cache_bytes"
    dtype = check_cache_dtype(cache_dtype)
    libraries, fitted, report, note = _fit_layers(net, train, new_readout, budget, progress, dtype)
    if dtype != torch.float32:
        note += f"; HAPs kept in {str(dtype).removeprefix('torch.')}"
    # 0: the batches held for the thresholds were the whole (one) pass; a distributed fit runs the model over
    # the thresholds' sample first
    passes = max(fitted.forward_passes, 1) + (net.auto_thresholds is not None and world() is not None)
    how = ("the HAPs of every probed layer kept" if fitted.forward_passes < 2 else
           "streamed (distributed)" if world() is not None else "streamed" if budget == 0 else
           f"streamed: the HAPs do not fit; the second pass read the first {fitted.cached_rows} inputs' from "
           f"memory and ran the model on {fitted.n_train - fitted.cached_rows}")
    how = f"{how}{note}; budget {budget / 2**20:.1f} MB, {source}"
    return NetworkFit(libraries=libraries, fitted=fitted, report=report, forward_passes=passes, budget=budget,
                      how=how)
