"""Library sweeps and the evidence they give: the dataset-independent first half of every experiment.

1. :func:`fit_library_sweep` fits one library and one Hebbian readout for *every* threshold of every
   layer from the same forward passes (two passes over the training data in all, or one when the
   activations fit ``cache_bytes``), instead of one :class:`~libnet_plugin.LibraryNetwork` per theta.
2. :func:`compute_evidence` runs the model once over an evaluation set and keeps, for each requested
   ``(layer, theta, top_k)``, only the per-layer evidence ``P`` (Eq. 3, ``[N, C]``), so that
   agreement, confusion index and CPL for all thresholds come from one pass per set.
3. :func:`agreement_table`, :func:`confusion_indices` and :func:`cpl_from_evidence` turn evidence into
   the paper's numbers (docs/method.md sections 4-6).

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

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .._batches import iter_batches, progress_bar
from ..errors import ShapeMismatchError
from ..library import validate_threshold
from ..metrics import ConfusionAccumulator, agreement_counts, cpl
from ..network import LibraryNetwork, stream_fit
from ..plugins import make_library, make_readout

__all__ = ['theta_key', 'theta_grid', 'LibrarySweep', 'fit_library_sweep', 'Evidence', 'compute_evidence', 'agreement', 'agreement_table', 'confusion_indices', 'cpl_from_evidence', 'cpl_requests']


#: Key under which a request for evidence is stored: ``(layer, theta, top_k)``.
EvidenceKey = tuple[str, float, int]

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
        """Training inputs behind the ``k`` nodes most similar to each input (docs/method.md section 2).

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
    of that layer; pass 2 (after the libraries are complete, docs/method.md section 3) accumulates the
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

    def subset(self, mask: Tensor) -> Evidence:
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
    """Top-1 / top-3 agreement of evidence ``p`` ``[N, C]`` with the model's answers (docs/method.md section 4).

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
