"""Dataset-independent machinery of the paper's experiments (MNIST, CIFAR-10).

The experiments of METHOD.md sections 4-9 all follow the same recipe, and this module holds every step
that does not depend on the data set, so that ``mnist.py`` (and the CIFAR-10 reproduction) only say
*which* layers, thresholds, epsilons and data to use:

1. :func:`fit_library_sweep` fits one library and one Hebbian readout for *every* threshold of every
   layer from the same forward passes (two passes over the training data in all, or one when the
   activations fit ``cache_bytes``), instead of one :class:`~libnet_plugin.LibraryNetwork` per theta.
2. :func:`compute_evidence` runs the model once over an evaluation set and keeps, for each requested
   ``(layer, theta, top_k)``, only the per-layer evidence ``P`` (Eq. 3, ``[N, C]``), so that
   agreement, confusion index and CPL for all thresholds come from one pass per set.
3. :func:`agreement_table`, :func:`confusion_indices`, :func:`cpl_from_evidence` and
   :func:`detection_metrics` turn evidence into the paper's numbers (METHOD.md sections 4-6).
4. :func:`generate_attack_sets` runs both attack protocols of METHOD.md section 9 through
   :mod:`libnet_plugin.attacks`, and :func:`evaluate_protocol` scores them with CPL per threshold set;
   :func:`save_attack_sets` / :func:`load_attack_sets` keep attacked inputs in one safetensors file
   (so a model without autograd, e.g. ONNX, can be evaluated on them).
5. :class:`StageTimer` times the stages; :func:`write_json_atomic` / :func:`write_text_atomic` write the
   report so that an interrupted run never leaves a half-written file; :func:`markdown_table` and
   :func:`to_jsonable` help render it.

Thresholds are used as dictionary keys throughout; they are canonicalised with :func:`theta_key`
(rounded to 6 decimals) so that ``0.1 + 0.2`` and ``0.3`` name the same library.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from libnet_plugin.plugins import make_probe
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    >>> probe = make_probe(model, ["0", "2"], "cpu")
    >>> x = torch.randn(200, 6)
    >>> sweep = fit_library_sweep(probe, x, {"0": [0.6, 0.8], "2": [0.9]}, progress=False)
    >>> sweep.sizes()["0"][0.6] <= sweep.sizes()["0"][0.8]
    True
    >>> ev = compute_evidence(sweep, probe, x[:50], [("0", 0.8, 3), ("2", 0.9, 3)], progress=False)
    >>> ev.get("2", 0.9, 3).shape
    torch.Size([50, 3])
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .._batches import iter_batches, progress_bar
from ..errors import LibnetError, SaveFormatError, ShapeMismatchError
from ..library import validate_threshold
from ..metrics import ConfusionAccumulator, agreement_counts, auroc, cpl, tpr_at_fpr
from ..network import stream_fit
from ..plugins import make_library, make_readout
from ..serialization import atomic_write_bytes, load_checked, save_atomic

__all__ = [
    "PROTOCOLS",
    "theta_key",
    "theta_grid",
    "StageTimer",
    "LibrarySweep",
    "fit_library_sweep",
    "Evidence",
    "compute_evidence",
    "agreement",
    "agreement_table",
    "confusion_indices",
    "cpl_from_evidence",
    "cpl_requests",
    "detection_metrics",
    "ProtocolSettings",
    "AttackSet",
    "generate_attack_sets",
    "check_pgd_backends",
    "save_attack_sets",
    "load_attack_sets",
    "attacked_evidence",
    "evaluate_protocol",
    "detector_comparison",
    "to_model_space",
    "resolve_device",
    "ensure_writable_dir",
    "to_jsonable",
    "write_json_atomic",
    "write_text_atomic",
    "markdown_table",
    "environment_info",
    "ExperimentError",
]

#: The two attack protocols of METHOD.md section 9.
PROTOCOLS: tuple[str, str] = ("paper", "standard")

#: Key under which a request for evidence is stored: ``(layer, theta, top_k)``.
EvidenceKey = tuple[str, float, int]


# ---------------------------------------------------------------------------------------------------
# thresholds and timing
# ---------------------------------------------------------------------------------------------------


def theta_key(theta: float) -> float:
    """Canonical form of a threshold used as a dictionary key (checked to lie in (0, 1], rounded).

    Example:
        >>> theta_key(0.1 + 0.2) == theta_key(0.3)
        True
    """
    return round(validate_threshold(theta), 6)


def theta_grid(start: float, stop: float, step: float) -> list[float]:
    """Thresholds ``start, start + step, ..., stop`` (both ends included), canonicalised.

    Args:
        start: first threshold, in (0, 1].
        stop: last threshold, ``>= start``, in (0, 1].
        step: positive spacing; ``stop - start`` must be a whole number of steps (to 1e-6).

    Returns:
        The list of thresholds.

    Example:
        >>> theta_grid(0.4, 0.8, 0.05)
        [0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
    """
    if not step > 0:
        raise ValueError(f"step must be positive, got {step!r}")
    if stop < start:
        raise ValueError(f"stop ({stop}) must not be below start ({start})")
    n = (stop - start) / step
    if abs(n - round(n)) > 1e-6:
        raise ValueError(f"the range {start}..{stop} is not a whole number of steps of {step}")
    return [theta_key(start + i * step) for i in range(int(round(n)) + 1)]


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


# ---------------------------------------------------------------------------------------------------
# library sweeps
# ---------------------------------------------------------------------------------------------------


@dataclass
class LibrarySweep:
    """Libraries and Hebbian readouts for several thresholds per layer, built from the same passes.

    Made by :func:`fit_library_sweep`. ``libraries[layer][theta]`` and ``readouts[layer][theta]`` are
    the objects served by the ``libnet_library`` / ``libnet_readout`` hooks (``ExactLibrary`` and
    ``HebbianReadout`` by default), exactly as a :class:`~libnet_plugin.LibraryNetwork` fitted with
    that threshold would hold them.

    Attributes:
        layers: probed layers, in order.
        thresholds: ``{layer: [theta, ...]}`` (canonical, sorted).
        libraries: ``{layer: {theta: library}}``.
        readouts: ``{layer: {theta: readout}}``.
        n_train: number of training inputs visited.
        n_classes: number of classes of the model's output.
        input_shape: per-input shape of the training data.
        hap_dims: ``{layer: HAP size}``.
        train_answers: the model's answers on the training inputs, ``LongTensor[n_train]``.
    """

    layers: list[str]
    thresholds: dict[str, list[float]]
    libraries: dict[str, dict[float, Any]]
    readouts: dict[str, dict[float, Any]]
    n_train: int
    n_classes: int
    input_shape: tuple[int, ...]
    hap_dims: dict[str, int]
    train_answers: Tensor

    def _check(self, layer: str, theta: float) -> float:
        if layer not in self.libraries:
            raise KeyError(f"layer {layer!r} is not part of this sweep; layers: {self.layers}")
        key = theta_key(theta)
        if key not in self.libraries[layer]:
            raise KeyError(f"threshold {theta} was not fitted for layer {layer!r}; fitted: {self.thresholds[layer]}")
        return key

    def library(self, layer: str, theta: float) -> Any:
        """The library of ``layer`` at ``theta`` (``KeyError`` naming the fitted ones otherwise)."""
        key = self._check(layer, theta)
        return self.libraries[layer][key]

    def readout(self, layer: str, theta: float) -> Any:
        """The readout of ``layer`` at ``theta``."""
        key = self._check(layer, theta)
        return self.readouts[layer][key]

    def sizes(self) -> dict[str, dict[float, int]]:
        """``{layer: {theta: number of library nodes}}``."""
        return {l: {t: lib.size for t, lib in libs.items()} for l, libs in self.libraries.items()}

    def scores(self, haps: Mapping[str, Tensor], requests: Iterable[EvidenceKey]) -> dict[EvidenceKey, Tensor]:
        """Eq. 3 evidence for each ``(layer, theta, top_k)`` request from one batch of HAPs.

        The library output ``h`` is computed once per ``(layer, theta)`` and shared by all ``top_k``.

        Returns:
            ``{(layer, theta, top_k): Tensor[B, C]}`` with canonical thetas.
        """
        grouped: dict[tuple[str, float], list[int]] = defaultdict(list)
        for layer, theta, k in requests:
            grouped[(layer, self._check(layer, theta))].append(int(k))
        out: dict[EvidenceKey, Tensor] = {}
        for (layer, theta), ks in grouped.items():
            h = self.libraries[layer][theta].similarity(haps[layer])
            for k in sorted(set(ks)):
                out[(layer, theta, k)] = self.readouts[layer][theta].scores(h, k)
        return out

    def exemplars(self, haps: Mapping[str, Tensor], layer: str, theta: float, k: int = 3) -> tuple[Tensor, Tensor]:
        """Training inputs behind the ``k`` nodes most similar to each input (METHOD.md section 2).

        Returns:
            ``(indices, cosines)``, both ``[B, min(k, size)]``: indices into the training data in the
            order the sweep visited it, most similar first.
        """
        lib = self.library(layer, theta)
        h = lib.similarity(haps[layer])
        vals, top = h.topk(min(int(k), h.shape[1]), dim=1)
        return lib.node_indices.to(top.device)[top], vals

    def to_network(self, model: Any, thresholds: Mapping[str, float], top_k: int = 3, device: Any = None) -> Any:
        """A fitted :class:`~libnet_plugin.LibraryNetwork` made of this sweep's libraries (no refit).

        Args:
            model: the model the sweep was fitted on (torch module, or an ONNX model with the adapter).
            thresholds: one fitted threshold per layer, e.g. a CPL threshold set.
            top_k: the network's default ``top_k``.
            device: the network's device (default: as :class:`~libnet_plugin.LibraryNetwork` decides).

        Returns:
            A ``LibraryNetwork`` whose ``libraries_`` / ``readouts_`` are the sweep's objects (shared,
            not copied), ready for ``predict_scores``, ``consistency``, ``save`` and detectors.
        """
        from ..network import LibraryNetwork

        missing = [l for l in self.layers if l not in thresholds]
        if missing:
            raise ValueError(f"thresholds must give one value per layer {self.layers}; missing {missing}")
        thr = {l: self._check(l, thresholds[l]) for l in self.layers}
        net = LibraryNetwork(model, self.layers, thresholds=thr, top_k=top_k, device=device)
        return net.adopt_fitted({l: self.libraries[l][thr[l]] for l in self.layers},
                                {l: self.readouts[l][thr[l]] for l in self.layers},
                                n_classes=self.n_classes, n_train=self.n_train, input_shape=self.input_shape)


def fit_library_sweep(probe: Any, train: Any, thresholds: Mapping[str, Sequence[float]], *,
                      library: str = "exact", readout: str = "hebbian",
                      library_options: Mapping[str, Any] | None = None,
                      readout_options: Mapping[str, Any] | None = None,
                      batch_size: int = 256, device: Any = None, cache_bytes: int = 512 * 2**20,
                      progress: bool | None = None, plugin_manager: Any = None) -> LibrarySweep:
    """Fit one library and one Hebbian readout per ``(layer, theta)`` from shared forward passes.

    Pass 1 runs the model over the training data once and feeds every batch of HAPs to all libraries
    of that layer; pass 2 (after the libraries are complete, METHOD.md section 3) accumulates the
    readouts, from cached HAPs when they fit ``cache_bytes`` and from a second forward pass otherwise.
    The result is the same as fitting one :class:`~libnet_plugin.LibraryNetwork` per threshold.

    Args:
        probe: a layer probe (``probe.run(x) -> ProbeResult``), e.g. from
            :func:`libnet_plugin.plugins.make_probe` or ``LibraryNetwork(...).probe``.
        train: the training inputs in visiting order (Tensor, ``(X, y)``, Dataset, DataLoader or a
            re-iterable of batches), in the space the probed model expects.
        thresholds: ``{layer: [theta, ...]}``; every probed layer needs at least one theta.
        library / readout: kinds served by the hooks (``"exact"``, ``"hebbian"``).
        library_options / readout_options: extra settings passed to every library / readout.
        batch_size: batch size for Tensor data.
        device: where libraries live (default: the probe's device, else CPU).
        cache_bytes: budget for keeping pass 1's HAPs for pass 2.
        progress: tqdm bars (``None``: only on a terminal).
        plugin_manager: plugin manager for the hooks (default: the process-wide one).

    Returns:
        A :class:`LibrarySweep`.

    Raises:
        ValueError: empty thresholds for a layer, a layer the probe does not probe, or empty data.
    """
    layers = list(probe.layers)
    unknown = [l for l in thresholds if l not in layers]
    if unknown:
        raise ValueError(f"thresholds name layers the probe does not probe: {unknown}; probed: {layers}")
    thr = {l: sorted({theta_key(t) for t in thresholds.get(l, ())}) for l in layers}
    empty = [l for l, ts in thr.items() if not ts]
    if empty:
        raise ValueError(f"every probed layer needs at least one threshold; none given for {empty}")
    device = torch.device(device) if device is not None else getattr(probe, "device", torch.device("cpu"))
    lib_opts, ro_opts = dict(library_options or {}), dict(readout_options or {})
    libs: dict[str, dict[float, Any]] = {
        l: {t: make_library(library, {**lib_opts, "threshold": t, "device": device, "layer": l}, plugin_manager)
            for t in ts} for l, ts in thr.items()}
    fitted = stream_fit(probe, train, {l: list(libs[l].values()) for l in layers},
                        lambda c: make_readout(readout, {**ro_opts, "n_classes": c, "device": device}, plugin_manager),
                        batch_size=batch_size, cache_bytes=cache_bytes, progress=progress, desc="library sweep")
    readouts = {l: dict(zip(libs[l], fitted.readouts[l])) for l in layers}
    n, n_classes, input_shape, train_answers = fitted.n_train, fitted.n_classes, fitted.input_shape, fitted.answers
    hap_dims = {l: int(next(iter(libs[l].values())).dim) for l in layers}
    return LibrarySweep(layers=layers, thresholds=thr, libraries=libs, readouts=readouts, n_train=n,
                        n_classes=n_classes, input_shape=input_shape, hap_dims=hap_dims, train_answers=train_answers)


# ---------------------------------------------------------------------------------------------------
# evidence and the paper's numbers
# ---------------------------------------------------------------------------------------------------


@dataclass
class Evidence:
    """What one pass of the model over an evaluation set leaves: outputs and per-layer evidence.

    Attributes:
        outputs: the model's outputs ``[N, C]``.
        labels: true labels ``LongTensor[N]``, or ``None``.
        scores: ``{(layer, theta, top_k): Tensor[N, C]}`` (Eq. 3, canonical thetas).
    """

    outputs: Tensor
    labels: Tensor | None
    scores: dict[EvidenceKey, Tensor] = field(default_factory=dict)

    @property
    def answers(self) -> Tensor:
        """The model's answers ``LongTensor[N]``."""
        return self.outputs.argmax(dim=1)

    def __len__(self) -> int:
        return int(self.outputs.shape[0])

    def get(self, layer: str, theta: float, top_k: int) -> Tensor:
        """Evidence ``[N, C]`` of ``layer`` at ``theta`` with ``top_k`` nodes."""
        key = (layer, theta_key(theta), int(top_k))
        if key not in self.scores:
            raise KeyError(f"no evidence for layer {layer!r}, theta {theta}, top_k {top_k}; computed: "
                           f"{sorted(self.scores)[:12]}")
        return self.scores[key]

    def subset(self, mask: Tensor) -> "Evidence":
        """The evidence of the inputs selected by a boolean mask or an index tensor."""
        mask = mask.to(self.outputs.device)
        return Evidence(outputs=self.outputs[mask], labels=None if self.labels is None else self.labels[mask],
                        scores={k: v[mask] for k, v in self.scores.items()})


def compute_evidence(sweep: LibrarySweep, probe: Any, x: Any, requests: Iterable[EvidenceKey], *,
                     labels: Tensor | None = None, batch_size: int = 256, progress: bool | None = None,
                     desc: str = "evidence") -> Evidence:
    """Run the model once over ``x`` and keep the evidence of each requested ``(layer, theta, top_k)``.

    Args:
        sweep: the fitted libraries.
        probe: the probe the sweep was fitted with (or one of an equivalent model, e.g. its ONNX export).
        x: inputs in the probed model's input space (Tensor, ``(X, y)``, or any data
            :func:`libnet_plugin._batches.iter_batches` reads; labels found in batches are kept).
        requests: ``(layer, theta, top_k)`` triples.
        labels: true labels of a Tensor ``x`` (overrides labels found in the batches).
        batch_size: batch size for Tensor data.
        progress: tqdm bar (``None``: only on a terminal).
        desc: the bar's label.

    Returns:
        An :class:`Evidence`.
    """
    requests = [(l, theta_key(t), int(k)) for l, t, k in requests]
    outputs: list[Tensor] = []
    ys: list[Tensor] = []
    parts: dict[EvidenceKey, list[Tensor]] = defaultdict(list)
    for xb, yb in progress_bar(iter_batches(x, batch_size), desc, progress):
        if xb.shape[0] == 0:
            continue
        res = probe.run(xb)
        outputs.append(res.outputs.float().cpu())
        if yb is not None:
            ys.append(yb.cpu())
        for key, p in sweep.scores(res.haps, requests).items():
            parts[key].append(p.cpu())
    if not outputs:
        raise ValueError(f"{desc}: received no inputs (empty data)")
    out = torch.cat(outputs)
    if labels is None and ys:
        labels = torch.cat(ys)
    if labels is not None:
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (out.shape[0],):
            raise ShapeMismatchError(f"{desc}: {out.shape[0]} inputs but labels of shape {tuple(labels.shape)}")
    return Evidence(outputs=out, labels=labels, scores={k: torch.cat(v) for k, v in parts.items()})


def agreement(p: Tensor, answers: Tensor, labels: Tensor | None = None) -> dict[str, float]:
    """Top-1 / top-3 agreement of evidence ``p`` ``[N, C]`` with the model's answers (METHOD.md section 4).

    Returns:
        ``{"top1_agreement", "top3_agreement", "accuracy", "n"}``; ``accuracy`` (argmax P against the
        true labels) is NaN without labels.

    Example:
        >>> p = torch.tensor([[3., 2., 1., 0.], [0., 1., 2., 3.]])
        >>> agreement(p, torch.tensor([0, 1]), torch.tensor([0, 0]))
        {'top1_agreement': 0.5, 'top3_agreement': 1.0, 'accuracy': 0.5, 'n': 2}
    """
    n = int(p.shape[0])
    if n == 0:
        raise ValueError("agreement needs at least one input")
    top1, top3, correct = agreement_counts(p, answers, labels)
    return {"top1_agreement": top1 / n, "top3_agreement": top3 / n,
            "accuracy": float("nan") if correct is None else correct / n, "n": n}


def agreement_table(sweep: LibrarySweep, evidence: Evidence, top_k: int = 3,
                    thresholds: Mapping[str, Sequence[float]] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Library size and agreement per layer and threshold (the paper's Fig. 2A-C, or 4A-C).

    Args:
        sweep: the fitted libraries.
        evidence: evidence of the test inputs with ``top_k`` for every threshold tabulated.
        top_k: nodes per prediction.
        thresholds: ``{layer: [theta, ...]}`` to tabulate (default: every threshold of the sweep).

    Returns:
        ``{layer: [{"theta", "size", "top1_agreement", "top3_agreement", "accuracy", "n"}, ...]}``,
        thresholds ascending.
    """
    table: dict[str, list[dict[str, Any]]] = {}
    for l in sweep.layers if thresholds is None else list(thresholds):
        rows = []
        for t in sweep.thresholds[l] if thresholds is None else sorted(theta_key(x) for x in thresholds[l]):
            rows.append({"theta": t, "size": sweep.libraries[l][t].size,
                         **agreement(evidence.get(l, t, top_k), evidence.answers, evidence.labels)})
        table[l] = rows
    return table


def confusion_indices(evidence: Evidence, layers: Sequence[str], theta: float, top_k: int = 3) -> dict[str, Tensor]:
    """Confusion index (Eq. 4) per layer at one threshold, from evidence with labels.

    Returns:
        ``{layer: Tensor[C, C]}``: row d1 (true class), column d2; diagonal 0; NaN rows for classes
        with no correctly predicted input (see :class:`libnet_plugin.metrics.ConfusionAccumulator`).
    """
    if evidence.labels is None:
        raise ValueError("the confusion index needs labels; compute the evidence with labels=")
    out = {}
    for l in layers:
        p = evidence.get(l, theta, top_k)
        acc = ConfusionAccumulator(p.shape[1])
        acc.update(p, evidence.labels)
        out[l] = acc.result()
    return out


def cpl_from_evidence(evidence: Evidence, thresholds: Mapping[str, float], top_k: int = 20) -> Tensor:
    """CPL (Eq. 5) of every input for one threshold set ``{layer: theta}`` (``Tensor[N]``, low = suspicious)."""
    return cpl({l: evidence.get(l, t, top_k) for l, t in thresholds.items()})


def cpl_requests(cpl_sets: Mapping[str, Mapping[str, float]], top_k: int) -> list[EvidenceKey]:
    """The evidence requests CPL needs: every ``(layer, theta)`` of any threshold set, at ``top_k``.

    Example:
        >>> cpl_requests({"S1": {"a": 0.5, "b": 0.6}, "S2": {"a": 0.5, "b": 0.7}}, 20)
        [('a', 0.5, 20), ('b', 0.6, 20), ('b', 0.7, 20)]
    """
    return sorted({(l, theta_key(t), int(top_k)) for thr in cpl_sets.values() for l, t in thr.items()})


def detection_metrics(clean_cpl: Tensor, attacked_cpl: Tensor, fpr: float = 0.05) -> dict[str, Any]:
    """AUROC and TPR at ``fpr`` of flagging attacked inputs by low CPL (score ``1 - CPL``).

    Returns:
        ``{"auroc", "tpr_at_fpr", "fpr", "n_clean", "n_attacked", "clean_cpl_mean", "attacked_cpl_mean"}``;
        metrics are NaN when either side is empty.

    Example:
        >>> m = detection_metrics(torch.tensor([.9, .8, .95]), torch.tensor([.1, .85]))
        >>> round(m["auroc"], 3), m["n_attacked"]
        (0.833, 2)
    """
    c = 1.0 - torch.as_tensor(clean_cpl).double().cpu()
    a = 1.0 - torch.as_tensor(attacked_cpl).double().cpu()
    mean = lambda t: float(1.0 - t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {"auroc": auroc(c, a), "tpr_at_fpr": tpr_at_fpr(c, a, fpr), "fpr": fpr, "n_clean": int(c.numel()),
            "n_attacked": int(a.numel()), "clean_cpl_mean": mean(c), "attacked_cpl_mean": mean(a)}


# ---------------------------------------------------------------------------------------------------
# attacks
# ---------------------------------------------------------------------------------------------------


@dataclass
class ProtocolSettings:
    """One attack protocol of METHOD.md section 9.

    Attributes:
        name: ``"paper"`` (advertorch PGD on normalised tensors clipped to [0, 1], every attacked input
            used, epsilon in normalised units) or ``"standard"`` (PGD in [0, 1] pixel space with the
            normalisation inside the model, only correctly classified inputs whose attack succeeds).
        epsilons: the L-inf budgets.
        n_images: the first ``n_images`` test images are attacked.
        nb_iter: PGD steps (40 in both protocols).
        seed: seed of the random start (the seed paper used 1).
        backend: ``"advertorch"`` (``LinfPGDAttack`` through the compatibility module), ``"torch"`` (the
            project's own PGD, the same result from the same seed) or ``"auto"``.
    """

    name: str
    epsilons: list[float]
    n_images: int
    nb_iter: int = 40
    seed: int = 1
    backend: str = "advertorch"

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ValueError(f"epsilons must be positive numbers, got {self.epsilons!r}")
        if int(self.n_images) < 1 or int(self.nb_iter) < 1:
            raise ValueError(f"n_images and nb_iter must be positive, got {self.n_images}, {self.nb_iter}")
        if self.backend not in ("advertorch", "torch", "auto"):
            raise ValueError(f"backend must be 'advertorch', 'torch' or 'auto', got {self.backend!r}")
        self.epsilons = [round(float(e), 6) for e in self.epsilons]

    def step(self, eps: float) -> float:
        """The PGD step size at ``eps``: 0.01 (paper protocol) or ``2.5 * eps / nb_iter`` (standard)."""
        return 0.01 if self.name == "paper" else 2.5 * eps / self.nb_iter

    @property
    def space(self) -> str:
        """Where the attacked tensors live: ``"normalized"`` (paper) or ``"pixels"`` (standard)."""
        return "normalized" if self.name == "paper" else "pixels"

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for reports)."""
        return {"protocol": self.name, "epsilons": self.epsilons, "n_images": self.n_images,
                "nb_iter": self.nb_iter, "step": "0.01" if self.name == "paper" else "2.5 * eps / nb_iter",
                "seed": self.seed, "backend": self.backend, "space": self.space,
                "random_start": True, "loss": "cross-entropy (sum over the batch)"}


@dataclass
class AttackSet:
    """Attacked versions of some test inputs at one epsilon of one protocol.

    Attributes:
        protocol: ``"paper"`` or ``"standard"``.
        epsilon: the L-inf budget (normalised units for the paper protocol, pixels for the standard one).
        x_adv: attacked inputs, in ``space``.
        space: ``"normalized"`` or ``"pixels"``.
        indices: positions of the attacked inputs in the test set, ``LongTensor[N]``.
    """

    protocol: str
    epsilon: float
    x_adv: Tensor
    space: str
    indices: Tensor


def to_model_space(x: Tensor, space: str, model_space: str, mean: Any, std: Any) -> Tensor:
    """Convert inputs between pixel space ([0, 1]) and normalised space ``(x - mean) / std``.

    Args:
        x: inputs ``[N, C, ...]``.
        space / model_space: ``"pixels"`` or ``"normalized"``: where ``x`` lives, where it must go.
        mean / std: per-channel statistics (numbers or sequences).
    """
    for s in (space, model_space):
        if s not in ("pixels", "normalized"):
            raise ValueError(f"space must be 'pixels' or 'normalized', got {s!r}")
    if space == model_space:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - m) / s if model_space == "normalized" else x * s + m


def generate_attack_sets(protocol: ProtocolSettings, model: torch.nn.Module, x_pixels: Tensor, y: Tensor, *,
                         mean: Any, std: Any, progress: bool | None = None) -> list[AttackSet]:
    """Attack the first ``protocol.n_images`` test inputs at every epsilon of one protocol.

    Uses :func:`libnet_plugin.attacks.attack_paper_protocol` or
    :func:`libnet_plugin.attacks.attack_standard_protocol` (advertorch's ``LinfPGDAttack`` through the
    project's compatibility module by default). Every attacked input is returned; the standard
    protocol's selection (correct on clean, attack succeeded) is made at evaluation time from the
    answers of the model being evaluated (:func:`evaluate_protocol`).

    Args:
        protocol: the protocol's settings.
        model: the torch net taking *normalised* inputs (the seed's convention); the standard protocol
            puts a :class:`~libnet_plugin.models.Normalize` in front of it so that it is attacked in
            pixel space.
        x_pixels: test images in [0, 1], ``[N, C, H, W]`` (moved to the model's device).
        y: their labels.
        mean / std: the normalisation of ``model``'s inputs.
        progress: tqdm bar over epsilons (``None``: only on a terminal).

    Returns:
        One :class:`AttackSet` per epsilon, in order, with the attacked tensors on the CPU.
    """
    from .. import attacks
    from ..models import Normalize

    n = min(int(protocol.n_images), int(x_pixels.shape[0]))
    device = next((p.device for p in model.parameters()), x_pixels.device)
    x, yy = x_pixels[:n].to(device), y[:n].long().to(device)
    indices = torch.arange(n)
    # a new Sequential is in training mode: give it the model's mode, or restoring it after the attack
    # (attacks run in eval mode and restore the mode they found) would leave the model in training mode
    pixel_model = torch.nn.Sequential(Normalize(mean, std).to(device), model).train(model.training)
    out = []
    for eps in progress_bar(protocol.epsilons, f"PGD ({protocol.name} protocol)", progress, unit="eps"):
        if protocol.name == "paper":
            x_adv = attacks.attack_paper_protocol(model, x, yy, eps=eps, seed=protocol.seed, mean=mean, std=std,
                                                  nb_iter=protocol.nb_iter, eps_iter=protocol.step(eps),
                                                  backend=protocol.backend)
        else:
            x_adv, _ = attacks.attack_standard_protocol(pixel_model, x, yy, eps=eps, nb_iter=protocol.nb_iter,
                                                        seed=protocol.seed, backend=protocol.backend)
        out.append(AttackSet(protocol.name, eps, x_adv.detach().cpu(), protocol.space, indices))
    return out


def check_pgd_backends(model: torch.nn.Module, x_pixels: Tensor, y: Tensor, *, eps: float, mean: Any, std: Any,
                       nb_iter: int = 40, seed: int = 1) -> dict[str, Any]:
    """Run the paper protocol with advertorch and with the project's torch PGD on the same inputs and seed.

    Both start from the same random point (same seed, same batching), so the adversarial tensors should
    agree to float precision; the report records the largest difference.

    Returns:
        ``{"n", "epsilon", "max_abs_diff", "answers_equal", "advertorch_available"}``; without
        advertorch only ``advertorch_available: False`` and a note.
    """
    from .. import attacks

    try:
        from .._advertorch_compat import ensure_advertorch

        ensure_advertorch()
    except ImportError as exc:
        return {"advertorch_available": False, "note": f"advertorch cannot be imported: {exc}"}
    device = next((p.device for p in model.parameters()), x_pixels.device)
    x_pixels, y = x_pixels.to(device), y.to(device)
    kw = dict(eps=eps, seed=seed, mean=mean, std=std, nb_iter=nb_iter)
    a = attacks.attack_paper_protocol(model, x_pixels, y, backend="advertorch", **kw)
    b = attacks.attack_paper_protocol(model, x_pixels, y, backend="torch", **kw)
    with torch.no_grad():
        same = bool((model(a).argmax(1) == model(b).argmax(1)).all())
    return {"advertorch_available": True, "n": int(x_pixels.shape[0]), "epsilon": eps, "nb_iter": nb_iter,
            "max_abs_diff": float((a - b).abs().max()), "answers_equal": same}


_ATTACKS_KIND = "AttackSets"


def save_attack_sets(path: str | os.PathLike, sets: Sequence[AttackSet], metadata: Mapping[str, Any]) -> Path:
    """Write attack sets to one safetensors file, atomically (the ``--attacks-file`` format).

    Tensors are named ``<protocol>/<epsilon>/x_adv`` and ``<protocol>/<epsilon>/indices``; the JSON
    settings hold the list of sets (protocol, epsilon, space) and ``metadata`` (data settings, seeds,
    a fingerprint of the clean inputs) so that a reader can check it attacks the same data.
    """
    tensors: dict[str, Tensor] = {}
    entries = []
    for s in sets:
        key = f"{s.protocol}/{s.epsilon:g}"
        if f"{key}/x_adv" in tensors:
            raise ValueError(f"two attack sets for protocol {s.protocol!r} at epsilon {s.epsilon}")
        tensors[f"{key}/x_adv"] = s.x_adv.float().clone()  # own storage: safetensors refuses shared memory
        tensors[f"{key}/indices"] = s.indices.long().clone()
        entries.append({"protocol": s.protocol, "epsilon": s.epsilon, "space": s.space, "key": key})
    return save_atomic(path, tensors, kind=_ATTACKS_KIND, config={"sets": entries, "metadata": dict(metadata)})


def load_attack_sets(path: str | os.PathLike) -> tuple[list[AttackSet], dict[str, Any]]:
    """Read a file written by :func:`save_attack_sets`.

    Returns:
        ``(sets, metadata)``.

    Raises:
        FileNotFoundError: no such file.
        SaveFormatError: not an attack-sets file, or an entry is missing.
    """
    tensors, cfg = load_checked(path, kind=_ATTACKS_KIND)
    sets = []
    try:
        for e in cfg["sets"]:
            sets.append(AttackSet(e["protocol"], float(e["epsilon"]), tensors[f"{e['key']}/x_adv"], e["space"],
                                  tensors[f"{e['key']}/indices"].long()))
        metadata = dict(cfg["metadata"])
    except KeyError as exc:
        raise SaveFormatError(f"{str(path)!r}: attack-sets file is missing the entry {exc}") from exc
    return sets, metadata


def attacked_evidence(sweep: LibrarySweep, probe: Any, sets: Sequence[AttackSet], requests: Iterable[EvidenceKey],
                      labels: Tensor, *, model_space: str, mean: Any, std: Any, batch_size: int = 256,
                      progress: bool | None = None) -> dict[float, Evidence]:
    """Evidence of every attack set of one protocol, each moved to the probed model's input space.

    Args:
        sweep / probe: as for :func:`compute_evidence`.
        sets: attack sets of one protocol (one per epsilon).
        requests: ``(layer, theta, top_k)`` triples, e.g. :func:`cpl_requests`.
        labels: labels of the whole test set; each set takes those at its ``indices``.
        model_space / mean / std: the probed model's input space and the normalisation (see
            :func:`to_model_space`).
        batch_size / progress: as for :func:`compute_evidence`.

    Returns:
        ``{epsilon: Evidence}``, ready for :func:`evaluate_protocol`.
    """
    requests = list(requests)
    return {s.epsilon: compute_evidence(sweep, probe, to_model_space(s.x_adv, s.space, model_space, mean, std),
                                        requests, labels=labels[s.indices.to(labels.device)],
                                        batch_size=batch_size, progress=progress,
                                        desc=f"{s.protocol} eps={s.epsilon:g}") for s in sets}


def evaluate_protocol(protocol: str, clean: Evidence, attacked: Mapping[float, Evidence],
                      threshold_sets: Mapping[str, Mapping[str, float]], *, top_k: int = 20,
                      fpr: float = 0.05) -> dict[str, Any]:
    """CPL detection per threshold set and epsilon under one protocol (the paper's Fig. 5B/5C).

    Args:
        protocol: ``"paper"``: all attacked inputs against all clean ones; ``"standard"``: only inputs
            the model classifies correctly whose attack succeeds (the model's answer on the attacked
            input differs from the label), paired with their clean versions.
        clean: evidence of the clean inputs (with labels), row ``i`` the clean version of row ``i`` of
            every attacked set.
        attacked: ``{epsilon: evidence of the attacked inputs}``.
        threshold_sets: ``{set name: {layer: theta}}``.
        top_k: nodes per layer in CPL (20 in the paper).
        fpr: false-positive rate for the TPR column.

    Returns:
        ``{"protocol", "top_k", "fpr", "epsilons": [{"epsilon", "n_inputs", "n_selected",
        "answers_changed", "model_accuracy_attacked"}], "results": {set: [{"epsilon", **detection}]},
        "cpl": {set: {"clean": Tensor, eps: Tensor}}, "cpl_clean_selected": {set: {eps: Tensor}}}``: the raw
        CPL values feed the histograms (``"cpl"``: every clean input, and the scored attacked inputs per
        epsilon; ``"cpl_clean_selected"``: the clean inputs scored against them at each epsilon).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if clean.labels is None:
        raise ValueError("evaluate_protocol needs the clean evidence with labels")
    eps_rows, results = [], {name: [] for name in threshold_sets}
    raw: dict[str, dict[Any, Tensor]] = {name: {} for name in threshold_sets}
    raw_clean: dict[str, dict[float, Tensor]] = {name: {} for name in threshold_sets}
    for name, thr in threshold_sets.items():
        raw[name]["clean"] = cpl_from_evidence(clean, thr, top_k)
    for eps, adv in sorted(attacked.items()):
        if len(adv) != len(clean):
            raise ShapeMismatchError(f"epsilon {eps}: {len(adv)} attacked inputs but {len(clean)} clean ones")
        changed = adv.answers != clean.answers
        if protocol == "standard":
            keep = (clean.answers == clean.labels) & (adv.answers != clean.labels)
        else:
            keep = torch.ones(len(clean), dtype=torch.bool)
        eps_rows.append({"epsilon": eps, "n_inputs": len(clean), "n_selected": int(keep.sum()),
                         "answers_changed": float(changed.float().mean()),
                         "model_accuracy_attacked": float((adv.answers == clean.labels).float().mean())})
        for name, thr in threshold_sets.items():
            c_all = raw[name]["clean"]
            a_all = cpl_from_evidence(adv, thr, top_k)
            raw[name][eps] = a_all[keep]
            raw_clean[name][eps] = c_all[keep]
            results[name].append({"epsilon": eps, **detection_metrics(c_all[keep], a_all[keep], fpr)})
    return {"protocol": protocol, "top_k": top_k, "fpr": fpr, "epsilons": eps_rows, "results": results, "cpl": raw,
            "cpl_clean_selected": raw_clean}


def _model_answers(net: Any, x: Tensor, batch_size: int) -> Tensor:
    """The answers (argmax of the outputs) of the model behind ``net.probe`` on ``x``, on the CPU."""
    return torch.cat([net.probe.run(xb).outputs.argmax(dim=1).cpu() for xb, _ in iter_batches(x, batch_size)])


def detector_comparison(net: Any, train: tuple[Tensor, Tensor | None], clean_test: tuple[Tensor, Tensor],
                        attack_sets: Sequence[AttackSet], *, space: str, mean: Any, std: Any,
                        protocol: str = "standard", ood_sets: Mapping[str, Tensor] | None = None,
                        out_dir: str | os.PathLike | None = None, detectors: Any = None, fpr: float = 0.05,
                        fpr_splits: int = 50, batch_size: int = 256,
                        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The detector comparison of :mod:`libnet_plugin.experiments.detectors` on an experiment's data.

    Shared by ``libnet reproduce mnist`` and ``libnet reproduce cifar10``. Every input is given in pixel
    space (``[0, 1]``) or, for attack sets, in the space the :class:`AttackSet` records, and is moved to
    the model's input space ``space`` here. :class:`AttackSet` holds *every* attacked input, so the
    selection of the standard protocol is made here from ``net``'s model: an attacked input is kept only
    when the model classifies its clean version correctly and the attacked one wrongly (a successful
    attack on a correctly classified input), the same rule as :func:`evaluate_protocol`.

    Args:
        net: a fitted :class:`~libnet_plugin.LibraryNetwork` (e.g. :meth:`LibrarySweep.to_network` at one
            threshold set); its model gives the answers used for the selection.
        train: ``(x_train, y_train)`` in pixels; ``y_train`` may be ``None`` (then detectors that need
            labels fit on the inputs alone, as :func:`evaluate_detectors` allows).
        clean_test: ``(x_test, y_test)`` in pixels. Its first half calibrates the detectors and its second
            half is the clean evaluation set (``evaluate_detectors``' default split).
        attack_sets: attack sets of an experiment; those of ``protocol`` are used, one attacked set
            ``"PGD eps=<epsilon>"`` per epsilon, their ``indices`` pointing into ``clean_test``.
        space: the model's input space, ``"pixels"`` or ``"normalized"``.
        mean / std: the normalisation relating the two spaces.
        protocol: which protocol's attack sets to use (``"standard"``: PGD in pixel space).
        ood_sets: ``{name: inputs in pixels}`` of out-of-domain inputs.
        out_dir: folder receiving ``detectors.json``, ``detectors.md`` and ``roc.png``.
        detectors / fpr / fpr_splits / batch_size: passed to ``evaluate_detectors``.
        log: a function receiving progress lines (default: silent).

    Returns:
        ``{"available": True, "protocol": protocol, "attacks": {set name: {"epsilon", "attacked",
        "successful"}}, "table": <what evaluate_detectors returns>}`` (its ``"table_markdown"`` renders
        the table), or ``{"available": False, "note": why}`` when the detectors module cannot be
        imported, there are no attack sets of ``protocol``, too few test images to calibrate at ``fpr``,
        or no attack succeeded.

    Raises:
        ValueError: an unknown protocol or space, or ``clean_test`` without labels.
        ShapeMismatchError: an attack set's indices point outside ``clean_test``.

    Example:
        >>> res = detector_comparison(net, (x_tr, y_tr), (x_te, y_te), sets, space="normalized",
        ...                           mean=MNIST_MEAN, std=MNIST_STD, out_dir="runs/q")  # doctest: +SKIP
        >>> print(res["table"]["table_markdown"])  # doctest: +SKIP
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    x_test, y_test = clean_test
    if y_test is None:
        raise ValueError("detector_comparison needs the test labels to select the successful attacks")
    try:
        from .detectors import evaluate_detectors
    except ImportError as exc:
        return {"available": False,
                "note": f"The detector comparison (libnet_plugin.experiments.detectors.evaluate_detectors) is not "
                        f"part of this installation ({exc}); no detector table"}
    sets = [s for s in attack_sets if s.protocol == protocol]
    if not sets:
        return {"available": False,
                "note": f"No {protocol}-protocol attacks in this run, so no detector table"}
    need = math.ceil(1.0 / fpr) - 1  # calibrating at fpr takes at least this many clean inputs
    if x_test.shape[0] // 2 < need:
        return {"available": False,
                "note": f"The detector comparison calibrates on half of the test images and needs at least {need} "
                        f"for FPR {fpr:g}; this run has {x_test.shape[0]} test images, so no detector table"}
    say = log or (lambda _msg: None)
    x_test_m = to_model_space(x_test, "pixels", space, mean, std)
    y_test = y_test.long().cpu()
    attacked: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    clean_answers: dict[tuple[int, ...], Tensor] = {}
    for s in sets:
        idx = s.indices.long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= x_test.shape[0]):
            raise ShapeMismatchError(f"{s.protocol} attacks at epsilon {s.epsilon:g} point to test positions up to "
                                     f"{int(idx.max())}, but the test set has {x_test.shape[0]} inputs")
        key = tuple(idx.tolist())
        if key not in clean_answers:  # the sets of one protocol usually attack the same inputs
            clean_answers[key] = _model_answers(net, x_test_m[idx], batch_size)
        x_adv = to_model_space(s.x_adv, s.space, space, mean, std)
        keep = (clean_answers[key] == y_test[idx]) & (_model_answers(net, x_adv, batch_size) != y_test[idx])
        name = f"PGD eps={s.epsilon:g}"
        info[name] = {"epsilon": s.epsilon, "attacked": int(idx.numel()), "successful": int(keep.sum())}
        say(f"{name}: {int(keep.sum())} successful attacks on correctly classified inputs of {idx.numel()}")
        if bool(keep.any()):
            attacked[name] = x_adv[keep.to(x_adv.device)]
    if not attacked:
        return {"available": False, "attacks": info,
                "note": f"No {protocol}-protocol attack succeeded on a correctly classified input, so no "
                        "detector table"}
    x_train, y_train = train
    x_train_m = to_model_space(x_train, "pixels", space, mean, std)
    ood = {name: to_model_space(x, "pixels", space, mean, std) for name, x in (ood_sets or {}).items()}
    table = evaluate_detectors(net, x_train_m if y_train is None else (x_train_m, y_train), x_test_m, attacked, ood,
                               detectors=detectors, out_dir=out_dir, fpr=fpr, fpr_splits=fpr_splits,
                               batch_size=batch_size, log=log)
    return {"available": True, "protocol": protocol, "attacks": info, "table": table}


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


# ---------------------------------------------------------------------------------------------------
# report writing
# ---------------------------------------------------------------------------------------------------


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

    from .. import __version__

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
