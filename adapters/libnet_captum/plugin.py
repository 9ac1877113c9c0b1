"""libnet plugin entry point of the Captum adapter (import-light: captum is imported lazily).

Registered through the ``libnet_plugin`` entry-point group as ``captum``. It claims only
:class:`libnet_captum.CaptumForward` marker objects, so every plain ``torch.nn.Module`` keeps the
core's built-in forward-hook probe.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from libnet_plugin.hookspecs import hookimpl

from .probe import CaptumForward, CaptumLayerProbe


@hookimpl
def libnet_layer_probe(model: Any, layers: Sequence[str], device: Any) -> Any | None:
    """Serve :class:`CaptumForward` models with a probe of forward hooks (as Captum's ``LayerActivation``)."""
    if isinstance(model, CaptumForward):
        return CaptumLayerProbe(model, layers, device=device)
    return None
