"""Exporting a PyTorch classifier to ONNX so that every module output stays probe-able."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["export_onnx"]

#: Below this many bytes of weights the model is written as one self-contained file.
_INLINE_LIMIT = 1_800_000_000


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's progress prints and its notices about optional torchvision operators."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def export_onnx(model: nn.Module, example_input: Tensor, path: str | os.PathLike, *, dynamo: bool = True,
                optimize: bool = False, opset_version: int | None = None, input_name: str = "input",
                output_name: str = "output", check: bool = True) -> Path:
    """Export a PyTorch classifier to an ONNX file for probing with this adapter, with a dynamic batch size.

    The model is exported in eval mode (its training flag is restored afterwards). With the dynamo
    exporter (default; needs onnxscript) every node records the PyTorch module it came from, so module
    names such as ``"conv1"`` work as layer names; with the legacy TorchScript exporter
    (``dynamo=False``) the module path is encoded in the node names, which works the same way here.

    By default the exporter's graph optimisations are off (``optimize=False``): they fuse a BatchNorm
    into the preceding convolution and merge successive ReLUs, which removes those modules' outputs.
    onnxruntime still optimises the graph when it loads it, and it keeps every tensor that is asked for.

    Args:
        model: the classifier; it must return ``[B, C]`` scores.
        example_input: one input batch ``[B, ...]`` (any ``B``; a batch of 1 is enlarged to 2 for tracing).
        path: the ``.onnx`` file to write (parent folders are created). Weights are stored inside the file
            unless they exceed about 1.8 GB.
        dynamo: use the ``torch.export``-based exporter (default), or the legacy TorchScript exporter.
        optimize: let the exporter optimise the graph (dynamo: the onnxscript optimiser; legacy:
            constant folding). Off by default, so module outputs are exactly the PyTorch ones.
        opset_version: ONNX opset (default: the exporter's default).
        input_name, output_name: names of the graph input and output.
        check: run ``onnx.checker.check_model`` on the written file.

    Returns:
        The path written, as a ``pathlib.Path``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_input`` not a Tensor.
        ValueError: ``example_input`` has no batch dimension.

    Example:
        >>> import tempfile, torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> path = export_onnx(model, torch.randn(2, 4), tempfile.mkdtemp() + "/mlp.onnx", dynamo=False)
        >>> path.suffix
        '.onnx'
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, Tensor):
        raise TypeError(f"example_input must be a torch.Tensor batch, got {type(example_input).__name__}")
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ValueError(f"example_input must be a non-empty batch [B, ...], got shape {list(example_input.shape)}")
    if example_input.shape[0] == 1:  # a batch of 1 would be specialised to a constant by the tracer
        example_input = example_input.repeat(2, *([1] * (example_input.dim() - 1)))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    was_training = model.training
    model.eval()
    try:
        with _quiet_exporter():
            if dynamo:
                torch.onnx.export(model, (example_input,), path, dynamo=True, optimize=optimize,
                                  opset_version=opset_version, input_names=[input_name], output_names=[output_name],
                                  dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                                  external_data=n_bytes > _INLINE_LIMIT)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    torch.onnx.export(model, (example_input,), path, dynamo=False, do_constant_folding=optimize,
                                      opset_version=opset_version, input_names=[input_name],
                                      output_names=[output_name],
                                      dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    finally:
        model.train(was_training)
    if check:
        import onnx

        onnx.checker.check_model(os.fspath(path))
    return path
