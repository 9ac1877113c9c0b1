"""Exceptions of the ONNX adapter. Each derives from :class:`libnet_plugin.errors.LibnetError` and from the
builtin type a Python user would catch (``ValueError`` / ``TypeError``)."""

from __future__ import annotations

from libnet_plugin.errors import LibnetError

__all__ = ["OnnxModelError", "ExecutionProviderError", "InputTypeError"]


class OnnxModelError(LibnetError, ValueError):
    """A file or object is not a usable ONNX model: it does not parse, fails the ONNX checker, or has a
    form the adapter cannot probe (several graph inputs, no outputs, over 2 GB).

    Example:
        >>> from libnet_onnx import load_model
        >>> load_model(b"not an onnx model")
        Traceback (most recent call last):
        ...
        libnet_onnx.errors.OnnxModelError: ...
    """


class ExecutionProviderError(LibnetError, ValueError):
    """An onnxruntime execution provider is unknown, or not available when fallback is off.

    Example:
        >>> from libnet_onnx import resolve_providers
        >>> resolve_providers(["no-such-provider"])
        Traceback (most recent call last):
        ...
        libnet_onnx.errors.ExecutionProviderError: ...
    """


class InputTypeError(LibnetError, TypeError):
    """An input batch has a dtype the ONNX graph does not accept.

    Example:
        >>> import torch
        >>> from onnx import helper, TensorProto
        >>> from libnet_onnx import OnnxModel
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
        >>> proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
        >>> OnnxModel(proto, providers=["cpu"])(torch.tensor([[True, False]]))
        Traceback (most recent call last):
        ...
        libnet_onnx.errors.InputTypeError: ...
    """
