"""Captum-style attribution adapter for libnet-plugin (install with ``pip install 'libnet-plugin[captum]'``).

- :class:`LibraryAttribution`: a ``captum.attr.Attribution`` giving each layer's class evidence (Eq. 3).
- :class:`LibraryExemplars`: a ``captum.influence.DataInfluence`` giving the training inputs behind the
  library nodes an input is closest to, per layer.
- :class:`CaptumForward`: a marker that lets a :class:`libnet_plugin.LibraryNetwork` probe any forward
  function Captum accepts (forward hooks as Captum's ``LayerActivation`` sets them).

Importing this package (or its ``plugin`` entry point) does not import captum; the attribution classes
load it on first access.
"""

from __future__ import annotations

from typing import Any

from .probe import CaptumForward, CaptumLayerProbe

__all__ = ["LibraryAttribution", "LibraryExemplars", "CaptumForward", "CaptumLayerProbe"]

_LAZY = {"LibraryAttribution", "LibraryExemplars"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from . import attribution

        return getattr(attribution, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _LAZY)
