"""Choosing each layer's theta from the data (``thresholds="auto"``), for a model nobody has tuned.

The seed hand-picked theta per layer. :func:`choose_thresholds` instead aims at a library size: a
fraction of the training set per layer (``target=0.1``: about 10% of the training inputs become nodes),
or a number of nodes. It streams once over the training data to draw a uniform random sample of the
inputs (reservoir sampling, kept in visiting order) and to count them, runs the model on the sample
only, and for each layer bisects theta on the leader rule over the sample.
:meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>` takes the sample from its own first pass
instead (:func:`choose_thresholds_from_haps`): from all the data when its HAPs fit the fit's budget, else
from the first part of the data that pass holds (at least ``sample_size`` inputs) before the libraries
start, since the libraries need theta from their first input on. When the sample is smaller
than the training set, the library size on the whole set is extrapolated from the growth of the
library along the sample (a power law ``M(n) ~ n^b`` fitted on the second half of the sample): the
library grows slower than the data, so a plain fraction of the sample would overshoot.

:class:`~libnet_plugin.LibraryNetwork` calls it at ``fit`` when built with ``thresholds="auto"``;
options go in ``auto_thresholds={...}``. What was chosen is logged (logger
``libnet_plugin.thresholds``) and kept in ``net.auto_thresholds_report_``.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import libnet_plugin as lnp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    >>> x = torch.randn(1000, 16)
    >>> net = lnp.LibraryNetwork(model, ["0", "2"], thresholds="auto",
    ...                          auto_thresholds={"target": 0.1}).fit(x)
    >>> net.thresholds, sorted(net.thresholds_)
    ('auto', ['0', '2'])
    >>> all(60 <= n <= 140 for n in net.library_sizes_.values())  # about 10% of 1,000
    True
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._batches import MultiInput, is_one_shot, iter_batches, n_rows
from .distributed import world
from .library import ExactLibrary, Library, leader_within
from .probe import LayerProbe

__all__ = ["choose_thresholds", "choose_thresholds_from_haps", "reservoir_sample", "reservoir_positions",
           "predicted_library_size"]

log = logging.getLogger(__name__)

#: Bisection bounds for theta (the library's valid range is (0, 1]).
THETA_MIN, THETA_MAX = 1e-3, 1.0
#: inputs sampled to choose theta from, unless ``sample_size`` says otherwise
DEFAULT_SAMPLE_SIZE = 1000


def check_sample_size(n: Any) -> int:
    """``sample_size`` checked: a positive integer."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"sample_size must be a positive integer, got {n!r}")
    return n


def reservoir_sample(data: Any, n: int, seed: int = 0,
                     batch_size: int = 256) -> tuple[Tensor | list[MultiInput], Tensor, int]:
    """A uniform random sample of ``n`` inputs from a stream, in visiting order (reservoir sampling).

    Args:
        data: anything :func:`libnet_plugin._batches.iter_batches` accepts (labels are ignored).
        n: sample size (the whole data when it has fewer inputs).
        seed: seed of the sampling.
        batch_size: batch size when ``data`` is a Tensor or Dataset.

    Returns:
        ``(inputs [m, ...], indices LongTensor[m], n_total)`` with ``m = min(n, n_total)``; ``indices``
        are positions in the stream, increasing. For batches of several inputs per example
        (:class:`~libnet_plugin._batches.MultiInput`), ``inputs`` is a list of them, consecutive rows of
        the same shapes concatenated.

    Example:
        >>> x, idx, total = reservoir_sample(torch.arange(100.).reshape(100, 1), 10, batch_size=7)
        >>> x.shape, total, bool((idx[1:] > idx[:-1]).all()), bool((x[:, 0] == idx).all())
        (torch.Size([10, 1]), 100, True, True)
    """
    check_sample_size(n)
    if (group := world()) is not None:
        return _reservoir_sample_distributed(data, n, seed, batch_size, group)
    rng = np.random.default_rng(seed)
    buf: Tensor | None = None
    rows: list[MultiInput | None] = [None] * n  # several inputs per example: kept row by row
    idx = np.full(n, -1, dtype=np.int64)
    seen = 0
    for x, _ in iter_batches(data, batch_size):
        b = n_rows(x)
        if b == 0:
            continue
        if isinstance(x, Tensor):
            if buf is None:
                buf = torch.empty((n, *x.shape[1:]), dtype=x.dtype, device=x.device)
            elif tuple(x.shape[1:]) != tuple(buf.shape[1:]):
                raise ValueError(f"training batches have per-input shapes {tuple(buf.shape[1:])} and "
                                 f"{tuple(x.shape[1:])}")
        pos, slots = _reservoir_slots(rng, seen, b, n)
        for i in np.flatnonzero(slots < n):  # in order, so a later input overwrites an earlier one
            if isinstance(x, MultiInput):
                rows[slots[i]] = x[int(i):int(i) + 1]
            else:
                buf[slots[i]] = x[i]  # type: ignore[index]
            idx[slots[i]] = pos[i]
        seen += b
    if seen == 0:
        raise ValueError("choose_thresholds received no training inputs (empty data)")
    m = min(n, seen)
    order = np.argsort(idx[:m], kind="stable")
    if buf is None:  # MultiInput rows, in stream order; rows of the same shapes are batched together
        kept = [r for r in (rows[j] for j in order) if r is not None]
        groups: list[list[MultiInput]] = []
        for r in kept:
            if groups and groups[-1][0].signature() == r.signature():
                groups[-1].append(r)
            else:
                groups.append([r])
        return [MultiInput.cat(g) for g in groups], torch.from_numpy(idx[:m][order]), seen
    return buf[:m][torch.from_numpy(order).to(buf.device)], torch.from_numpy(idx[:m][order]), seen


def predicted_library_size(stored: Tensor, n_total: int) -> float:
    """Extrapolate a library's size from its growth along a sample of ``n`` to ``n_total`` inputs.

    Args:
        stored: ``BoolTensor[n]``: which sample inputs became nodes, in visiting order.
        n_total: size of the whole training set.

    Returns:
        The predicted number of nodes on ``n_total`` inputs: ``M(n) * (n_total / n) ** b`` with ``b`` the
        log-log slope of the cumulative size ``M(i)`` over the second half of the sample (clipped to
        [0, 1]); exactly ``M(n)`` when ``n_total == n``.

    Example:
        >>> stored = torch.zeros(400, dtype=torch.bool); stored[torch.arange(0, 400, 4)] = True
        >>> round(predicted_library_size(stored, 800), -1)  # linear growth: about 100 -> 200
        200.0
    """
    n = int(stored.shape[0])
    m = torch.cumsum(stored.to(torch.float64), dim=0)
    size = float(m[-1]) if n else 0.0
    if n_total <= n or n < 8 or size == 0:
        return size
    i = torch.arange(n // 2, n, dtype=torch.float64)
    y = torch.log(m[n // 2:].clamp(min=1.0))
    x = torch.log(i + 1.0)
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc * xc).sum().clamp(min=1e-12))
    b = min(max(b, 0.0), 1.0)
    return min(size * (n_total / n) ** b, float(n_total))


def _target_size(target: Any, n_total: int, layer: str) -> int:
    """Nodes wanted for ``layer``: a float is a fraction in (0, 1), an integer a number of nodes."""
    if isinstance(target, numbers.Integral) and not isinstance(target, bool):
        if int(target) < 1:
            raise ValueError(f"target for layer {layer!r}: a number of nodes must be >= 1, got {target!r}")
        return min(int(target), n_total)
    if isinstance(target, numbers.Real) and not isinstance(target, bool) and 0.0 < float(target) < 1.0:
        return max(1, round(float(target) * n_total))
    raise ValueError(f"target for layer {layer!r} must be a fraction of the training set in (0, 1) (a float) or a "
                     f"number of nodes >= 1 (an int), got {target!r}")


def _reservoir_slots(rng: np.random.Generator, seen: int, b: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Algorithm R for the ``b`` inputs at stream positions ``seen..seen+b-1``: ``(positions, slots)``.

    Input t (0-based) replaces slot j ~ U{0..t} when j < n (always placed while t < n); the draws depend
    only on the positions, which is what lets every rank of a distributed fit replay them.
    """
    pos = np.arange(seen, seen + b)
    return pos, np.where(pos < n, pos, (rng.random(b) * (pos + 1)).astype(np.int64))


def _reservoir_sample_distributed(data: Any, n: int, seed: int, batch_size: int,
                                  group: tuple[Any, int, int]) -> tuple[Tensor, Tensor, int]:
    """:func:`reservoir_sample` of the ranks' shards taken in (step, rank) order, the same on every rank.

    Algorithm R's draws depend only on the positions, so every rank replays them for all ranks' batches
    (exchanging the batch sizes at each step) and writes its own rows into the slots they win; one
    all-reduce of the slots (each filled on exactly one rank, zeros elsewhere) gives every rank the sample
    a single process would draw.
    """
    from .distributed import all_reduce_sum, exchange_sizes

    dist, rank, size = group
    rng = np.random.default_rng(seed)
    local = iter(iter_batches(data, batch_size))
    buf: Tensor | None = None
    dtype = torch.float32
    idx = np.full(n, -1, dtype=np.int64)
    seen = 0
    while True:
        x = next((b for b, _ in local if n_rows(b)), None)
        error = "thresholds='auto' across ranks takes tensor inputs" if isinstance(x, MultiInput) else None
        if isinstance(x, Tensor) and buf is None:
            dtype = x.dtype
            buf = torch.zeros((n, *x.shape[1:]), dtype=torch.float64, device=torch.device("cpu"))
        shape = list(x.shape[1:]) if isinstance(x, Tensor) else []
        sizes, _ = exchange_sizes(dist, rank, size, 0 if x is None else n_rows(x), error, torch.device("cpu"),
                                  [len(shape)])
        if sum(sizes) == 0:
            break
        for r, b in enumerate(sizes):
            if b == 0:
                continue
            pos, slots = _reservoir_slots(rng, seen, b, n)
            for i in np.flatnonzero(slots < n):
                if r == rank:
                    assert buf is not None and isinstance(x, Tensor)
                    buf[slots[i]] = x[i].to(buf.device, torch.float64)
                elif buf is not None:
                    buf[slots[i]] = 0.0  # now another rank's row
                idx[slots[i]] = pos[i]
            seen += b
    exchange_sizes(dist, rank, size, 0, None if buf is not None else f"rank {rank} had no training inputs for "
                   "thresholds='auto'", torch.device("cpu"))  # every rank hears of an empty shard before the sum
    assert buf is not None
    m = min(n, seen)
    owner_sum = all_reduce_sum(dist, {"sample": buf[:m]}, torch.device("cpu"))["sample"]
    order = np.argsort(idx[:m], kind="stable")
    sample = owner_sum[torch.from_numpy(order)].to(dtype)
    return sample, torch.from_numpy(idx[:m][order]), seen


def choose_thresholds(probe: LayerProbe, train: Any, new_library: Callable[[str, float], Library], *,
                      layers: Sequence[str], batch_size: int = 256,
                      target: float | int | Mapping[str, float | int] = 0.1, sample_size: int = DEFAULT_SAMPLE_SIZE,
                      seed: int = 0,
                      tol: float = 0.02, max_iter: int = 25) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Choose theta per layer so that each library reaches a target size.

    Args:
        probe: the model's layer probe (``probe.run(x)``).
        train: the training data, as ``LibraryNetwork.fit`` takes it; it must be re-iterable (it is
            streamed once here, then again by ``fit``).
        new_library: ``new_library(layer, theta)`` returns an empty library of the kind that will be
            fitted (for :class:`~libnet_plugin.LibraryNetwork`, its library kind and options).
        layers: the probed layers to choose a theta for.
        batch_size: batch size of the passes over ``train`` and the sample.
        target: per layer (one value, or ``{layer: value}``): a fraction in (0, 1) of the training inputs
            to keep as nodes, or a whole number of nodes.
        sample_size: inputs sampled (uniformly, by reservoir sampling) to choose theta from; only these
            pass through the model here. Their activations are kept in memory (``sample_size`` x the
            summed layer widths, float32).
        seed: seed of the sampling.
        tol: stop when the predicted size is within this relative distance of the target.
        max_iter: bisection steps per layer at most.

    Returns:
        ``({layer: theta}, report)`` with theta in (0, 1]; the report holds per layer the target, the
        predicted size, the sample size and the size on the sample (also logged).
        ``LibraryNetwork`` keeps it in ``auto_thresholds_report_``.

    Raises:
        ValueError: a bad target, empty data, or a one-shot iterator as training data.

    Example:
        >>> thetas, report = choose_thresholds(net.probe, x_train, new_library, layers=["conv1", "fc1"],
        ...                                    target={"conv1": 0.2, "fc1": 300})  # doctest: +SKIP
        >>> thetas  # doctest: +SKIP
        {'conv1': 0.7312, 'fc1': 0.8845}
    """
    if is_one_shot(train):
        raise ValueError("thresholds='auto' streams over the training data before fit does: pass a re-iterable "
                         "(Tensor, (X, y), Dataset, DataLoader or a list of batches), not a one-shot iterator")
    layers = list(layers)
    targets = _check_targets(target, layers, tol)
    x_sample, _, n_total = reservoir_sample(train, sample_size, seed=seed, batch_size=batch_size)
    haps: dict[str, list[Tensor]] = {l: [] for l in layers}
    chunks = x_sample if isinstance(x_sample, list) else [x_sample]
    for chunk, i in ((c, i) for c in chunks for i in range(0, n_rows(c), batch_size)):
        r = probe.run(chunk[i:i + batch_size])
        for l in layers:
            haps[l].append(r.haps[l])
    return _choose(haps, n_total, new_library, layers=layers, batch_size=batch_size, targets=targets, tol=tol,
                   max_iter=max_iter)


def reservoir_positions(batch_sizes: Sequence[int], n: int, seed: int = 0) -> Tensor:
    """The stream positions :func:`reservoir_sample` draws for batches of these sizes, increasing.

    The draws depend only on the positions and the seed, so this is the very sample ``reservoir_sample``
    takes of the same batches, without the inputs.

    Example:
        >>> data = torch.arange(100.).reshape(100, 1)
        >>> bool(torch.equal(reservoir_positions([7] * 14 + [2], 10), reservoir_sample(data, 10, batch_size=7)[1]))
        True
    """
    rng = np.random.default_rng(seed)
    idx = np.full(n, -1, dtype=np.int64)
    seen = 0
    for b in batch_sizes:
        if b == 0:
            continue
        pos, slots = _reservoir_slots(rng, seen, int(b), n)
        keep = np.flatnonzero(slots < n)
        idx[slots[keep]] = pos[keep]  # in order: a later input overwrites an earlier one
        seen += int(b)
    return torch.from_numpy(np.sort(idx[:min(n, seen)]))


def choose_thresholds_from_haps(hap_batches: Sequence[Mapping[str, Tensor]],
                                new_library: Callable[[str, float], Library], *, layers: Sequence[str],
                                batch_size: int = 256, target: float | int | Mapping[str, float | int] = 0.1,
                                sample_size: int = DEFAULT_SAMPLE_SIZE, seed: int = 0, tol: float = 0.02,
                                max_iter: int = 25,
                                n_total: int | None = None) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """:func:`choose_thresholds` from HAPs already computed, batch by batch in visiting order (the first
    pass of ``fit`` keeps them); no model run here.

    With the HAPs of the whole training data (``n_total`` ``None``), the sample is the one
    :func:`choose_thresholds` draws from batches of the same sizes (the same positions,
    :func:`reservoir_positions`); its HAPs come from the batches of the data rather than from batches of
    the sample, so they may differ from those by float32 rounding of the model's kernels.

    With ``n_total`` (the size of the whole data), the batches are only its first part, as ``fit`` holds
    them when the HAPs of all the data do not fit its budget: the sample is drawn uniformly from that first
    part (all of it when it has at most ``sample_size`` inputs) and the library sizes are extrapolated to
    ``n_total`` inputs. The thetas then suit the whole data as far as its first part stands for it: for
    data in a sorted order (by class, by source) shuffle it once with a fixed seed, raise ``cache_bytes``,
    or give the thresholds.
    """
    check_sample_size(sample_size)
    layers = list(layers)
    targets = _check_targets(target, layers, tol)
    sizes = [int(h[layers[0]].shape[0]) for h in hap_batches]
    seen = sum(sizes)
    if seen == 0:
        raise ValueError("choose_thresholds received no training inputs (empty data)")
    if n_total is None:
        n_total = seen
    elif isinstance(n_total, bool) or not isinstance(n_total, int) or n_total < seen:
        raise ValueError(f"n_total must be the size of the whole data, at least the {seen} inputs given; got "
                         f"{n_total!r}")
    pos = reservoir_positions(sizes, sample_size, seed)
    haps: dict[str, list[Tensor]] = {l: [] for l in layers}
    start = 0
    for h, b in zip(hap_batches, sizes):
        lo, hi = int(torch.searchsorted(pos, start)), int(torch.searchsorted(pos, start + b))
        if hi > lo:
            rows = pos[lo:hi] - start
            for l in layers:
                haps[l].append(h[l][rows.to(h[l].device)])
        start += b
    return _choose(haps, n_total, new_library, layers=layers, batch_size=batch_size, targets=targets, tol=tol,
                   max_iter=max_iter)


def _check_targets(target: Any, layers: list[str], tol: Any) -> dict[str, Any]:
    targets = dict(target) if isinstance(target, Mapping) else {l: target for l in layers}
    missing = [l for l in layers if l not in targets]
    unknown = [l for l in targets if l not in layers]
    if missing or unknown:
        raise ValueError(f"target must give one value per probed layer {layers}; missing {missing}, unknown {unknown}")
    if not (isinstance(tol, (int, float)) and 0.0 < tol < 1.0):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    return targets


#: the bisection takes the leader rule from the sample's Gram matrix (computed once) up to this many inputs
GRAM_MAX_ROWS = 4096


def _sample_gram(new_library: Callable[[str, float], Library], layer: str, h: Tensor) -> np.ndarray | None:
    """``[S, S]`` cosines among the sample's vectors as an exact library compares them, or ``None`` for a
    library whose rule is not :class:`~libnet_plugin.library.ExactLibrary`'s (or a sample above
    :data:`GRAM_MAX_ROWS`): the rule at any theta is then :func:`~libnet_plugin.library.leader_within` of
    it, one product in all instead of a library built per bisection step. The cosines are those of
    one product of the normalised rows, as the library's own products give them up to float32 rounding."""
    lib = new_library(layer, THETA_MAX)
    kind = type(lib)
    if not (isinstance(lib, ExactLibrary) and 0 < h.shape[0] <= GRAM_MAX_ROWS and lib.dtype == torch.float32
            and all(getattr(kind, f) is getattr(ExactLibrary, f) for f in ("partial_fit", "_novel_rows", "transform"))):
        return None
    x = lib.transform(h)
    return (x @ x.T).cpu().numpy()


def _choose(haps: dict[str, list[Tensor]], n_total: int, new_library: Callable[[str, float], Library], *,
            layers: list[str], batch_size: int, targets: Mapping[str, Any], tol: float,
            max_iter: int) -> tuple[dict[str, float], dict[str, dict[str, Any]]]:
    """Bisect each layer's theta on the sample's HAPs ``{layer: [batches]}`` (emptied as it goes)."""
    chosen: dict[str, float] = {}
    report: dict[str, dict[str, Any]] = {}
    for l in layers:
        h = torch.cat(haps[l])
        haps[l] = []  # free the list's references as we go
        want = _target_size(targets[l], n_total, l)
        gram = _sample_gram(new_library, l, h)

        def size_at(theta: float, l: str = l, h: Tensor = h, gram: np.ndarray | None = gram) -> tuple[float, int]:
            if gram is not None:  # the leader rule on the sample's cosines, computed once for every theta
                stored = torch.zeros(h.shape[0], dtype=torch.bool)
                stored[torch.from_numpy(leader_within(gram, theta))] = True
            else:
                lib = new_library(l, theta)
                stored = torch.cat([lib.partial_fit(h[i:i + batch_size],
                                                    torch.arange(i, min(i + batch_size, h.shape[0]))).cpu()
                                    for i in range(0, h.shape[0], batch_size)])
            return predicted_library_size(stored, n_total), int(stored.sum())

        lo, hi = THETA_MIN, THETA_MAX
        best = (math.inf, THETA_MAX, 0.0, 0)
        for _ in range(int(max_iter)):
            mid = 0.5 * (lo + hi)
            pred, on_sample = size_at(mid)
            err = abs(pred - want) / want
            if err < best[0]:
                best = (err, mid, pred, on_sample)
            if err <= tol:
                break
            if pred < want:
                lo = mid
            else:
                hi = mid
        err, raw, pred, on_sample = best
        theta = min(THETA_MAX, max(THETA_MIN, round(raw, 4)))
        if theta != raw:  # a rounded theta is kept only when it does not move the size past the target
            pred_rounded, on_sample_rounded = size_at(theta)
            if abs(pred_rounded - want) / want <= max(err, tol):
                pred, on_sample = pred_rounded, on_sample_rounded
            else:
                theta = raw
        chosen[l] = theta
        report[l] = {"theta": theta, "target_size": want, "predicted_size": round(pred, 1),
                     "sample_size": int(h.shape[0]), "size_on_sample": on_sample, "n_train": n_total}
        log.info("layer %r: theta %.4f (target %d nodes of %d inputs, predicted %.0f; %d on a sample of %d)",
                 l, theta, want, n_total, pred, on_sample, h.shape[0])
    return chosen, report
