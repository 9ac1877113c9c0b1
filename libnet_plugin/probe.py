"""Layer probes: run a model on a batch and collect each probed layer's flattened activations (HAPs).

The built-in :class:`TorchLayerProbe` uses forward hooks on ``torch.nn.Module`` objects. Other model
formats (ONNX) are served by adapter plugins through the ``libnet_layer_probe`` hook.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import LayerNotFoundError, NonFiniteError

__all__ = ["ProbeResult", "LayerProbe", "TorchLayerProbe", "check_finite", "unknown_layer_message"]


@dataclass
class ProbeResult:
    """What one probe run returns.

    Attributes:
        outputs: the model's outputs, ``Tensor[B, C]`` (logits or log-probabilities), detached.
        haps: ``{layer: Tensor[B, D_layer]}`` flattened, un-normalised activations, float32, on the
            device of the library network, in the probe's layer order.
    """

    outputs: Tensor
    haps: dict[str, Tensor]

    @property
    def answers(self) -> Tensor:
        """The model's answers (argmax of the outputs), ``LongTensor[B]``."""
        return self.outputs.argmax(dim=1)


@runtime_checkable
class LayerProbe(Protocol):
    """What a ``libnet_layer_probe`` hook returns."""

    layers: list[str]

    def run(self, x: Tensor) -> ProbeResult:
        """Run the model once on the batch ``x`` and return outputs and HAPs of every probed layer."""
        ...


def check_finite(t: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteError` naming ``what`` if ``t`` holds NaN or infinity."""
    # a NaN or inf anywhere makes the sum non-finite: one reduction decides the common, finite case
    if t.is_floating_point() and not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise NonFiniteError(
            f"{what} contains non-finite values ({n_nan} NaN, {n_inf} inf) in a tensor of shape "
            f"{tuple(t.shape)}; expected only finite values"
        )


def unknown_layer_message(name: str, valid: Sequence[str], kind: str = "model") -> str:
    """A message naming an unknown layer, close matches, and the valid names."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    shown = list(valid)[:40]
    more = f" (and {len(valid) - 40} more)" if len(valid) > 40 else ""
    return f"layer {name!r} does not exist in the {kind}.{hint} Valid layer names: {shown}{more}"


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return fallback


class TorchLayerProbe:
    """Probe the named submodules of a ``torch.nn.Module`` with forward hooks.

    The HAP of a layer is the module's forward output flattened per sample. Hooks are registered for
    the duration of one forward pass and removed in ``finally``, also when the model raises.

    Args:
        model: the classifier; its outputs must be ``[B, C]`` (logits or log-probabilities).
        layers: names as given by ``model.named_modules()`` (e.g. ``"conv1"``, ``"layer2.3"``).
        device: where the returned HAPs live. Inputs are moved to the model's own device.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> probe = TorchLayerProbe(model, ["0", "2"], device=torch.device("cpu"))
        >>> res = probe.run(torch.randn(5, 4))
        >>> {k: tuple(v.shape) for k, v in res.haps.items()}, tuple(res.outputs.shape)
        ({'0': (5, 3), '2': (5, 2)}, (5, 2))
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], device: torch.device | str | None = None):
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.layers = list(layers)
        self.device = torch.device(device) if device is not None else _model_device(model, torch.device("cpu"))
        modules = dict(model.named_modules())
        valid = [n for n in modules if n]
        self.modules: dict[str, nn.Module] = {}
        for name in self.layers:
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
            if name not in modules or name == "":
                raise LayerNotFoundError(unknown_layer_message(name, valid, kind=type(model).__name__))
            self.modules[name] = modules[name]

    def __repr__(self) -> str:
        return f"TorchLayerProbe(model={type(self.model).__name__}, layers={self.layers})"

    def run(self, x: Tensor, *, grad: bool = False) -> ProbeResult:
        """Run the model on ``x`` and return its outputs and the flattened HAPs of every probed layer.

        Args:
            x: a batch of inputs ``[B, ...]``; moved to the model's device.
            grad: keep the autograd graph (for attacks); default runs under ``torch.no_grad()``.
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        check_finite(x, "the input batch")
        x = x.to(_model_device(self.model, self.device))
        captured: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        handles = []

        def make_hook(name: str):
            def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
                if isinstance(out, (tuple, list)):
                    out = out[0]
                if not isinstance(out, Tensor):
                    raise TypeError(f"layer {name!r} returned {type(out).__name__}, expected a Tensor")
                captured[name].append(out if grad else out.detach())
            return hook

        try:
            for name, module in self.modules.items():
                handles.append(module.register_forward_hook(make_hook(name)))
            with torch.set_grad_enabled(grad):
                outputs = self.model(x)
        finally:
            for h in handles:
                h.remove()
        if isinstance(outputs, (tuple, list)):
            outputs = outputs[0]
        if not isinstance(outputs, Tensor) or outputs.dim() < 2:
            raise ValueError(
                f"the model must return a Tensor of shape [B, C] (one score per class), got "
                f"{getattr(outputs, 'shape', type(outputs).__name__)}"
            )
        haps: dict[str, Tensor] = {}
        for name in self.layers:
            outs = captured[name]
            if not outs:
                raise LayerNotFoundError(
                    f"layer {name!r} never fired during the forward pass (it exists in the model but "
                    f"forward() did not call it); probed layers: {self.layers}"
                )
            if len(outs) > 1:
                raise ValueError(
                    f"layer {name!r} fired {len(outs)} times in one forward pass (a module reused in "
                    "forward); probe a module that runs once per input"
                )
            hap = outs[0].reshape(outs[0].shape[0], -1).to(self.device, torch.float32)
            check_finite(hap, f"the activations of layer {name!r}")
            haps[name] = hap
        outputs = outputs.reshape(outputs.shape[0], -1)
        return ProbeResult(outputs=outputs if grad else outputs.detach().to(self.device), haps=haps)
