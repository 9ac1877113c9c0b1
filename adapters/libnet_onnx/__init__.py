"""ONNX Runtime layer-probe adapter for libnet-plugin (install with ``pip install 'libnet-plugin[onnx]'``).

With this package installed, ``LibraryNetwork`` accepts an ONNX file path, an ``onnx.ModelProto`` or an
``onnxruntime.InferenceSession`` as the model; layers are PyTorch module names recorded by the exporter
(``"conv1"``) or ONNX tensor names::

    import libnet_plugin as lnp
    from libnet_onnx import export_onnx, list_layers

    export_onnx(torch_model, example_batch, "model.onnx")
    print([l.name for l in list_layers("model.onnx", kind="module")])
    net = lnp.LibraryNetwork("model.onnx", layers=["conv1", "fc1"], thresholds=0.7).fit(train_x)

Importing this package is cheap: onnx and onnxruntime load on first use of the names below.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "OnnxModel", "OnnxLayerProbe", "OnnxGraph", "LayerInfo", "TensorSpec", "list_layers", "load_model",
    "export_onnx", "resolve_providers", "PROVIDER_ALIASES",
    "OnnxModelError", "ExecutionProviderError", "InputTypeError",
]

_LAZY = {
    "OnnxModel": "probe", "OnnxLayerProbe": "probe",
    "OnnxGraph": "graph", "LayerInfo": "graph", "TensorSpec": "graph", "list_layers": "graph", "load_model": "graph",
    "export_onnx": "export",
    "resolve_providers": "providers", "PROVIDER_ALIASES": "providers",
    "OnnxModelError": "errors", "ExecutionProviderError": "errors", "InputTypeError": "errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
