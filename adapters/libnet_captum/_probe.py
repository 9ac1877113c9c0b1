"""A layer probe built on Captum's ``LayerActivation`` (captum is imported only when a probe runs).

:class:`CaptumForward` marks a forward function (any callable, a ``DataParallel`` model, a model that
needs extra forward arguments) together with the modules to probe. The adapter's ``libnet_layer_probe``
hook claims only such marker objects, so plain ``torch.nn.Module`` models keep the built-in probe.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from libnet_plugin.errors import LayerNotFoundError
from libnet_plugin.probe import (
    ProbeResult,
    check_finite,
    eval_mode,
    flatten_activations,
    model_device,
    unknown_layer_message,
)

__all__ = ["CaptumForward", "CaptumLayerProbe", "layer_activations"]


def layer_activations(forward_func: Callable[..., Any], modules: Sequence[nn.Module], inputs: Tensor | tuple[Tensor, ...],
                      additional_forward_args: Any = None, device_ids: list[int] | None = None,
                      names: Sequence[str] | None = None) -> tuple[Any, list[Tensor]]:
    """Run ``forward_func`` once through Captum's ``LayerActivation``; return its output and each layer's HAP.

    Args:
        forward_func (Callable): the model or any function of it, called as
            ``forward_func(*inputs, *additional_forward_args)``.
        modules (list[torch.nn.Module]): the layers to record (their forward outputs).
        inputs (Tensor or tuple[Tensor, ...]): the batch, first dimension = examples.
        additional_forward_args (Any, optional): passed after the inputs, as in Captum. Default: None
        device_ids (list[int], optional): for ``DataParallel`` forward functions, as in Captum. Default: None
        names (list[str], optional): the layer names, for error messages. Default: None

    Returns:
        ``(output, haps)``: whatever ``forward_func`` returned (run in eval mode: the model behind
        ``forward_func`` when it is a module or a bound method of one, and the probed modules, with every
        mode restored afterwards), and one ``Tensor[B, D]`` per module: the
        module's output (the first element when a module returns a tuple), detached and flattened per
        input, in input order, on the module's device and in its dtype. Captum registers its hooks for
        this one forward pass and removes them in ``finally``.

    Raises:
        LayerNotFoundError: a module did not run during the forward pass.
        NonFiniteError: a layer's output holds NaN or infinity (the message names the layer).
    """
    from captum.attr import LayerActivation

    captured: list[Any] = []

    def forward(*args: Any) -> Any:  # keeps the model's output of the same forward pass
        out = forward_func(*args)
        captured.append(out)
        return out

    shown = list(names) if names is not None else [type(m).__name__ for m in modules]
    if device_ids is None:
        device_ids = getattr(forward_func, "device_ids", None)
    owner = forward_func if isinstance(forward_func, nn.Module) else getattr(forward_func, "__self__", None)
    try:
        with eval_mode([owner if isinstance(owner, nn.Module) else None, *modules]):
            acts = LayerActivation(forward, list(modules), device_ids).attribute(
                inputs, additional_forward_args=additional_forward_args)
    except (AssertionError, KeyError) as exc:
        # Captum raises these after the forward pass when a hooked module did not run; anything raised by
        # the model itself (nothing captured yet) or for another reason is passed on unchanged.
        if not captured or (isinstance(exc, AssertionError) and "did not obtain any outputs" not in str(exc)):
            raise
        raise LayerNotFoundError(
            f"at least one of the layers {shown} never fired during the forward pass (it is not a submodule "
            "the forward function calls); probe modules that run once per input") from exc
    haps = flatten_activations({name: a[0] if isinstance(a, (tuple, list)) else a for name, a in zip(shown, acts)})
    return captured[-1], list(haps.values())


class CaptumForward:
    """Marker: a forward function plus the named modules to probe, served by Captum's ``LayerActivation``.

    Pass it as the model of a :class:`libnet_plugin.LibraryNetwork` to build libraries for any callable
    Captum accepts (a function wrapping a model, a ``DataParallel`` model, a model with extra forward
    arguments). :class:`libnet_captum.LibraryAttribution.fit` builds one when it needs to.

    Args:
        forward_func (Callable): the model or any function of it; must return ``[B, C]`` class scores.
        layers (Mapping[str, torch.nn.Module]): ``{name: module}`` of the layers that may be probed.
        device_ids (list[int], optional): for ``DataParallel`` forward functions, as in Captum.
            Default: None
        additional_forward_args (Any, optional): constant extra arguments passed after the inputs.
            Default: None

    Examples::

        >>> import torch, libnet_plugin as lnp
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> fwd = CaptumForward(lambda x: model(x).log_softmax(1), {"hidden": model[0], "logits": model[2]})
        >>> net = lnp.LibraryNetwork(fwd, ["hidden", "logits"], thresholds=0.9).fit(torch.randn(32, 4))
        >>> net.predict_scores(torch.randn(2, 4))["hidden"].shape
        torch.Size([2, 3])
    """

    def __init__(self, forward_func: Callable[..., Any], layers: Mapping[str, nn.Module],
                 device_ids: list[int] | None = None, additional_forward_args: Any = None):
        if not callable(forward_func):
            raise TypeError(f"forward_func must be callable, got {type(forward_func).__name__}")
        if not isinstance(layers, Mapping) or not layers:
            raise TypeError("layers must be a non-empty {name: torch.nn.Module} mapping, got "
                            f"{type(layers).__name__}")
        for name, module in layers.items():
            if not isinstance(name, str) or not isinstance(module, nn.Module):
                raise TypeError(f"layers must map names (str) to torch.nn.Module objects, got {name!r}: "
                                f"{type(module).__name__}")
        self.forward_func = forward_func
        self.layers = dict(layers)
        self.device_ids = device_ids
        self.additional_forward_args = additional_forward_args

    def __repr__(self) -> str:
        fn = getattr(self.forward_func, "__qualname__", type(self.forward_func).__name__)
        return f"CaptumForward(forward_func={fn}, layers={list(self.layers)})"


class CaptumLayerProbe:
    """The layer probe the adapter's hook returns for a :class:`CaptumForward` (see ``LayerProbe``).

    Args:
        model (CaptumForward): the forward function and its named modules.
        layers (list[str]): names of ``model.layers`` to probe, in order.
        device (torch.device, optional): where the returned HAPs and outputs live. Default: the device
            of the probed modules.
    """

    def __init__(self, model: CaptumForward, layers: Sequence[str], device: torch.device | str | None = None):
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.layers = list(layers)
        for name in self.layers:
            if name not in model.layers:
                raise LayerNotFoundError(unknown_layer_message(name, list(model.layers), kind="CaptumForward"))
        self.modules = [model.layers[n] for n in self.layers]
        self.device = torch.device(device) if device is not None else model_device(self.modules)

    def __repr__(self) -> str:
        return f"CaptumLayerProbe(model={self.model!r}, layers={self.layers})"

    def run(self, x: Tensor) -> ProbeResult:
        """Run the forward function once on ``x``; return its outputs ``[B, C]`` and the flattened HAPs."""
        if not isinstance(x, Tensor):
            raise TypeError(f"inputs must be a torch.Tensor, got {type(x).__name__}")
        check_finite(x, "the input batch")
        x = x.to(model_device(self.modules, x.device))
        outputs, acts = layer_activations(self.model.forward_func, self.modules, x,
                                          self.model.additional_forward_args, self.model.device_ids, self.layers)
        return ProbeResult.from_activations(outputs, dict(zip(self.layers, acts)), self.device,
                                            what="the forward function")
