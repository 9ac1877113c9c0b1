"""libnet plugin entry point of the ONNX adapter.

Registered through the ``libnet_plugin`` entry-point group. This module stays import-light: onnx and
onnxruntime are imported only when a model is actually claimed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from libnet_plugin.hookspecs import hookimpl

__all__ = ["claims", "libnet_layer_probe"]


def _instance_of(obj: Any, module: str, *names: str) -> bool:
    """``isinstance(obj, module.<name>)`` for a module that is already imported (never imports it)."""
    mod = sys.modules.get(module)
    types = tuple(t for n in names if isinstance(t := getattr(mod, n, None), type)) if mod is not None else ()
    return bool(types) and isinstance(obj, types)


def claims(model: Any) -> bool:
    """True for the objects this adapter probes: a path (``str`` / ``os.PathLike``, read as an ONNX file),
    an ``onnx.ModelProto``, an ``onnxruntime.InferenceSession``, or a :class:`libnet_onnx.OnnxModel`.

    Example:
        >>> claims("model.onnx"), claims(3)
        (True, False)
    """
    return (isinstance(model, (str, os.PathLike))
            or _instance_of(model, "onnx", "ModelProto")
            or _instance_of(model, "onnxruntime", "InferenceSession")
            or _instance_of(model, "libnet_onnx.probe", "OnnxModel"))


@hookimpl
def libnet_layer_probe(model: Any, layers: Sequence[str], device: Any) -> Any | None:
    """Claim ONNX models (see :func:`claims`) with an :class:`libnet_onnx.OnnxLayerProbe`; else ``None``."""
    if not claims(model):
        return None
    from .probe import OnnxLayerProbe

    return OnnxLayerProbe(model, layers, device=device)
