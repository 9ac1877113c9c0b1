"""The built-in plugin: registered by :func:`libnet_plugin.get_plugin_manager` like any other plugin."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from torch import nn

from .consistency import CPLScore
from .hookspecs import hookimpl
from .library import ExactLibrary
from .probe import TorchLayerProbe
from .readout import HebbianReadout


@hookimpl(trylast=True)
def libnet_layer_probe(model: Any, layers: Sequence[str], device: Any) -> Any | None:
    """Claim ``torch.nn.Module`` models with the forward-hook probe."""
    if isinstance(model, nn.Module):
        return TorchLayerProbe(model, layers, device=device)
    return None


@hookimpl(trylast=True)
def libnet_library(name: str, settings: Mapping[str, Any]) -> Any | None:
    """Serve ``"exact"``: the exact batched leader library."""
    if name == "exact":
        return ExactLibrary(**settings)
    return None


@hookimpl(trylast=True)
def libnet_readout(name: str, settings: Mapping[str, Any]) -> Any | None:
    """Serve ``"hebbian"``: Eq. 2 weights with Eq. 3 prediction."""
    if name == "hebbian":
        return HebbianReadout(**settings)
    return None


@hookimpl(trylast=True)
def libnet_consistency_detector(name: str, settings: Mapping[str, Any]) -> Any | None:
    """Serve ``"cpl"``: one minus the consistency of predictions across layers (Eq. 5)."""
    if name == "cpl":
        return CPLScore(**settings)
    return None
