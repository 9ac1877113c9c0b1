"""A layer probe for any forward function, with forward hooks as Captum's ``LayerActivation`` sets them.

:class:`CaptumForward` marks a forward function (any callable, a ``DataParallel`` model, a model that
needs extra forward arguments) together with the modules to probe. The adapter's ``libnet_layer_probe``
hook claims only such marker objects, so plain ``torch.nn.Module`` models keep the built-in probe.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from libnet_plugin import MultiInput
from libnet_plugin.errors import LayerNotFoundError
from libnet_plugin.probe import (
    ProbeResult,
    check_inputs_finite,
    eval_mode,
    flatten_activations,
    layer_output,
    model_device,
    unknown_layer_message,
)

__all__ = ["CaptumForward", "CaptumLayerProbe", "layer_activations"]


def _call(forward_func: Callable[..., Any], inputs: Tensor | tuple[Tensor, ...] | MultiInput,
          additional_forward_args: Any) -> Any:
    """``forward_func(*inputs, *additional_forward_args)`` as Captum calls it; a dict of inputs by keyword."""
    extra = () if additional_forward_args is None else (
        additional_forward_args if isinstance(additional_forward_args, tuple) else (additional_forward_args,))
    if isinstance(inputs, MultiInput):
        if isinstance(inputs.parts, dict):
            if extra:
                raise TypeError("inputs given by keyword (a dict batch) cannot be followed by additional_forward_args; "
                                "pass the inputs as a tuple")
            return forward_func(**inputs.parts)
        inputs = inputs.parts
    return forward_func(*(inputs if isinstance(inputs, tuple) else (inputs,)), *extra)


def layer_activations(forward_func: Callable[..., Any], modules: Sequence[nn.Module],
                      inputs: Tensor | tuple[Tensor, ...] | MultiInput, additional_forward_args: Any = None,
                      device_ids: list[int] | None = None, names: Sequence[str] | None = None
                      ) -> tuple[Any, list[Tensor]]:
    """Run ``forward_func`` once with a forward hook on each module; return its output and each layer's HAP.

    The hooks work as Captum's ``LayerActivation`` does (one forward pass, no gradients, a copy of each
    module's output; with a ``DataParallel`` forward function, the replicas' outputs are put together in
    the order of ``device_ids``), and read a module's output as the core's :class:`TorchLayerProbe` does
    (:func:`libnet_plugin.probe.layer_output`: the first tensor of a tuple such as ``nn.LSTM``'s or
    ``nn.MultiheadAttention``'s), so every module the core probes can be probed here.

    Args:
        forward_func (Callable): the model or any function of it, called as
            ``forward_func(*inputs, *additional_forward_args)``.
        modules (list[torch.nn.Module]): the layers to record (their forward outputs).
        inputs (Tensor, tuple[Tensor, ...] or MultiInput): the batch, first dimension = examples; a
            ``MultiInput`` of a dict batch is passed by keyword.
        additional_forward_args (Any, optional): passed after the inputs, as in Captum. Default: None
        device_ids (list[int], optional): for ``DataParallel`` forward functions, as in Captum. Default: None
        names (list[str], optional): the layer names, for error messages. Default: None

    Returns:
        ``(output, haps)``: whatever ``forward_func`` returned (run in eval mode: the model behind
        ``forward_func`` when it is a module or a bound method of one, and the probed modules, with every
        mode restored afterwards), and one ``Tensor[B, D]`` per module, flattened per input, in input
        order, on the module's device and in its dtype. The hooks are removed in ``finally``.

    Raises:
        LayerNotFoundError: a module did not run during the forward pass.
        ValueError: a module ran more than once in the forward pass.
        TypeError: a module's output holds no tensor.
        NonFiniteError: a layer's output holds NaN or infinity (the message names the layer).
    """
    shown = list(names) if names is not None else [type(m).__name__ for m in modules]
    if device_ids is None:
        device_ids = getattr(forward_func, "device_ids", None)
    owner = forward_func if isinstance(forward_func, nn.Module) else getattr(forward_func, "__self__", None)
    #: per module: {device: [outputs]} (a DataParallel replica runs on each device, in its own thread)
    saved: list[dict[torch.device, list[Tensor]]] = [{} for _ in modules]
    lock = threading.Lock()

    def make_hook(i: int) -> Callable[..., None]:
        def hook(module: nn.Module, _inp: Any, out: Any) -> None:
            t = layer_output(out, shown[i], module).detach().clone()
            with lock:
                saved[i].setdefault(t.device, []).append(t)
        return hook

    handles = []
    try:
        for i, module in enumerate(modules):
            handles.append(module.register_forward_hook(make_hook(i)))
        with eval_mode([owner if isinstance(owner, nn.Module) else None, *modules]), torch.no_grad():
            output = _call(forward_func, inputs, additional_forward_args)
    finally:
        for h in handles:
            h.remove()
    missing = [name for name, per_device in zip(shown, saved) if not per_device]
    if missing:
        raise LayerNotFoundError(
            f"the layers {missing} never fired during the forward pass (not submodules the forward function "
            "calls); probe modules that run once per input")
    acts: dict[str, Tensor] = {}
    for name, per_device in zip(shown, saved):
        calls = max(len(v) for v in per_device.values())
        if calls > 1:
            raise ValueError(f"layer {name!r} ran {calls} times in one forward pass (a module reused in forward); "
                             "probe a module that runs once per input")
        devices = list(per_device)
        if len(devices) > 1:  # DataParallel: the replicas' parts in the order of device_ids, as Captum does
            order = {d: device_ids.index(d.index) if device_ids and d.index in device_ids else len(devices)
                     for d in devices}
            devices.sort(key=lambda d: order[d])
            first = devices[0]
            acts[name] = torch.cat([per_device[d][0].to(first) for d in devices])
        else:
            acts[name] = per_device[devices[0]][0]
    haps = flatten_activations(acts)
    return output, list(haps.values())


class CaptumForward:
    """Marker: a forward function plus the named modules to probe, served by :func:`layer_activations`.

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

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> fwd = CaptumForward(model, {"hidden": model[0], "logits": model[2]})
        >>> r = CaptumLayerProbe(fwd, ["hidden", "logits"]).run(torch.randn(2, 4))
        >>> r.outputs.shape, {k: tuple(v.shape) for k, v in r.haps.items()}
        (torch.Size([2, 3]), {'hidden': (2, 8), 'logits': (2, 3)})
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

    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """Run the forward function once on ``x``; return its outputs ``[B, C]`` and the flattened HAPs.

        ``x`` is a batch tensor, or a :class:`~libnet_plugin.MultiInput` for a forward function of
        several inputs (``forward_func(a, b)`` from a batch ``((a, b), y)``; ``forward_func(**parts)`` from
        a dict batch).

        Args:
            x: the batch.

        Returns:
            the :class:`~libnet_plugin.probe.ProbeResult`.
        """
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        check_inputs_finite(x)
        device = model_device(self.modules, (x if isinstance(x, Tensor) else x.tensors()[0]).device)
        x = x.to(device)
        outputs, acts = layer_activations(self.model.forward_func, self.modules, x,
                                          self.model.additional_forward_args, self.model.device_ids, self.layers)
        return ProbeResult.from_activations(outputs, dict(zip(self.layers, acts)), self.device,
                                            what="the forward function")
