"""Exceptions of the ONNX adapter. Each derives from :class:`libnet_plugin.errors.LibnetError` and from the
builtin type a Python user would catch (``ValueError`` / ``TypeError``)."""

from __future__ import annotations

from libnet_plugin.errors import LibnetError

__all__ = ["OnnxModelError", "ExecutionProviderError", "InputTypeError"]


class OnnxModelError(LibnetError, ValueError):
    """A file or object is not a usable ONNX model: it does not parse, fails the ONNX checker, or has a
    form the adapter cannot probe (several graph inputs, no outputs, over 2 GB)."""


class ExecutionProviderError(LibnetError, ValueError):
    """An onnxruntime execution provider is unknown, or not available when fallback is off."""


class InputTypeError(LibnetError, TypeError):
    """An input batch has a dtype the ONNX graph does not accept."""
