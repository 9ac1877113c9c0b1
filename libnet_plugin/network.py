"""LibraryNetwork: per-layer libraries plus Hebbian readouts on top of any classifier."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import torch
from torch import Tensor

from ._batches import MultiInput, collect, is_one_shot, iter_batches, known_rows, n_rows, per_input_shape, progress_bar
from ._validate import check_int, check_layers
from ._version import __version__
from .errors import LibnetError, LibraryTooLargeWarning, NotFittedError, ShapeMismatchError
from .library import NodeLibrary, validate_threshold
from .metrics import ConfusionAccumulator, agreement_counts, cpl
from .plugins import make_library, make_probe, make_readout
from .probe import ConfigurableProbe, ProbeResult
from .readout import HebbianPairPass, WeightedReadout
from .serialization import load_checked, save_atomic

__all__ = ["LibraryNetwork", "stream_fit", "StreamFit", "default_cache_bytes"]

ThresholdSpec = float | Mapping[str, float] | str

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


def _forward(probe: Any, train: Any, batch_size: int) -> Any:
    """``(per-input shape, probe result)`` of every non-empty batch of ``train``, in order: one forward pass."""
    for x, _ in iter_batches(train, batch_size):
        if n_rows(x):
            yield per_input_shape(x), probe.run(x)


def _collect_runs(probe: Any, train: Any, batch_size: int, budget: int,
                  progress: bool | None) -> tuple[list[tuple[Any, ProbeResult]] | None, int]:
    """One forward pass over ``train`` whose probe results are all kept while their HAPs fit ``budget``:
    ``(runs, bytes)``, or ``(None, bytes so far)`` as soon as they do not (or, for data of a known size,
    once the first batch shows that they will not)."""
    total = known_rows(train)
    runs: list[tuple[Any, ProbeResult]] = []
    kept = 0
    for shape, res in progress_bar(_forward(probe, train, batch_size), "libraries (the one pass)", progress):
        runs.append((shape, res))
        kept += _hap_bytes(res.haps)
        rows = sum(r.outputs.shape[0] for _, r in runs)
        if kept > budget or (total is not None and len(runs) == 1 and kept / rows * total > budget):
            return None, kept
    return runs, kept


def _resolve_device(device: Any, model: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
    return torch.device("cpu")


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


def _check_saved_settings(cfg: Any) -> None:
    """The types and required entries of a saved network's settings (else :class:`SaveFormatError`, naming the
    entry), checked before anything is built from them."""
    from .errors import SaveFormatError

    def bad(entry: str, want: str, value: Any) -> SaveFormatError:
        return SaveFormatError(f"the saved network settings are malformed: {entry} should be {want}, got "
                               f"{type(value).__name__} {str(value)[:80]!r} (modified or corrupted)")

    def count(v: Any, minimum: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    if not isinstance(cfg, Mapping):
        raise bad("the settings", "a JSON object", cfg)
    for entry in ("layers", "thresholds", "top_k", "library", "library_options", "readout", "readout_options",
                  "batch_size", "n_classes", "n_train", "input_shape", "library_configs", "readout_configs"):
        if entry not in cfg:
            raise SaveFormatError(f"saved network settings lack the entry {entry!r}")
    layers = cfg["layers"]
    if (not isinstance(layers, list) or not layers or not all(isinstance(l, str) for l in layers)
            or len(set(layers)) != len(layers)):
        raise bad("'layers'", "a list of distinct layer names", layers)
    for entry, minimum in (("top_k", 1), ("batch_size", 1), ("n_classes", 2), ("n_train", 1)):
        if not count(cfg[entry], minimum):
            raise bad(repr(entry), f"an integer >= {minimum}", cfg[entry])
    for entry in ("library", "readout"):
        if not isinstance(cfg[entry], str):
            raise bad(repr(entry), "a name", cfg[entry])
    for entry in ("library_options", "readout_options"):
        if not isinstance(cfg[entry], Mapping):
            raise bad(repr(entry), "a JSON object", cfg[entry])
    for entry in ("auto_thresholds", "probe", "batch_dims"):
        if cfg.get(entry) is not None and not isinstance(cfg[entry], Mapping):
            raise bad(repr(entry), "a JSON object or null", cfg[entry])
    shape = cfg["input_shape"]
    if shape is not None and not (isinstance(shape, list) and all(count(d, 0) for d in shape)):
        raise bad("'input_shape'", "a list of sizes or null", shape)
    thetas = cfg["thresholds"]
    for entry in ("thresholds", "library_configs", "readout_configs"):
        value = cfg[entry]
        if not isinstance(value, Mapping):
            raise bad(repr(entry), "a JSON object with one entry per layer", value)
        missing = [l for l in layers if l not in value]
        if missing:
            raise SaveFormatError(f"the saved network settings are malformed: {entry!r} has no entry for the "
                                  f"layer(s) {missing[:5]} (modified or corrupted)")
    for l in layers:
        if isinstance(thetas[l], bool) or not isinstance(thetas[l], (int, float)):
            raise bad(f"the threshold of layer {l!r}", "a number", thetas[l])
        for entry in ("library_configs", "readout_configs"):
            if not isinstance(cfg[entry][l], Mapping):
                raise bad(f"{entry!r} of layer {l!r}", "a JSON object", cfg[entry][l])


def _check_loaded(layer: str, lib: Any, readout: Any, n_classes: int) -> None:
    """A loaded library and readout agree with each other and hold finite values (else SaveFormatError)."""
    from .errors import SaveFormatError

    problem = None
    dim = getattr(lib, "dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        problem = f"its library settings give no layer width (dim {dim!r})"
    elif lib.size < 1:
        problem = "its library has no nodes (a fitted library stores at least its first input)"
    elif isinstance(lib, NodeLibrary) and not bool(torch.isfinite(lib.nodes).all()):
        problem = "its library nodes hold NaN or infinity"
    elif isinstance(readout, WeightedReadout):
        w = readout.weight
        if tuple(w.shape) != (lib.size, n_classes):
            problem = f"its readout is {list(w.shape)} for {lib.size} nodes and {n_classes} classes"
        elif not bool(torch.isfinite(w).all()):
            problem = "its readout weights hold NaN or infinity"
    if problem is not None:
        raise SaveFormatError(f"the saved network's layer {layer!r} is inconsistent: {problem} (modified or corrupted)")


def _check_labels(y: Tensor, n_classes: int) -> None:
    """Labels must be integer class indices ``[B]`` in ``[0, n_classes)``."""
    if y.is_floating_point() or y.dim() != 1:
        raise ValueError(f"labels must be integer class indices of shape [B], got {y.dtype} of shape {list(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}) (the model has {n_classes} classes), got values "
                         f"from {int(y.min())} to {int(y.max())}")


def stream_fit(probe: Any, train: Any, libraries: Mapping[str, Sequence[Any]], new_readout: Callable[[int], Any], *,
               batch_size: int = 256, cache_bytes: int = 0, progress: bool | None = None,
               desc: str = "libraries", runs: Sequence[tuple[Any, ProbeResult]] | None = None) -> StreamFit:
    """The two streaming passes behind :meth:`LibraryNetwork.fit`, for any number of libraries per layer.

    Pass 1 runs the model over ``train`` once and feeds every batch of HAPs, in order, to all libraries
    of that layer (``partial_fit``). Pass 2, once the libraries are complete (docs/method.md section 3),
    accumulates one readout per library from the HAPs kept in pass 1 while they fit ``cache_bytes``:
    when those of all batches do not fit, the batches kept up to the budget are read back and the model
    runs again on the rest only.
    For an exact library with a Hebbian readout, pass 2 sums Eq. 2 over the (input, node) pairs whose
    gain counts only, found from what the library computed in pass 1
    (:class:`~libnet_plugin.readout.HebbianPairPass`).

    Args:
        probe: a layer probe (``probe.run(x) -> ProbeResult``).
        train: Tensor, ``(X, y)``, Dataset, DataLoader or iterable of batches, in visiting order.
        libraries: ``{layer: [library, ...]}`` (e.g. one per threshold of a sweep), empty, filled here.
        new_readout: ``new_readout(n_classes)`` returns a fresh readout.
        batch_size / cache_bytes / progress: as for :class:`LibraryNetwork`.
        desc: the progress bars' label.
        runs: the ``(per-input shape, probe result)`` of every batch of ``train``, already computed (one
            forward pass kept whole): both passes read them and the model does not run here.

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
    layers = list(libraries)
    # keep pass 1's HAPs for pass 2 only within the budget (none at all with the default budget 0)
    cache: list[dict[str, Tensor]] | None = [] if cache_bytes > 0 or runs is not None else None
    one_shot = is_one_shot(train) and runs is None
    if cache is None and one_shot:
        raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=cache_bytes))
    cached_bytes = cached_rows = 0
    full = False  # the budget was reached: the cache holds the batches before that point
    answers: list[Tensor] = []
    n = 0
    n_classes = None
    input_shape = None
    readouts: dict[str, list[Any]] = {}
    passes: dict[tuple[str, int], HebbianPairPass] = {}  # (layer, library number) -> its pair pass
    source = runs if runs is not None else _forward(probe, train, batch_size)
    for shape, res in progress_bar(source, f"{desc} (pass 1)", progress):
        rows = int(res.outputs.shape[0])
        if n == 0:
            input_shape = shape
        elif shape != input_shape:
            raise ShapeMismatchError(f"training batch has per-input shape {shape}, earlier batches had {input_shape}")
        n_classes = int(res.outputs.shape[1])
        if n == 0:
            firsts = {l: res.haps[l][:1] for l in layers}
            constant = set(layers)
            same = len(layers) > 1 and all(res.haps[l].shape == res.haps[layers[0]].shape for l in layers)
        constant = {l for l in constant if bool((res.haps[l] == firsts[l]).all())}
        same = same and all(torch.equal(res.haps[l], res.haps[layers[0]]) for l in layers[1:])
        if n == 0:  # the readouts (and the pair passes that record pass 1 for them) from the first batch on
            readouts = {l: [new_readout(n_classes) for _ in libraries[l]] for l in layers}
            passes = _pair_passes(libraries, readouts, record=True)
        idx = torch.arange(n, n + rows)
        for layer in layers:
            for j, lib in enumerate(libraries[layer]):
                pp = passes.get((layer, j))
                if pp is not None and pp.record:
                    pp.begin(n)
                    lib.partial_fit(res.haps[layer], idx, on_chunk=pp.on_chunk, want_dense=pp.want_dense,
                                    screen=pp.screen)
                else:
                    lib.partial_fit(res.haps[layer], idx)
        answers.append(res.answers.cpu())
        n += rows
        if cache is not None and not full:
            more = sum(res.haps[l].numel() * res.haps[l].element_size() for l in layers)
            if runs is None and cached_bytes + more > cache_bytes:
                if one_shot:  # stop now rather than after a whole wasted pass
                    raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=cache_bytes))
                full = True  # the batches kept so far are read back in pass 2, the rest runs the model again
            else:
                cache.append({l: res.haps[l] for l in layers})
                cached_bytes += more
                cached_rows += rows
    if n == 0 or n_classes is None:
        raise ValueError("fit received no training inputs (empty data)")
    train_answers = torch.cat(answers)
    for l in layers:
        for lib, ro in zip(libraries[l], readouts[l]):
            ro.reset(lib.size)
    for pp in passes.values():
        pp.finish(n)

    def hap_batches():
        if cache is not None:
            yield from cache
            if not full:
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
        b = haps[layers[0]].shape[0]
        ans = train_answers[seen:seen + b]
        _accumulate(libraries, readouts, passes, haps, ans, seen)
        seen += b
    if seen != n:
        raise ValueError(f"the training data gave {n} inputs in the first pass and {seen} in the second; "
                         "pass data that yields the same inputs every time it is iterated")
    for pp in passes.values():
        pp.finalize()
    return StreamFit(readouts=readouts, n_train=n, n_classes=n_classes, input_shape=input_shape,
                     answers=train_answers, constant_layers=[l for l in layers if l in constant], same_haps=same,
                     forward_passes=0 if runs is not None else 1 if cache is not None and not full else 2,
                     cached_rows=n if runs is not None else cached_rows)


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
    """A :class:`HebbianPairPass` for every (layer, library number) whose library and readout it serves."""
    return {(l, j): HebbianPairPass(lib, ro, record=record) for l in libraries
            for j, (lib, ro) in enumerate(zip(libraries[l], readouts[l])) if HebbianPairPass.applies(lib, ro)}


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
        pp.finish(n_local)
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


class LibraryNetwork:
    """Library networks (Lee, 2019) for chosen layers of a trained classifier.

    For every probed layer a library stores the normalised activation patterns (HAPs) that were novel
    when the training set passed through (cosine to everything stored ``< threshold``); a Hebbian
    readout links the nodes to the model's own answers, so each layer makes its own prediction.

    Args:
        model: a ``torch.nn.Module`` (built in); an ONNX path, ``onnx.ModelProto`` or
            ``onnxruntime.InferenceSession`` with the ONNX adapter installed.
        layers: the layers to probe, in order: ``model.named_modules()`` names for torch, or layer specs
            (``"fc1:input"``: what the module receives; ``"conv1:relu"``: its output after ReLU; see
            :func:`~libnet_plugin.probe.parse_layer_spec`). ``"auto"`` (torch modules): block outputs after
            their activation, picked at :meth:`fit` from the first training batch by the rule of
            :func:`~libnet_plugin.probe.auto_layers` (logged; ``layers`` holds them then, and a saved network
            keeps them).
        thresholds: theta in (0, 1], one for all layers or ``{layer: theta}`` for each; or ``"auto"`` to
            choose each layer's theta from the training data at ``fit`` (see
            :func:`libnet_plugin.thresholds.choose_thresholds`; options in ``auto_thresholds``). Kept
            as given; the theta of each fitted library is in ``thresholds_``.
        top_k: nodes used per prediction (Eq. 3) when a call does not say otherwise.
        device: where libraries live and compute (default: the model's device, else CPU).
        library: library kind served by the ``libnet_library`` hook (``"exact"``).
        library_options: extra settings passed to every library (e.g. ``{"n_units": 1024}``).
        readout: readout kind served by the ``libnet_readout`` hook (``"hebbian"``).
        batch_size: batch size used when data is given as a Tensor or a Dataset.
        cache_bytes: memory budget (bytes) for keeping the HAPs of the model's forward pass over the
            training data. When the HAPs of all probed layers fit, the model runs **once**: both passes of
            the fit (and ``thresholds="auto"``'s sample) read them. Otherwise the data is streamed twice,
            the second pass running the model only on the inputs after those whose HAPs fit the budget
            (with ``thresholds="auto"`` the model runs on its sample of ``sample_size`` inputs first; the
            pass that tried to keep every HAP is dropped, after one batch for data of a known size). ``"auto"`` (the
            default) is a quarter of the memory available when ``fit`` starts (:func:`default_cache_bytes`);
            ``0`` always streams, holding the libraries plus one batch of HAPs. Not saved; the budget
            used and the passes made are logged (logger ``libnet_plugin.network``) and kept in
            ``cache_bytes_`` and ``n_forward_passes_``.
        plugin_manager: a ``pluggy.PluginManager`` from :func:`libnet_plugin.get_plugin_manager`
            (default: the process-wide one).
        batch_dims: ``{layer: dim}``, the dimension of a torch layer's output that holds the batch, for a
            module that puts it elsewhere without a ``batch_first`` flag the probe reads (see
            :meth:`~libnet_plugin.probe.TorchLayerProbe.set_batch_dims`); saved with the network.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(64, 4)
        >>> net = LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(x)
        >>> sorted(net.library_sizes_)
        ['0', '2']
        >>> net.predict_scores(x[:5])["2"].shape
        torch.Size([5, 3])
        >>> net.consistency(x[:5]).shape
        torch.Size([5])
    """

    def __init__(self, model: Any, layers: Sequence[str] | str = "auto", thresholds: ThresholdSpec = 0.7, top_k: int = 3,
                 device: Any = None, *, library: str = "exact", library_options: Mapping[str, Any] | None = None,
                 readout: str = "hebbian", readout_options: Mapping[str, Any] | None = None,
                 batch_size: int = 256, cache_bytes: int | str = "auto",
                 auto_thresholds: Mapping[str, Any] | None = None,
                 plugin_manager: pluggy.PluginManager | None = None, batch_dims: Mapping[str, int] | None = None):
        #: layers="auto": the layers are picked (:func:`~libnet_plugin.probe.auto_layers`) from the first batch
        #: that :meth:`fit` (or :meth:`run`) sees; ``layers`` and ``probe`` are set then
        self.auto_layers = isinstance(layers, str) and layers == "auto"
        if self.auto_layers:
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"layers='auto' reads a torch.nn.Module's forward pass; name the layers of this "
                                f"{type(model).__name__}")
            if isinstance(thresholds, Mapping) or batch_dims:
                raise ValueError("thresholds={layer: theta} and batch_dims name layers: with them, name the layers "
                                 "too (layers='auto' picks them at fit)")
            layers = []
        elif isinstance(layers, str):
            layers = [layers]
        layers = list(layers)
        if not layers and not self.auto_layers:
            raise ValueError("layers must name at least one layer (or be 'auto')")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers}")
        top_k = check_int(top_k, "top_k")
        batch_size = check_int(batch_size, "batch_size")
        if isinstance(cache_bytes, str) and cache_bytes != "auto":
            raise ValueError(f"cache_bytes must be a number of bytes >= 0 or 'auto', got {cache_bytes!r}")
        if not isinstance(cache_bytes, str):
            cache_bytes = check_int(cache_bytes, "cache_bytes", minimum=0)
        self.model = model
        self.layers = layers
        self.auto_thresholds = dict(auto_thresholds or {}) if isinstance(thresholds, str) and thresholds == "auto" else None
        # the hyperparameter as given; checked now so that a bad value fails before any pass over data
        self.thresholds = dict(thresholds) if isinstance(thresholds, Mapping) else thresholds
        if self.auto_thresholds is None:
            self._resolve_thresholds(thresholds, layers)
        self.top_k = int(top_k)
        self.device = _resolve_device(device, model)
        self.library = library
        self.library_options = dict(library_options or {})
        self.readout = readout
        self.readout_options = dict(readout_options or {})
        self.batch_size = int(batch_size)
        self.cache_bytes = cache_bytes if isinstance(cache_bytes, str) else int(cache_bytes)
        self.plugin_manager = plugin_manager
        self.probe: Any = make_probe(model, layers, self.device, plugin_manager) if layers else None
        self.batch_dims = {str(k): v for k, v in batch_dims.items()} if batch_dims else None
        if self.batch_dims:
            if not callable(getattr(self.probe, "set_batch_dims", None)):
                raise TypeError(f"batch_dims= is read by the torch probe; the {type(self.probe).__name__} probe of "
                                "this model does not take it")
            self.probe.set_batch_dims(self.batch_dims)

    # ------------------------------------------------------------------ settings and state
    @staticmethod
    def _resolve_thresholds(thresholds: ThresholdSpec, layers: list[str]) -> dict[str, float]:
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

    def __repr__(self) -> str:
        sizes = self.library_sizes_ if self.is_fitted else None
        return (f"LibraryNetwork(layers={self.layers}, thresholds={self.thresholds!r}, top_k={self.top_k}, "
                f"device={str(self.device)!r}, library={self.library!r}, sizes={sizes})")

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "libraries_")

    def check_fitted(self) -> None:
        """Raise :class:`~libnet_plugin.errors.NotFittedError` unless :meth:`fit` (or :meth:`load`) has run."""
        if not self.is_fitted:
            raise NotFittedError("this LibraryNetwork is not fitted yet; call fit(train) before using it")

    @property
    def library_sizes_(self) -> dict[str, int]:
        """``{layer: number of library nodes}``."""
        self.check_fitted()
        return {l: self.libraries_[l].size for l in self.layers}

    @property
    def thresholds_(self) -> dict[str, float]:
        """``{layer: theta}`` of the fitted libraries (the thetas ``"auto"`` chose, or those given)."""
        self.check_fitted()
        return {l: float(self.libraries_[l].threshold) for l in self.layers}

    def new_library(self, layer: str, threshold: float, **extra: Any) -> Any:
        """An empty library for ``layer`` at theta ``threshold``, of this network's kind and options."""
        settings = {**self.library_options, **extra, "threshold": threshold, "device": self.device,
                    "layer": layer}
        return make_library(self.library, settings, self.plugin_manager)

    def _new_readout(self, n_classes: int, **extra: Any) -> Any:
        settings = {**self.readout_options, **extra, "n_classes": n_classes, "device": self.device}
        return make_readout(self.readout, settings, self.plugin_manager)

    # ------------------------------------------------------------------ probing
    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """One probe run of the model over a batch ``x`` ``[B, ...]``: its outputs and every layer's HAPs.

        Raises:
            TypeError: ``x`` is not a tensor.
            ShapeMismatchError: ``x`` has another per-input shape than the training inputs.
        """
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        shape = self.input_shape_ if self.is_fitted else None
        if shape is not None and isinstance(x, Tensor) and tuple(x.shape[1:]) != tuple(shape):
            raise ShapeMismatchError(f"input batch has shape {tuple(x.shape)} (per input {tuple(x.shape[1:])}); "
                                     f"the network was fitted on inputs of shape [B, {', '.join(map(str, shape))}]")
        self._resolve_auto_layers(x)
        return self.probe.run(x)

    def _resolve_auto_layers(self, x: Tensor | MultiInput) -> None:
        """``layers="auto"``: pick the layers from the batch ``x`` (once) and build the probe for them."""
        if self.layers:
            return
        from .probe import auto_layers

        layers = auto_layers(self.model, x)
        log.info("layers='auto' picked %s", layers)
        self.probe = make_probe(self.model, layers, self.device, self.plugin_manager)
        self.layers = layers

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Any, *, progress: bool | None = None) -> LibraryNetwork:
        """Build the libraries (first pass) and the Hebbian readouts (cached HAPs or a second pass).

        Args:
            train: the training inputs, in the order that defines the libraries: a Tensor ``[N, ...]``,
                an ``(X, y)`` pair, a Dataset, a DataLoader, or any iterable of batches (labels are
                ignored: the readout uses the model's own answers). A one-shot iterator works only
                while the HAPs fit ``cache_bytes``.
            progress: show tqdm progress bars (default: only on a terminal).

        Returns:
            ``self``, with ``libraries_``, ``readouts_``, ``library_sizes_``, ``n_classes_``,
            ``n_train_``, ``hap_dims_`` and ``input_shape_`` set, and ``n_forward_passes_`` (runs of the
            model over the training data, the auto-threshold sample counting as one) and ``cache_bytes_``
            (the budget used). All or nothing: when fitting raises, an earlier fit is kept as it was.
        """
        from .distributed import world

        if not self.layers:  # layers="auto": picked from the first training batch
            if is_one_shot(train):
                raise ValueError("layers='auto' looks at the first training batch before fitting, and this data can "
                                 "be iterated only once: pass re-iterable data (a Tensor, Dataset, DataLoader) or "
                                 "name the layers")
            first = next((x for x, _ in iter_batches(train, self.batch_size) if n_rows(x)), None)
            if first is None:
                raise ValueError("layers='auto' needs training inputs to pick the layers from; got no input")
            self._resolve_auto_layers(first)
        if isinstance(train, torch.utils.data.DataLoader) and isinstance(train.sampler, torch.utils.data.RandomSampler):
            warnings.warn("the training DataLoader shuffles: libraries depend on the visiting order, and the "
                          "exemplar indices refer to the order of the first pass", stacklevel=2)
        if isinstance(self.cache_bytes, str):
            budget, source = default_cache_bytes(self.device)
        else:
            budget, source = self.cache_bytes, "cache_bytes"
        passes, runs, kept, note = 0, None, 0, ""
        if self.auto_thresholds is not None and budget > 0 and world() is None:
            # one forward pass kept whole when it fits: the threshold sample, pass 1 and pass 2 all read it
            runs, kept = _collect_runs(self.probe, train, self.batch_size, budget, progress)
            if runs is None:
                if is_one_shot(train):
                    raise ValueError(_ONE_SHOT_MESSAGE.format(cache_bytes=budget))
                note = f"; keeping every HAP would exceed it ({kept / 2**20:.1f} MB kept then): that pass was dropped"
            else:
                passes = 1
        if self.auto_thresholds is not None and runs is not None:
            from .thresholds import choose_thresholds_from_haps

            thetas, report = choose_thresholds_from_haps([r.haps for _, r in runs], self.new_library,
                                                         layers=self.layers, batch_size=self.batch_size,
                                                         **self.auto_thresholds)
        elif self.auto_thresholds is not None:
            from .thresholds import choose_thresholds

            thetas, report = choose_thresholds(self.probe, train, self.new_library, layers=self.layers,
                                               batch_size=self.batch_size, **self.auto_thresholds)
            passes += 1  # the model over the sample
        else:
            thetas, report = self._resolve_thresholds(self.thresholds, self.layers), None
        libraries = {l: self.new_library(l, thetas[l]) for l in self.layers}
        fitted = stream_fit(self.probe, train, {l: [lib] for l, lib in libraries.items()}, self._new_readout,
                            batch_size=self.batch_size, cache_bytes=budget, progress=progress,
                            runs=runs)
        runs = None
        passes += fitted.forward_passes
        # all or nothing: the network's fitted state changes only here, once everything above succeeded
        self.adopt_fitted(libraries, {l: r[0] for l, r in fitted.readouts.items()},
                          n_classes=fitted.n_classes, n_train=fitted.n_train, input_shape=fitted.input_shape)
        if report is not None:
            self.auto_thresholds_report_ = report
        self.n_forward_passes_ = passes
        self.cache_bytes_ = budget
        how = ("the HAPs of every probed layer kept" if fitted.forward_passes < 2 else
               "streamed (distributed)" if world() is not None else "streamed" if budget == 0 else
               f"streamed: the HAPs do not fit; the second pass read the first {fitted.cached_rows} inputs' from "
               f"memory and ran the model on {fitted.n_train - fitted.cached_rows}")
        log.info("fit: %d forward pass%s of the model over the %d training inputs (%s; budget %.1f MB, %s%s)",
                 passes, "" if passes == 1 else "es", self.n_train_, how, budget / 2**20, source, note)
        if fitted.answers.numel() and bool((fitted.answers == fitted.answers[0]).all()):
            warnings.warn(f"the model answers class {int(fitted.answers[0])} for every training input: every library "
                          "node is linked to that class, so the layers' predictions and the detectors cannot tell "
                          "inputs apart (an untrained or collapsed model?)", stacklevel=2)
        for l in fitted.constant_layers:
            zero = all(not bool(lib.nodes.any()) for lib in [self.libraries_[l]] if isinstance(lib, NodeLibrary))
            warnings.warn(f"layer {l!r} is constant: its activations are {'all zero' if zero else 'the same'} for "
                          f"every one of the {self.n_train_} training inputs, so its library cannot tell inputs "
                          "apart (whatever its theta); probe another layer (a dead ReLU or a layer the inputs do "
                          "not reach?)", stacklevel=2)
        if fitted.same_haps:
            warnings.warn(f"the probed layers {self.layers} carry the very same activations for every training "
                          "input (one tensor recorded under several names, e.g. a model's output and the layer "
                          "that computes it), so their predictions always agree and CPL is vacuous: probe "
                          "layers that compute different things", stacklevel=2)
        advice = ("lower that layer's theta" if self.auto_thresholds is None else
                  "thresholds='auto' chose it: pass a lower theta for that layer, thresholds={layer: theta}")
        if self.auto_thresholds is None:
            advice += " (or use thresholds='auto')"
        for l, size in self.library_sizes_.items():
            if size > 0.5 * self.n_train_ and l not in fitted.constant_layers:
                warnings.warn(f"the library of layer {l!r} keeps {size} of its {self.n_train_} training inputs (more "
                              f"than half) at theta {self.thresholds_[l]:g}: it stores the data rather than a summary "
                              f"of it; {advice}", LibraryTooLargeWarning, stacklevel=2)
        return self

    def adopt_fitted(self, libraries: Mapping[str, Any], readouts: Mapping[str, Any], *, n_classes: int,
                     n_train: int, input_shape: Sequence[int] | None) -> LibraryNetwork:
        """Take libraries and readouts fitted elsewhere (e.g. one threshold of a sweep); return self.

        Args:
            libraries / readouts: one per probed layer, as the library and readout hooks return them.
            n_classes / n_train / input_shape: what the fit saw (classes, inputs, per-input shape).
        """
        missing = [l for l in self.layers if l not in libraries or l not in readouts]
        if missing:
            raise ValueError(f"adopt_fitted needs a library and a readout for every probed layer; missing {missing}")
        self.libraries_ = {l: libraries[l] for l in self.layers}
        self.readouts_ = {l: readouts[l] for l in self.layers}
        self.n_classes_ = int(n_classes)
        self.n_train_ = int(n_train)
        self.input_shape_ = tuple(input_shape) if input_shape is not None else None
        return self

    @property
    def hap_dims_(self) -> dict[str, int]:
        """``{layer: features per input}`` of the HAPs the libraries were fitted on."""
        self.check_fitted()
        return {l: int(self.libraries_[l].dim) for l in self.layers}

    # ------------------------------------------------------------------ prediction
    def scores_from_haps(self, haps: Mapping[str, Tensor], top_k: int | None = None,
                         layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Eq. 3 evidence per layer from HAPs already computed (e.g. by a guard reusing a forward).

        Args:
            haps: ``{layer: Tensor[B, D]}`` as a probe returns them.
            top_k: nodes per prediction (default: the network's ``top_k``).
            layers: the layers to score (default: all probed layers); ``haps`` needs only these.
        """
        self.check_fitted()
        k = self.top_k if top_k is None else int(top_k)
        return {l: self.readouts_[l].scores(self.libraries_[l].similarity(haps[l]), k)
                for l in self._layer_subset(layers)}

    def exemplars_from_haps(self, haps: Mapping[str, Tensor], k: int = 5,
                            layers: Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Training indices ``{layer: LongTensor[B, k]}`` and cosines ``{layer: Tensor[B, k]}`` of the
        ``k`` nodes nearest to each HAP (most similar first; ``k`` clipped to the library size)."""
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.check_fitted()
        idx, sims = {}, {}
        for l in self._layer_subset(layers):
            h = self.libraries_[l].similarity(haps[l])
            sims[l], top = h.topk(min(int(k), h.shape[1]), dim=1)
            idx[l] = self.libraries_[l].node_indices.to(top.device)[top]
        return idx, sims

    def _layer_subset(self, layers: Sequence[str] | None) -> list[str]:
        return check_layers(layers, self.layers)

    def _collect(self, x: Any, fn) -> Any:
        """Apply ``fn(probe_result)`` -> dict/Tensor to a Tensor or every batch of an iterable; concatenate."""
        self.check_fitted()
        return collect(x, self.run, fn, self.batch_size)

    def predict_scores(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer class evidence P (Eq. 3).

        Args:
            x: inputs ``[B, ...]`` (or any data ``fit`` accepts; batches are concatenated).
            top_k: nodes per prediction (default: the network's ``top_k``).

        Returns:
            ``{layer: Tensor[B, C]}`` on the network's device.
        """
        return self._collect(x, lambda r: self.scores_from_haps(r.haps, top_k))

    def predict(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer predicted class: ``{layer: LongTensor[B]}`` (argmax of :meth:`predict_scores`)."""
        return {l: p.argmax(dim=1) for l, p in self.predict_scores(x, top_k).items()}

    def consistency(self, x: Any, top_k: int = 20) -> Tensor:
        """CPL (Eq. 5): mean cosine between the layers' softmax(P) over all layer pairs.

        Returns:
            ``Tensor[B]`` in [0, 1]; low values mean the layers disagree (suspicious input).
        """
        if len(self.layers) < 2:
            raise ValueError(f"consistency needs at least two probed layers, this network has {self.layers}")
        return self._collect(x, lambda r: cpl(self.scores_from_haps(r.haps, top_k)))

    def evaluate(self, test: Any, top_k: int | None = None, *, progress: bool | None = None) -> dict[str, dict[str, float]]:
        """Agreement of each layer's prediction with the model, and accuracy against labels.

        Args:
            test: data as in :meth:`fit`; labels, when present, give accuracies.
            top_k: nodes per prediction (default: the network's ``top_k``).

        Returns:
            ``{layer: {"top1_agreement", "top3_agreement", "accuracy", "model_accuracy", "n"}}`` where
            top-1 agreement is the fraction of inputs whose argmax P equals the model's answer, top-3
            whether the model's answer is among the 3 largest entries of P, and the accuracies are
            ``nan`` when no labels were given.
        """
        self.check_fitted()
        counts = {l: [0, 0, 0] for l in self.layers}
        n = n_lab = model_correct = 0
        for x, y in progress_bar(iter_batches(test, self.batch_size), "evaluate", progress):
            if n_rows(x) == 0:
                continue
            if y is not None:
                _check_labels(y, self.n_classes_)
            r = self.run(x)
            ans = r.answers
            for l, p in self.scores_from_haps(r.haps, top_k).items():
                top1, top3, correct = agreement_counts(p, ans, y)
                counts[l][0] += top1
                counts[l][1] += top3
                counts[l][2] += correct or 0
            n += n_rows(x)
            if y is not None:
                n_lab += n_rows(x)
                model_correct += int((ans == y.to(ans.device)).sum())
        if n == 0:
            raise ValueError("evaluate received no inputs (empty data)")
        nan = float("nan")
        return {l: {"top1_agreement": c[0] / n, "top3_agreement": c[1] / n,
                    "accuracy": c[2] / n_lab if n_lab else nan,
                    "model_accuracy": model_correct / n_lab if n_lab else nan, "n": n}
                for l, c in counts.items()}

    def confusion_index(self, test: Any, top_k: int | None = None, *, progress: bool | None = None) -> dict[str, Tensor]:
        """Confusion index (Eq. 4) per layer: ``{layer: Tensor[C, C]}``.

        Row d1, column d2 is ``CA(d1, d2) / CA(d1, d1)`` over test inputs of true class d1 that the
        layer predicts correctly; the diagonal is shown as 0, a class with no such input gives NaN.
        ``test`` must carry labels.
        """
        self.check_fitted()
        acc = {l: ConfusionAccumulator(self.n_classes_, self.device) for l in self.layers}
        n = 0
        for x, y in progress_bar(iter_batches(test, self.batch_size), "confusion index", progress):
            if y is None:
                raise ValueError("confusion_index needs labels: pass (X, y), a labelled Dataset or DataLoader")
            if n_rows(x) == 0:
                continue
            for l, p in self.scores_from_haps(self.run(x).haps, top_k).items():
                acc[l].update(p, y)
            n += n_rows(x)
        if n == 0:
            raise ValueError("confusion_index received no inputs (empty data)")
        return {l: a.result() for l, a in acc.items()}

    def exemplars(self, x: Tensor, k: int = 5, *, return_similarities: bool = False) -> Any:
        """Training inputs behind the ``k`` library nodes most similar to each input, per layer.

        Args:
            x: inputs ``[B, ...]``.
            k: nodes per input (clipped to the library size).
            return_similarities: also return the cosines.

        Returns:
            ``{layer: LongTensor[B, k]}`` indices into the training data (in the order ``fit`` saw it),
            most similar first; with ``return_similarities`` a pair ``(indices, cosines)`` of such dicts.
        """
        self.check_fitted()
        idx, sims = self.exemplars_from_haps(self.run(x).haps, k)
        return (idx, sims) if return_similarities else idx

    # ------------------------------------------------------------------ persistence
    def _thresholds_json(self) -> Any:
        """The ``thresholds`` hyperparameter as JSON (``"auto"``, a number or ``{layer: number}``)."""
        if isinstance(self.thresholds, str):
            return self.thresholds
        if isinstance(self.thresholds, Mapping):
            return {str(k): float(v) for k, v in self.thresholds.items()}
        return float(self.thresholds)

    def config(self) -> dict[str, Any]:
        """The JSON-able settings saved with the network (what :meth:`from_state` reads back)."""
        return {
            "layers": self.layers, "thresholds": self.thresholds_, "thresholds_param": self._thresholds_json(),
            "auto_thresholds": self.auto_thresholds, "top_k": self.top_k,
            "library": self.library, "library_options": self.library_options,
            "readout": self.readout, "readout_options": self.readout_options,
            "batch_size": self.batch_size, "n_classes": self.n_classes_, "n_train": self.n_train_,
            "input_shape": list(self.input_shape_) if self.input_shape_ is not None else None,
            "hap_dims": self.hap_dims_,
            "library_configs": {l: self.libraries_[l].config() for l in self.layers},
            "readout_configs": {l: self.readouts_[l].config() for l in self.layers},
            "versions": {"libnet_plugin": __version__, "torch": torch.__version__},
            "probe": self.probe.config() if isinstance(self.probe, ConfigurableProbe) else None,
            **({"batch_dims": self.batch_dims} if self.batch_dims else {}),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        """All tensors of the fitted network, keyed ``library/<i>/<name>`` and ``readout/<i>/<name>`` where
        ``i`` is the layer's position in ``layers`` (layer names may contain any character)."""
        self.check_fitted()
        out = {}
        for i, l in enumerate(self.layers):
            out.update({f"library/{i}/{k}": v for k, v in self.libraries_[l].state_dict().items()})
            out.update({f"readout/{i}/{k}": v for k, v in self.readouts_[l].state_dict().items()})
        return out

    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
        """Save the fitted network to one safetensors file (settings as JSON metadata), atomically.

        The model itself is not saved; pass it again to :meth:`load`. With ``key`` (bytes or str) the file
        is signed (HMAC-SHA256 over its settings and tensor digests): ``load(path, model, key=key)`` then
        refuses any edit made without the key.
        """
        save_atomic(path, self.state_tensors(), kind="LibraryNetwork", config=self.config(), key=key)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, map_location: Any = None, device: Any = None,
             plugin_manager: pluggy.PluginManager | None = None, key: bytes | str | None = None) -> LibraryNetwork:
        """Load a network saved by :meth:`save` onto ``model`` (a torch model, or an ONNX model with the
        ONNX adapter; layers are matched by name).

        Args:
            path: the saved file.
            model: the model the libraries were built from (or an equivalent export of it).
            map_location / device: where to put the libraries (e.g. ``"cpu"`` for a file saved on GPU).
            key: the key the file was signed with (``save(path, key=...)``): a file that is unsigned or
                does not verify is refused (:class:`~libnet_plugin.errors.SaveIntegrityError`). Without
                it, a signed file is checked against its digests only.
        """
        tensors, cfg = load_checked(path, kind="LibraryNetwork", key=key)
        return cls.from_state(tensors, cfg, model, device=device if device is not None else map_location,
                               plugin_manager=plugin_manager)

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], cfg: dict[str, Any], model: Any, device: Any = None,
                    plugin_manager: pluggy.PluginManager | None = None) -> LibraryNetwork:
        """Rebuild a fitted network from saved tensors and :meth:`config` settings, onto ``model``."""
        from .errors import SaveFormatError

        _check_saved_settings(cfg)
        # files written before thresholds_ existed hold only the fitted thetas: they stand for the hyperparameter
        settings = dict(thresholds=cfg.get("thresholds_param", cfg["thresholds"]), top_k=cfg["top_k"],
                        auto_thresholds=cfg.get("auto_thresholds"), library=cfg["library"],
                        library_options=cfg["library_options"], readout=cfg["readout"],
                        readout_options=cfg["readout_options"], batch_size=cfg["batch_size"],
                        batch_dims=cfg.get("batch_dims"))
        layers, lib_cfgs, ro_cfgs = cfg["layers"], cfg["library_configs"], cfg["readout_configs"]
        try:
            net = cls(model, layers, device=device, plugin_manager=plugin_manager, **settings)
        except LibnetError:
            raise  # e.g. LayerNotFoundError: the model given lacks a saved layer
        except (TypeError, ValueError) as exc:
            raise SaveFormatError(f"the saved network settings are not valid: {exc}") from exc
        if cfg.get("probe") and isinstance(net.probe, ConfigurableProbe):
            try:
                net.probe.restore(cfg["probe"])
            except LibnetError:
                raise
            except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
                raise SaveFormatError(f"the saved probe settings are malformed (modified or corrupted): {exc!r}") from exc
        libraries, readouts = {}, {}
        for i, l in enumerate(net.layers):
            lc = {k: v for k, v in lib_cfgs[l].items() if k not in ("name", "threshold")}
            rc = {k: v for k, v in ro_cfgs[l].items() if k not in ("name", "n_classes")}
            try:
                lib = net.new_library(l, float(cfg["thresholds"][l]), **lc)
                ro = net._new_readout(cfg["n_classes"], **rc)
                for obj, prefix in ((lib, f"library/{i}/"), (ro, f"readout/{i}/")):
                    part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                    try:
                        obj.load_state_dict(part)
                    except KeyError as exc:
                        raise SaveFormatError(f"saved network lacks the tensor {prefix}{exc.args[0]} of layer {l!r}") from exc
            except SaveFormatError:
                raise
            except (LibnetError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
                raise SaveFormatError(f"the saved library or readout of layer {l!r} does not fit its settings "
                                      f"(modified or corrupted): {exc}") from exc
            _check_loaded(l, lib, ro, int(cfg["n_classes"]))
            libraries[l], readouts[l] = lib, ro
        return net.adopt_fitted(libraries, readouts, n_classes=cfg["n_classes"], n_train=cfg["n_train"],
                                input_shape=cfg["input_shape"])
