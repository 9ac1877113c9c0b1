"""Explain one model: how far each of its layers has come towards the decision (the paper's sections 2.2, 3.1).

:func:`inspect` fits the libraries of a few layers of a trained classifier (theta chosen per layer, by
default from the data) and measures on test data what the paper draws for its two nets:

* per layer, library size against theta (a small sweep around the chosen theta, Fig. 2A), top-1 / top-3
  agreement with the model and, with labels, accuracy (Fig. 2B/C), and the confusion index at the chosen
  theta (Eq. 4, Fig. 3);
* the decision's path: for each class the first layer whose prediction agrees with the model's answer on
  most inputs of that class, the class pairs each layer confuses most, and the layer that under-performs
  (the largest fall of top-1 agreement from one layer to the next);
* the layers' consistency (CPL, Eq. 5) on the test data, and a :class:`~libnet_plugin.ConsistencyDetector`
  calibrated at 5% FPR with the inputs it flags;
* per input, for the least and most consistent test inputs (and any named by index): each layer's top-3
  classes with their evidence and the training inputs behind the nearest library nodes;
* the settings, versions and timings.

The numbers need torch only (this module is part of the core). :meth:`InspectionReport.save_html` draws
the figures with matplotlib (the ``[experiments]`` extra): it loads
:mod:`libnet_plugin.experiments.inspect_report` when it is called, as the CLI loads its commands.

Example:
        >>> import torch
    >>> from torch import nn
        >>> import libnet_plugin as lnp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> x, y = torch.randn(300, 8), torch.randint(0, 3, (300,))
    >>> report = lnp.inspect(model, x[:240], (x[240:], y[240:]), progress=False)
    >>> report.layers
    ['0', '2', '4']
    >>> row = report.to_dict()["layers"]["2"]
    >>> row["size"] == max(r["size"] for r in row["sweep"] if r["theta"] <= row["theta"])
    True
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._batches import MultiInput, iter_batches, n_rows, progress_bar
from ._version import __version__
from .consistency_detector import ConsistencyDetector
from .errors import LibnetError, ShapeMismatchError
from .library import validate_threshold
from .metrics import ConfusionAccumulator, agreement_counts, cpl, stable_softmax
from .network import LibraryNetwork, stream_fit
from .plugins import make_probe, make_readout
from .thresholds import choose_thresholds

__all__ = ["inspect", "InspectOptions", "InspectionReport", "InspectionError", "probeable_layers", "spread",
           "sweep_thetas"]

#: How many layers :func:`inspect` probes when none are named.
DEFAULT_N_LAYERS = 4
#: Sweep points around each layer's chosen theta, as factors of ``1 - theta`` (below 1: a larger library).
SWEEP_FACTORS = (2.0, 1.5, 1.0, 0.75)


class InspectionError(LibnetError, ValueError):
    """A model, data set or setting :func:`inspect` refuses before its long work (the message says why)."""


# ---------------------------------------------------------------------------------------------- layers
def probeable_layers(model: nn.Module, x: Tensor | MultiInput) -> list[str]:
    """Leaf modules that hold a weight matrix or kernel (Linear, Conv, Embedding...), in the order one
    forward pass over ``x`` calls them, keeping only those whose output is a floating tensor per input.

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> probeable_layers(m, torch.zeros(2, 4))
        ['0', '2']
    """
    names = {mod: name for name, mod in model.named_modules() if name and not list(mod.children())
             and any(p.dim() >= 2 for p in mod.parameters(recurse=False))}
    order: list[str] = []
    n = n_rows(x)

    def hook(mod: nn.Module, _inp: Any, out: Any) -> None:
        name = names[mod]
        if (name not in order and isinstance(out, Tensor) and out.is_floating_point() and out.dim() >= 2
                and out.shape[0] == n):
            order.append(name)

    handles = [mod.register_forward_hook(hook) for mod in names]
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            try:
                if isinstance(x, MultiInput):
                    parts = x.parts
                    model(**parts) if isinstance(parts, dict) else model(*parts)
                else:
                    model(x)
            finally:
                model.train(was)
    finally:
        for h in handles:
            h.remove()
    return order


def spread(candidates: Sequence[str], k: int = DEFAULT_N_LAYERS) -> list[str]:
    """``k`` names evenly spaced along ``candidates`` (the first and the last always among them).

    Example:
        >>> spread(["a", "b", "c", "d", "e", "f", "g"], 4)
        ['a', 'c', 'e', 'g']
    """
    c = list(candidates)
    if len(c) <= k:
        return c
    picks = sorted({round(i * (len(c) - 1) / (k - 1)) for i in range(k)})
    return [c[i] for i in picks]


def sweep_thetas(theta: float, factors: Sequence[float] = SWEEP_FACTORS) -> list[float]:
    """The sweep around a chosen theta: ``1 - f (1 - theta)`` for each factor, in (0, 1], rounded, sorted.

    Example:
        >>> sweep_thetas(0.8)
        [0.6, 0.7, 0.8, 0.85]
    """
    out = {round(theta, 6)}
    for f in factors:
        t = 1.0 - f * (1.0 - theta)
        if 0.0 < t <= 1.0:
            out.add(round(t, 6))
    return sorted(out)


# ---------------------------------------------------------------------------------------------- the report
@dataclass
class InspectionReport:
    """What :func:`inspect` measured: every number in :meth:`to_dict`, the HTML page from :meth:`save_html`.

    Attributes:
        data: the numbers (JSON types; ``None`` for a number that does not exist, e.g. accuracy without labels).
        images: thumbnails for the page when the inputs are images: ``{"queries": Tensor[B, C, H, W],
            "exemplars": {layer: Tensor[B, k, C, H, W]}}`` in [0, 1]; empty otherwise.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> report = lnp.inspect(model, torch.randn(60, 4), layers=["0", "2"], thresholds=0.9, sweep=())
        >>> report.layers, "model_accuracy" in report.to_dict()
        (['0', '2'], True)
    """

    data: dict[str, Any]
    images: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """The probed layers.

        Returns:
            the layer names, in order.
        """
        return list(self.data["settings"]["layers"])

    def to_dict(self) -> dict[str, Any]:
        """Every number of the report.

        Returns:
            a deep copy of :attr:`data` (what ``report.json`` holds).
        """
        return copy.deepcopy(self.data)

    def save_html(self, path: str | os.PathLike) -> Path:
        """Write the report as one self-contained HTML page (figures embedded as PNG; no network request).

        Needs matplotlib (``pip install 'libnet-plugin[experiments]'``).

        Args:
            path: the HTML file to write.

        Returns:
            ``path``, as a ``Path``.
        """
        try:
            renderer = importlib.import_module("libnet_plugin.experiments.inspect_report")
        except ModuleNotFoundError as exc:
            raise ImportError(f"save_html draws its figures with matplotlib, which is missing ({exc}); "
                              "pip install 'libnet-plugin[experiments]'") from exc
        return renderer.write_html(self, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return _jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


class _Timer:
    def __init__(self, log: Any):
        self.seconds: dict[str, float] = {}
        self.log = log
        self.t0 = time.perf_counter()

    def start(self, name: str) -> None:
        self.name, self.t = name, time.perf_counter()
        self.log(f"[{name}] ...")

    def stop(self) -> None:
        dt = time.perf_counter() - self.t
        self.seconds[self.name] = round(self.seconds.get(self.name, 0.0) + dt, 3)
        self.log(f"[{self.name}] done in {dt:.1f} s")


# ---------------------------------------------------------------------------------------------- data
def _materialize(data: Any, batch_size: int, what: str) -> tuple[Tensor, Tensor | None]:
    """All of ``data`` as ``(X, y or None)`` tensors (test data is small; the page needs its rows)."""
    xs, ys = [], []
    for x, y in iter_batches(data, batch_size):
        if not isinstance(x, Tensor):
            raise InspectionError(f"inspect takes {what} inputs as one tensor per batch; models called with several "
                                  "tensors (MultiInput) are not supported yet")
        if n_rows(x):
            xs.append(x)
            ys.append(y)
    if not xs:
        raise InspectionError(f"the {what} data holds no inputs")
    labelled = [y is not None for y in ys]
    if any(labelled) and not all(labelled):
        raise InspectionError(f"some {what} batches carry labels and some do not")
    return torch.cat(xs), (torch.cat([torch.as_tensor(y) for y in ys]).long() if all(labelled) else None)


def _first_batch(data: Any, batch_size: int) -> tuple[Tensor | MultiInput, Tensor | None]:
    for x, y in iter_batches(data, batch_size):
        if n_rows(x):
            return x, y
    raise InspectionError("the training data holds no inputs")


def _check_labels(y: Tensor | None, n_classes: int, what: str) -> None:
    if y is None:
        return
    if y.is_floating_point() and not bool((y == y.round()).all()):
        raise InspectionError(f"{what} labels must be whole class numbers, got floating values such as {y[:3].tolist()}")
    bad = (y < 0) | (y >= n_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise InspectionError(f"{what} labels must lie in 0..{n_classes - 1} (the model has {n_classes} outputs); "
                              f"label {int(y[i])} at index {i} is out of range")


def _rows_at(data: Any, indices: Sequence[int], batch_size: int) -> Tensor | None:
    """The training inputs at ``indices`` (visiting order), streamed; ``None`` when they are not plain tensors."""
    want = sorted(set(int(i) for i in indices))
    found: dict[int, Tensor] = {}
    seen = 0
    for x, _ in iter_batches(data, batch_size):
        if not isinstance(x, Tensor):
            return None
        for i in want:
            if seen <= i < seen + n_rows(x):
                found[i] = x[i - seen]
        seen += n_rows(x)
        if len(found) == len(want):
            break
    if not found:
        return None
    order = torch.stack([found[i] for i in want])
    pos = {i: j for j, i in enumerate(want)}
    return order[[pos[int(i)] for i in indices]]


def _is_image(shape: Sequence[int]) -> bool:
    return (len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) >= 4) or (len(shape) == 2 and min(shape) >= 8)


def _thumbnails(x: Tensor) -> Tensor:
    """Images scaled to [0, 1] each (min-max), as ``[N, C, H, W]``."""
    x = x.detach().float().cpu()
    if x.dim() == 3:
        x = x[:, None]
    lo = x.flatten(1).amin(1)[:, None, None, None]
    hi = x.flatten(1).amax(1)[:, None, None, None]
    return ((x - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)


# ---------------------------------------------------------------------------------------------- thresholds
def _thresholds(spec: Any, layers: list[str]) -> tuple[dict[str, float], list[str]]:
    """``(given thetas, layers left to "auto")`` from ``"auto"``, a number, or ``{layer: theta}`` (others auto)."""
    if isinstance(spec, str) and spec == "auto":
        return {}, list(layers)
    if isinstance(spec, Mapping):
        unknown = [k for k in spec if k not in layers]
        if unknown:
            raise InspectionError(f"thresholds name layers that are not probed: {unknown}; probed: {layers}")
        given = {l: validate_threshold(spec[l], l) for l in layers if l in spec and spec[l] != "auto"}
        return given, [l for l in layers if l not in given]
    if isinstance(spec, str):
        raise InspectionError(f"thresholds must be 'auto', a number or {{layer: theta}}, got {spec!r}")
    value = validate_threshold(spec)
    return {l: value for l in layers}, []


# ---------------------------------------------------------------------------------------------- the path
def _decision_path(layers: list[str], pred: dict[str, Tensor], answers: Tensor, n_classes: int,
                   agreement: dict[str, float]) -> dict[str, Any]:
    """The paper's section 3.1 flowchart: per class, the first layer that agrees with the model on most of it."""
    classes = []
    for c in range(n_classes):
        sel = answers == c
        n = int(sel.sum())
        fractions = {l: (float((pred[l][sel] == c).float().mean()) if n else None) for l in layers}
        first = next((l for l in layers if fractions[l] is not None and fractions[l] > 0.5), None)
        classes.append({"class": c, "n": n, "agreement": fractions, "first_layer": first})
    drops = [(agreement[a] - agreement[b], b, a) for a, b in zip(layers, layers[1:])]
    worst = max(drops, default=None)
    under = None
    if worst is not None and worst[0] > 0:
        under = {"layer": worst[1], "after": worst[2], "drop": worst[0],
                 "why": f"top-1 agreement with the model falls by {worst[0]:.3f} from layer {worst[2]!r} to {worst[1]!r}"}
    weakest = min(layers, key=lambda l: agreement[l])
    return {"classes": classes, "underperforming_layer": under, "weakest_layer": weakest}


def _most_confused(ci: Tensor, n: int = 3) -> list[dict[str, Any]]:
    m = ci.clone().double()
    m[~torch.isfinite(m)] = -1.0
    m.fill_diagonal_(-1.0)
    flat = m.flatten()
    k = min(n, flat.numel())
    vals, idx = flat.topk(k)
    c = ci.shape[0]
    return [{"true": int(i) // c, "confused_with": int(i) % c, "index": float(v)} for v, i in zip(vals, idx) if v > 1e-3]


# ---------------------------------------------------------------------------------------------- stages
@dataclass
class _Inputs:
    """What the checks found: the layers, the classes and the test data (kept in memory: the page needs rows)."""

    layers: list[str]
    layer_choice: str
    candidates: list[str]
    n_classes: int
    x_test: Tensor
    y_test: Tensor | None
    test_is_train: bool

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def _check_inputs(model: Any, train: Any, test: Any, layers: Sequence[str] | None, indices: Sequence[int],
                  n_layers: int, batch_size: int, device: Any) -> _Inputs:
    """Everything that can fail before the long work: the model on a training batch, labels, layers, indices."""
    x0, y0 = _first_batch(train, batch_size)
    try:
        out0 = make_probe(model, [], device if device is not None else "cpu").run(x0[:2])
        n_classes = int(out0.outputs.shape[1])
    except (RuntimeError, ValueError, TypeError) as exc:
        if isinstance(exc, LibnetError) and not isinstance(exc, ShapeMismatchError):
            raise
        shape = tuple(x0.shape) if isinstance(x0, Tensor) else repr(x0)
        raise InspectionError(f"the model refuses the training inputs of shape {shape} "
                              f"(dtype {getattr(x0, 'dtype', '?')}): {str(exc).splitlines()[0]}") from exc
    _check_labels(y0, n_classes, "training")
    layer_choice = "named by the caller"
    candidates: list[str] = []
    if layers is None:
        if not isinstance(model, nn.Module):
            raise InspectionError("name the layers to probe for a model that is not a torch module "
                                  "(`libnet layers MODEL` lists an ONNX model's layers)")
        candidates = probeable_layers(model, x0[:2])
        if not candidates:
            raise InspectionError("the model has no leaf module holding a weight matrix or kernel; name layers=[...]")
        layers = spread(candidates, n_layers)
        layer_choice = (f"{len(layers)} of the {len(candidates)} leaf modules that hold a weight matrix or kernel, in "
                        f"forward order, evenly spaced with the first and the last")
    x_test, y_test = _materialize(train if test is None else test, batch_size, "training" if test is None else "test")
    if isinstance(x0, Tensor) and tuple(x_test.shape[1:]) != tuple(x0.shape[1:]):
        raise InspectionError(f"test inputs have per-input shape {tuple(x_test.shape[1:])}, training inputs "
                              f"{tuple(x0.shape[1:])}")
    _check_labels(y_test, n_classes, "test")
    n_test = int(x_test.shape[0])
    bad = [i for i in indices if not -n_test <= int(i) < n_test]
    if bad:
        raise InspectionError(f"indices {bad} are out of range for {n_test} test inputs")
    return _Inputs(list(layers), layer_choice, candidates, n_classes, x_test, y_test, test is None)


def _grid(sweep: Any, chosen: Mapping[str, float]) -> dict[str, list[float]]:
    """The thetas of the sweep per layer, the chosen one always among them."""
    if sweep is None or sweep is True:
        return {l: sweep_thetas(t) for l, t in chosen.items()}
    if sweep is False:
        sweep = ()
    if not isinstance(sweep, (Mapping, Sequence)) or isinstance(sweep, str):
        raise TypeError(f"sweep must be thetas (a list, or {{layer: [thetas]}}), True/None for the default sweep or "
                        f"False for none, got {type(sweep).__name__}: {sweep!r}")
    return {l: sorted({round(validate_threshold(x, l), 6) for x in (sweep.get(l, ()) if isinstance(sweep, Mapping)
                                                                     else sweep)} | {t})
            for l, t in chosen.items()}


@dataclass
class _Sweep:
    grid: dict[str, list[float]]
    chosen: dict[str, float]
    libs: dict[str, dict[float, Any]]
    readouts: dict[str, dict[float, Any]]
    n_train: int


def _fit_sweep(net: LibraryNetwork, train: Any, grid: dict[str, list[float]], chosen: dict[str, float],
               batch_size: int, progress: bool | None) -> _Sweep:
    """One library and readout per theta of every layer from the same two streaming passes; the network adopts
    the chosen ones (as :func:`libnet_plugin.experiments.sweep.fit_library_sweep` does, in the core)."""
    libs = {l: {t: net.new_library(l, t) for t in ts} for l, ts in grid.items()}
    fitted = stream_fit(net.probe, train, {l: list(libs[l].values()) for l in libs},
                        lambda c: make_readout(net.readout, {**net.readout_options, "n_classes": c,
                                                             "device": net.device}, net.plugin_manager),
                        batch_size=batch_size, progress=progress, desc="library sweep")
    readouts = {l: dict(zip(libs[l], fitted.readouts[l])) for l in libs}
    net.adopt_fitted({l: libs[l][chosen[l]] for l in libs}, {l: readouts[l][chosen[l]] for l in libs},
                     n_classes=fitted.n_classes, n_train=fitted.n_train, input_shape=fitted.input_shape)
    return _Sweep(grid, chosen, libs, readouts, fitted.n_train)


@dataclass
class _Evaluation:
    layers: dict[str, Any]
    answers: Tensor
    path: dict[str, Any]
    consistency: dict[str, Any]
    cpl: Tensor | None


def _evaluate(net: LibraryNetwork, sw: _Sweep, inp: _Inputs, top_k: int, cpl_top_k: int, batch_size: int,
              progress: bool | None) -> _Evaluation:
    """One pass over the test data: agreement of every library of the sweep, confusion index, CPL."""
    layers, n_test, y_test = inp.layers, inp.n_test, inp.y_test
    counts = {(l, t): [0, 0, 0] for l in layers for t in sw.grid[l]}
    conf = {l: ConfusionAccumulator(inp.n_classes) for l in layers}
    pred_parts: dict[str, list[Tensor]] = {l: [] for l in layers}
    cpl_parts, ans_parts, pair_parts = [], [], []
    for i in progress_bar(range(0, n_test, batch_size), "evaluate", progress):
        yb = None if y_test is None else y_test[i:i + batch_size]
        r = net.run(inp.x_test[i:i + batch_size])
        ans = r.answers.cpu()
        ans_parts.append(ans)
        for l in layers:
            for t in sw.grid[l]:
                p = sw.readouts[l][t].scores(sw.libs[l][t].similarity(r.haps[l]), top_k).cpu()
                for j, v in enumerate(agreement_counts(p, ans, yb)):
                    counts[(l, t)][j] += v or 0
                if t == sw.chosen[l]:
                    pred_parts[l].append(p.argmax(dim=1))
                    conf[l].update(p, yb if yb is not None else ans)
        if len(layers) >= 2:
            big = [p.cpu() for p in net.scores_from_haps(r.haps, cpl_top_k).values()]
            cpl_parts.append(cpl(big))
            s = nn.functional.normalize(stable_softmax(torch.stack(big, 1).double()), dim=2)
            pair_parts.append((s @ s.transpose(1, 2)).sum(0))
    answers = torch.cat(ans_parts)
    out: dict[str, Any] = {}
    for l in layers:
        rows = [{"theta": t, "size": sw.libs[l][t].size, "top1_agreement": counts[(l, t)][0] / n_test,
                 "top3_agreement": counts[(l, t)][1] / n_test,
                 "accuracy": counts[(l, t)][2] / n_test if y_test is not None else None} for t in sw.grid[l]]
        at = next(r for r in rows if r["theta"] == sw.chosen[l])
        ci = conf[l].result()
        out[l] = {"theta": sw.chosen[l], "size": at["size"], "hap_dim": int(sw.libs[l][sw.chosen[l]].dim),
                  "top1_agreement": at["top1_agreement"], "top3_agreement": at["top3_agreement"],
                  "accuracy": at["accuracy"], "sweep": rows, "confusion_index": ci, "most_confused": _most_confused(ci)}
    pred = {l: torch.cat(pred_parts[l]) for l in layers}
    path = _decision_path(layers, pred, answers, inp.n_classes, {l: out[l]["top1_agreement"] for l in layers})
    consistency: dict[str, Any] = {"top_k": cpl_top_k}
    cpl_all = None
    if cpl_parts:
        cpl_all = torch.cat(cpl_parts).float()
        consistency.update({"cpl": cpl_all, "mean": float(cpl_all.mean()),
                            "pairwise": (torch.stack(pair_parts).sum(0) / n_test).float(),
                            "pairwise_note": "mean cosine between two layers' softmax(P) over the test inputs"})
    return _Evaluation(out, answers, path, consistency, cpl_all)


def _calibrate_detector(net: LibraryNetwork, x_test: Tensor, fpr: float) -> dict[str, Any]:
    """A :class:`ConsistencyDetector` calibrated on half of the test data (all of it when too few), scoring all."""
    det = ConsistencyDetector(net, progress=False)
    n_test = int(x_test.shape[0])
    need = math.ceil(1.0 / fpr) - 1
    if n_test >= 2 * need:
        cal, held = torch.arange(0, n_test, 2), torch.arange(1, n_test, 2)
        note = "calibrated on the even-numbered test inputs; flagged rate measured on the odd-numbered ones"
    else:
        cal, held = torch.arange(n_test), torch.arange(n_test)
        note = (f"only {n_test} test inputs: calibrated and measured on all of them (at least {2 * need} give a "
                "held-out measurement)")
    try:
        det.calibrate(x_test[cal], fpr=fpr)
    except ValueError as exc:
        return {"method": det.method, "fpr": fpr, "error": str(exc)}
    scores = det.score(x_test).cpu().float()
    return {"method": det.method, "fpr": fpr, "threshold": det.threshold_, "scores": scores,
            "calibration_inputs": int(cal.numel()), "flagged": (scores > det.threshold_).nonzero().flatten().tolist(),
            "flagged_rate_held_out": float((scores[held] > det.threshold_).float().mean()), "note": note}


def _sample(net: LibraryNetwork, train: Any, inp: _Inputs, ev: _Evaluation, detector: Mapping[str, Any],
            sample: int, indices: Sequence[int], top_k: int, n_exemplars: int,
            batch_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The least / most consistent test inputs (and the named ones): each layer's top-3 classes and exemplars."""
    n_test, layers, x_test = inp.n_test, inp.layers, inp.x_test
    order = torch.argsort(ev.cpl) if ev.cpl is not None else torch.arange(n_test)
    k = min(sample, n_test)
    picks: list[tuple[int, str]] = [(int(i), "least consistent") for i in order[:k]]
    picks += [(int(i), "most consistent") for i in order.flip(0)[:k] if int(i) not in {p for p, _ in picks}]
    picks += [(int(i) % n_test, "named") for i in indices if int(i) % n_test not in {p for p, _ in picks}]
    idx = torch.tensor([p for p, _ in picks], dtype=torch.long)
    r = net.run(x_test[idx])
    scores = net.scores_from_haps(r.haps, top_k)
    ex_idx, ex_sim = net.exemplars_from_haps(r.haps, n_exemplars)
    samples = []
    for j, (i, why) in enumerate(picks):
        per_layer = {}
        for l in layers:
            vals, cls = scores[l][j].topk(min(3, inp.n_classes))
            per_layer[l] = {"top3": [{"class": int(c), "evidence": float(v)} for c, v in zip(cls, vals)],
                            "exemplars": ex_idx[l][j].tolist(), "similarities": ex_sim[l][j].tolist()}
        entry = {"index": i, "why": why, "label": None if inp.y_test is None else int(inp.y_test[i]),
                 "model_answer": int(ev.answers[i]), "cpl": None if ev.cpl is None else float(ev.cpl[i]),
                 "detector_score": float(detector["scores"][i]) if "scores" in detector else None,
                 "flagged": (i in detector.get("flagged", ())), "layers": per_layer}
        if not x_test.is_floating_point():
            entry["token_ids"] = x_test[i].flatten()[:32].tolist()
        samples.append(entry)
    images: dict[str, Any] = {}
    if x_test.is_floating_point() and _is_image(tuple(x_test.shape[1:])):
        rows = _rows_at(train, [int(t) for l in layers for t in ex_idx[l].flatten()], batch_size)
        if rows is not None:
            parts, off = {}, 0
            for l in layers:
                n_l = ex_idx[l].numel()
                thumbs = _thumbnails(rows[off:off + n_l])
                parts[l] = thumbs.reshape(ex_idx[l].shape[0], ex_idx[l].shape[1], *thumbs.shape[1:])
                off += n_l
            images = {"queries": _thumbnails(x_test[idx]), "exemplars": parts}
    return samples, images


# ---------------------------------------------------------------------------------------------- inspect
@dataclass(frozen=True)
class InspectOptions:
    """The settings of :func:`inspect` beyond the model, the data, the layers and the thresholds.

    Each is also a keyword of :func:`inspect` (``inspect(model, train, top_k=5)``), which starts from
    ``options`` (default: these defaults) and replaces the settings it names.

    Attributes:
        top_k: library nodes behind each layer's prediction (Eq. 3).
        cpl_top_k: library nodes behind the evidence that CPL compares (the paper's 20).
        fpr: false-positive rate of the detector's threshold.
        sweep: thetas of the library-size sweep (one list for all layers, or per layer); default
            :func:`sweep_thetas` around each chosen theta; ``False`` or ``()``: no sweep (the chosen theta
            only).
        n_layers: how many layers the default layer choice spreads over (see ``layers`` of :func:`inspect`).
        sample: how many of the least and of the most consistent test inputs to show.
        indices: test inputs to show as well, by index.
        n_exemplars: training inputs shown per layer behind each sampled input.
        batch_size / device / progress: as for :class:`LibraryNetwork`.
        auto_thresholds: options of :func:`libnet_plugin.thresholds.choose_thresholds` for the layers whose
            theta is ``"auto"`` (with none of them, it raises :class:`InspectionError`).
        log: where to print the stages and the layer choice (default: silent).

    Example:
        >>> InspectOptions(top_k=5).fpr
        0.05
    """

    top_k: int = 3
    cpl_top_k: int = 20
    fpr: float = 0.05
    sweep: Sequence[float] | Mapping[str, Sequence[float]] | bool | None = None
    n_layers: int = DEFAULT_N_LAYERS
    sample: int = 3
    indices: Sequence[int] = ()
    n_exemplars: int = 3
    batch_size: int = 256
    device: Any = None
    auto_thresholds: Mapping[str, Any] | None = None
    progress: bool | None = None
    log: Any = None


def _inspect_options(options: InspectOptions | None, settings: Mapping[str, Any]) -> InspectOptions:
    """``options`` with the keyword ``settings`` of :func:`inspect` in place (``TypeError`` for other names)."""
    if options is not None and not isinstance(options, InspectOptions):
        raise TypeError(f"options must be an InspectOptions, got {type(options).__name__}")
    unknown = sorted(set(settings) - set(InspectOptions.__dataclass_fields__))
    if unknown:
        raise TypeError(f"inspect() got unexpected keyword arguments {unknown}; its settings are "
                        f"{list(InspectOptions.__dataclass_fields__)}")
    return dataclasses.replace(options or InspectOptions(), **settings)


def inspect(model: Any, train: Any, test: Any = None, layers: Sequence[str] | None = None,
            thresholds: Any = "auto", *, options: InspectOptions | None = None, **settings: Any) -> InspectionReport:
    """Fit library networks on ``train`` and measure, on ``test``, how the model's layers reach its decisions.

    Args:
        model: a trained classifier: ``nn.Module``, or an ONNX model with the ONNX adapter installed.
        train: training inputs (anything :meth:`LibraryNetwork.fit` takes; re-iterable); labels are checked
            but not used (the libraries follow the model's own answers).
        test: test inputs, with labels for accuracies and the confusion index on true classes (default: the
            training data, which flatters every number; the report says so).
        layers: layers to probe, in order; default (torch models): the leaf modules holding a weight matrix or
            kernel, in forward order (:func:`probeable_layers`), ``n_layers`` of them evenly spaced with the
            first and last (:func:`spread`).
        thresholds: ``"auto"`` (each layer's theta chosen from the data, about 10% of the training inputs as
            nodes), a number, or ``{layer: theta}`` (layers not named are ``"auto"``).
        options: an :class:`InspectOptions` (default: its defaults).
        **settings: any :class:`InspectOptions` field by name (``top_k``, ``cpl_top_k``, ``fpr``, ``sweep``,
            ``n_layers``, ``sample``, ``indices``, ``n_exemplars``, ``batch_size``, ``device``,
            ``auto_thresholds``, ``progress``, ``log``), replacing that of ``options``.

    Returns:
        An :class:`InspectionReport`.

    Raises:
        InspectionError: data whose shape the model refuses, labels out of range, unknown layers or
            thresholds, named indices out of range: found before the long work.
        TypeError: a keyword that is not an :class:`InspectOptions` field.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> report = lnp.inspect(model, torch.randn(60, 4), layers=["0", "2"], thresholds=0.9, sweep=())
        >>> sorted(report.to_dict())[:3]
        ['consistency', 'decision_path', 'detector']
    """
    opts = _inspect_options(options, settings)
    top_k, cpl_top_k, fpr, batch_size, device = opts.top_k, opts.cpl_top_k, opts.fpr, opts.batch_size, opts.device
    auto_thresholds, progress, log = opts.auto_thresholds, opts.progress, opts.log
    sweep, sample, indices, n_exemplars = opts.sweep, opts.sample, opts.indices, opts.n_exemplars
    n_layers = opts.n_layers
    say = log or (lambda _msg: None)
    timer = _Timer(say)
    timer.start("checks")
    inp = _check_inputs(model, train, test, layers, indices, n_layers, batch_size, device)
    layers = inp.layers
    say(f"layers: {layers} ({inp.layer_choice})")
    given, auto = _thresholds(thresholds, layers)
    if auto_thresholds is not None and not auto:
        raise InspectionError(f"auto_thresholds={auto_thresholds!r} sets how thresholds='auto' chooses theta, but "
                              f"thresholds={thresholds!r} gives every layer's theta: drop one of them")
    net = LibraryNetwork(model, layers, thresholds="auto", top_k=top_k, device=device, batch_size=batch_size,
                         auto_thresholds=auto_thresholds)
    timer.stop()

    chosen = dict(given)
    auto_report: dict[str, Any] = {}
    if auto:
        timer.start("choose thresholds")
        thetas, auto_report = choose_thresholds(net.probe, train, net.new_library, layers=auto,
                                                batch_size=batch_size, **dict(auto_thresholds or {}))
        chosen.update(thetas)
        timer.stop()
    chosen = {l: round(float(chosen[l]), 6) for l in layers}
    timer.start("fit libraries")
    sw = _fit_sweep(net, train, _grid(sweep, chosen), chosen, batch_size, progress)
    timer.stop()
    timer.start("evaluate")
    ev = _evaluate(net, sw, inp, top_k, cpl_top_k, batch_size, progress)
    for l in layers:
        ev.layers[l]["auto"] = auto_report.get(l)
    timer.stop()
    timer.start("detector")
    detector = _calibrate_detector(net, inp.x_test, fpr)
    timer.stop()
    timer.start("sample")
    samples, images = _sample(net, train, inp, ev, detector, sample, indices, top_k, n_exemplars, batch_size)
    timer.stop()

    settings = {"layers": layers, "layer_choice": inp.layer_choice, "candidate_layers": inp.candidates,
                "thresholds": thresholds if isinstance(thresholds, (str, int, float)) else dict(thresholds),
                "thresholds_chosen": chosen, "auto_layers": auto, "sweep": sw.grid, "top_k": top_k,
                "cpl_top_k": cpl_top_k, "fpr": fpr, "batch_size": batch_size, "device": str(net.device),
                "n_train": sw.n_train, "n_test": inp.n_test, "test_is_train": inp.test_is_train,
                "labels": inp.y_test is not None, "n_classes": inp.n_classes,
                "input_shape": list(inp.x_test.shape[1:]),
                "confusion_basis": "true labels" if inp.y_test is not None else "the model's answers (no labels)",
                "thumbnails": bool(images),
                "model": type(model).__name__ if isinstance(model, nn.Module) else str(model)}
    versions = {"python": sys.version.split()[0], "libnet_plugin": __version__, "torch": torch.__version__,
                "numpy": np.__version__, "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    timings = dict(timer.seconds, total=round(time.perf_counter() - timer.t0, 3))
    model_accuracy = None if inp.y_test is None else float((ev.answers == inp.y_test).float().mean())
    data = {"settings": settings, "versions": versions, "timings": timings, "model_accuracy": model_accuracy,
            "layers": ev.layers, "decision_path": ev.path, "consistency": ev.consistency, "detector": detector,
            "samples": samples}
    return InspectionReport(data=_jsonable(data), images=images)
