"""The built-in plugin: every hookimpl of libnet-plugin's own, in one module.

:func:`libnet_plugin.get_plugin_manager` registers this module like any other plugin (``trylast``, so a
third-party plugin serving the same name is asked first). The tables below are what it serves.

Example:
    >>> sorted(LIBRARIES), sorted(READOUTS)
    (['exact', 'projected', 'sparse'], ['hebbian'])
    >>> sorted(DETECTORS)  # doctest: +NORMALIZE_WHITESPACE
    ['cpl', 'energy', 'gen', 'knn', 'knn-normalized', 'library-distance', 'library-fusion',
     'library-gaussian-fusion', 'library-margin', 'mahalanobis', 'mahalanobis-multilayer', 'maxlogit', 'msp', 'react-energy', 'vim']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ._validate import construct
from .detectors import (
    ConsistencyScore,
    CPLScore,
    DeepKNNScore,
    EnergyScore,
    GENScore,
    KNNNormalizedScore,
    LibraryDistanceScore,
    LibraryFusionScore,
    LibraryGaussianFusionScore,
    LibraryMarginScore,
    MahalanobisScore,
    MaxLogitScore,
    MaxSoftmaxScore,
    MultiLayerMahalanobisScore,
    ReActEnergyScore,
    ViMScore,
)
from .hookspecs import hookimpl
from .library import ExactLibrary, Library
from .probe import LayerProbe, TorchLayerProbe
from .readout import HebbianReadout, Readout
from .sparse import ProjectedLibrary, SparseLibrary

__all__ = ["LIBRARIES", "READOUTS", "DETECTORS", "PEERS", "COMPARISON", "libnet_layer_probe", "libnet_library",
           "libnet_readout", "libnet_consistency_detector", "libnet_detector_comparison"]

#: libraries served by ``libnet_library``
LIBRARIES: dict[str, type] = {"exact": ExactLibrary, "sparse": SparseLibrary, "projected": ProjectedLibrary}
#: readouts served by ``libnet_readout``
READOUTS: dict[str, type] = {"hebbian": HebbianReadout}
#: detectors served by ``libnet_consistency_detector``
DETECTORS: dict[str, type[ConsistencyScore]] = {
    "cpl": CPLScore,
    "library-margin": LibraryMarginScore,
    "library-distance": LibraryDistanceScore,
    "library-fusion": LibraryFusionScore,
    "library-gaussian-fusion": LibraryGaussianFusionScore,
    "msp": MaxSoftmaxScore,
    "mahalanobis": MahalanobisScore,
    "knn": DeepKNNScore,
    # today's post-hoc peers (one module each in libnet_plugin/detectors/)
    "energy": EnergyScore,
    "maxlogit": MaxLogitScore,
    "gen": GENScore,
    "react-energy": ReActEnergyScore,
    "vim": ViMScore,
    "knn-normalized": KNNNormalizedScore,
    "mahalanobis-multilayer": MultiLayerMahalanobisScore,
}
#: the post-hoc peers of :data:`DETECTORS` (baselines of ``libnet evaluate-detectors``, as msp, mahalanobis, knn)
PEERS: tuple[str, ...] = ("energy", "maxlogit", "gen", "react-energy", "vim", "knn-normalized", "mahalanobis-multilayer")
#: development candidates of :data:`DETECTORS` for a new default (issue 28): ``libnet evaluate-detectors`` runs
#: them only when named by a label of :data:`libnet_plugin.detectors.MNIST_CANDIDATES`, never by default
CANDIDATES: tuple[str, ...] = ("library-gaussian-fusion",)
#: what ``libnet evaluate-detectors`` compares by default: ``{label: (name, settings)}``; the paper's CPL
#: is listed so that the comparison always holds the reproduction next to the other scores
COMPARISON: dict[str, tuple[str, dict[str, Any]]] = {
    "cpl (paper, top_k 20)": ("cpl", {"top_k": 20}),
    "cpl (top_k 3)": ("cpl", {"top_k": 3}),
    "library-margin": ("library-margin", {}),
    "library-distance": ("library-distance", {}),
    "library-fusion": ("library-fusion", {}),
    "msp": ("msp", {}),
    "mahalanobis": ("mahalanobis", {}),
    "knn": ("knn", {}),
    **{name: (name, {}) for name in PEERS},
}


@hookimpl(trylast=True)
def libnet_layer_probe(model: Any, layers: Sequence[str], device: Any) -> LayerProbe | None:
    """Claim ``torch.nn.Module`` models with the forward-hook probe."""
    if isinstance(model, nn.Module):
        return TorchLayerProbe(model, layers, device=device)
    return None


@hookimpl(trylast=True)
def libnet_library(name: str, settings: Mapping[str, Any]) -> Library | None:
    """Serve ``"exact"`` (the exact batched leader library), ``"sparse"`` and ``"projected"``."""
    cls = LIBRARIES.get(name)
    return None if cls is None else construct(cls, settings)


@hookimpl(trylast=True)
def libnet_readout(name: str, settings: Mapping[str, Any]) -> Readout | None:
    """Serve ``"hebbian"``: Eq. 2 weights with Eq. 3 prediction."""
    cls = READOUTS.get(name)
    return None if cls is None else construct(cls, settings)


@hookimpl(trylast=True)
def libnet_consistency_detector(name: str, settings: Mapping[str, Any]) -> ConsistencyScore | None:
    """Serve the detectors of :data:`DETECTORS` (the paper's ``"cpl"`` and the other scores)."""
    cls = DETECTORS.get(name)
    return None if cls is None else construct(cls, settings)


@hookimpl(trylast=True)
def libnet_detector_comparison() -> Mapping[str, tuple[str, Mapping[str, Any]]]:
    """List :data:`COMPARISON` for ``libnet evaluate-detectors``."""
    return {label: (name, dict(settings)) for label, (name, settings) in COMPARISON.items()}
