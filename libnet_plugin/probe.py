"""Layer probes: run a model on a batch and collect each probed layer's flattened activations (HAPs).

The built-in :class:`TorchLayerProbe` uses forward hooks on ``torch.nn.Module`` objects. Other model
formats (ONNX) are served by adapter plugins through the ``libnet_layer_probe`` hook.
"""

from __future__ import annotations

import contextlib
import difflib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from ._batches import MultiInput, input_tensors
from .errors import LayerNotFoundError, NonFiniteError

__all__ = ["ProbeResult", "LayerProbe", "ConfigurableProbe", "TorchLayerProbe", "eval_mode", "model_float_dtype", "check_inputs_finite", "check_finite", "unknown_layer_message", "model_device",
           "class_scores", "flatten_activations", "layer_output"]


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

    @classmethod
    def from_activations(cls, outputs: Any, activations: Mapping[str, Tensor], device: torch.device | str | None,
                         *, detach: bool = True, what: str = "the model",
                         output_name: str | None = None) -> ProbeResult:
        """The result of one probe run from the model's raw outputs and the layers' raw outputs.

        Every probe (torch hooks, ONNX Runtime, Captum) ends the same way: the outputs must be class
        scores ``[B, C]`` (see :func:`class_scores`), each activation is flattened per input, moved to
        ``device`` as float32 and checked for NaN/inf (see :func:`flatten_activations`).
        """
        outputs = class_scores(outputs, what, output_name)
        if detach:
            outputs = outputs.detach()
        return cls(outputs=outputs if device is None else outputs.to(device),
                   haps=flatten_activations(activations, device))


def class_scores(outputs: Any, what: str = "the model", output_name: str | None = None) -> Tensor:
    """``outputs`` as ``Tensor[B, C]``; a clear error otherwise (naming ``what`` returned it and, where the
    model's outputs have names, ``output_name``).

    ``outputs`` may be the tensor, a tuple/list (its first item), or a mapping such as a HuggingFace
    ``ModelOutput`` (its ``"logits"``, else its first value).

    Example:
        >>> import torch
        >>> class_scores({"loss": torch.tensor(0.5), "logits": torch.zeros(2, 3)}).shape
        torch.Size([2, 3])
    """
    if isinstance(outputs, Mapping) and outputs:
        outputs = outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))
    if isinstance(outputs, (tuple, list)) and outputs:
        outputs = outputs[0]
    if not isinstance(outputs, Tensor) or outputs.dim() < 2:
        got = list(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
        named = f"output {output_name!r} of shape {got}" if output_name is not None else str(got)
        raise ValueError(f"{what} must return a Tensor of shape [B, C] (one score per class), got {named}")
    return outputs.flatten(1)


def flatten_activations(activations: Mapping[str, Tensor], device: torch.device | str | None = None
                        ) -> dict[str, Tensor]:
    """``{layer: Tensor[B, D]}``: each activation flattened per input, as float32 on ``device`` (left where
    it is for ``None``), checked for NaN and infinity (the error names the layer)."""
    haps = {}
    for name, act in activations.items():
        flat = act.flatten(1) if act.dim() > 1 else act.reshape(act.shape[0], 1)  # works for empty batches too
        hap = flat.to(device if device is not None else act.device, torch.float32)
        check_finite(hap, f"the activations of layer {name!r}")
        haps[name] = hap
    return haps


def layer_output(out: Any, layer: str) -> Tensor:
    """The tensor that stands for a module's forward output ``out`` (what :class:`TorchLayerProbe` records):
    a Tensor as it is, the first value of a mapping (a HuggingFace ``BaseModelOutput``: its hidden states),
    the first item of a tuple or list (``nn.LSTM``'s ``(output, (h, c))``, ``nn.MultiheadAttention``'s
    ``(output, None)``). For probes other than hooks on a torch module (the Captum adapter's).

    Raises:
        TypeError: that is not a Tensor (the message names ``layer``).

    Example:
        >>> import torch
        >>> layer_output((torch.zeros(2, 3), (torch.ones(1), torch.ones(1))), "lstm").shape
        torch.Size([2, 3])
    """
    if isinstance(out, Mapping) and out:
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"layer {layer!r} returned {type(out).__name__}, expected a Tensor")
    return out


@runtime_checkable
class LayerProbe(Protocol):
    """What a ``libnet_layer_probe`` hook returns."""

    layers: list[str]

    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """Run the model once on the batch ``x`` and return outputs and HAPs of every probed layer."""
        ...


@runtime_checkable
class ConfigurableProbe(LayerProbe, Protocol):
    """A :class:`LayerProbe` with settings that a saved library network keeps (the ONNX probe's output choice).

    ``config()`` is saved with the network; ``restore(config)`` is called on the new probe at load.
    """

    def config(self) -> dict[str, Any]: ...

    def restore(self, config: Mapping[str, Any]) -> None: ...


def check_inputs_finite(x: Tensor | MultiInput, what: str = "the input batch") -> None:
    """:func:`check_finite` on every floating tensor of a batch's inputs (integer ids are left alone)."""
    for t in input_tensors(x):
        if t.is_floating_point():
            check_finite(t, what)


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


def unknown_layer_message(name: str, valid: Sequence[str], kind: str = "model", reason: str | None = None) -> str:
    """A message naming an unknown layer, close matches, and the valid names.

    ``reason`` replaces the opening "layer ... does not exist in the ..." (with its close matches) when the
    caller knows better why the name cannot be used.
    """
    if reason is None:
        close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        reason = f"layer {name!r} does not exist in the {kind}.{hint}"
    shown = list(valid)[:40]
    more = f" (and {len(valid) - 40} more)" if len(valid) > 40 else ""
    return f"{reason} Valid layer names: {shown}{more}"


def model_device(modules: nn.Module | Sequence[nn.Module], fallback: torch.device | None = None) -> torch.device:
    """The device of the first parameter or buffer of a module (or of a list of modules); ``fallback``
    (CPU by default) when they hold none."""
    for m in [modules] if isinstance(modules, nn.Module) else modules:
        for t in m.parameters():
            return t.device
        for t in m.buffers():
            return t.device
    return fallback if fallback is not None else torch.device("cpu")


#: held while a probe run switches a model from training to eval mode and back
_MODE_LOCK = threading.RLock()


def model_float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the first floating parameter (or buffer) of ``model``; ``None`` when it has none.

    Example:
        >>> from torch import nn
        >>> model_float_dtype(nn.Linear(2, 2).half())
        torch.float16
    """
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


@contextlib.contextmanager
def eval_mode(modules: nn.Module | Iterable[nn.Module | None]) -> Iterator[None]:
    """Put ``modules`` (and all their submodules) in eval mode for the ``with`` block, then restore each one's mode.

    This is the project's train-mode policy: a probe never runs a model in training mode (dropout would
    make two calls differ, batch-norm would update its running statistics), and never leaves a mode
    changed. A model already in eval mode is left alone; callers that have to switch modes take turns
    (a lock), so call ``model.eval()`` once before probing from several threads.

    Example:
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with eval_mode(model):
        ...     model.training, model[1].training
        (False, False)
        >>> model.training, model[1].training
        (True, True)
    """
    roots = [modules] if isinstance(modules, nn.Module) else [m for m in modules if m is not None]
    if not any(m.training for root in roots for m in root.modules()):
        yield  # already in eval mode (the usual case, and the one to use from several threads): nothing to do
        return
    with _MODE_LOCK:  # callers that switch modes take turns, so none sees another's restored training mode
        modes = [(m, m.training) for root in roots for m in root.modules()]
        try:
            for root in roots:
                root.eval()
            yield
        finally:
            for m, training in modes:
                m.training = training


class TorchLayerProbe:
    """Probe the named submodules of a ``torch.nn.Module`` with forward hooks.

    The HAP of a layer is the module's forward output, as the module returned it, flattened per sample
    (see :meth:`run` for in-place writes and train mode). Hooks are registered for the duration of one
    forward pass and removed in ``finally``, also when the model raises.

    Args:
        model: the classifier; its outputs must be ``[B, C]`` (logits or log-probabilities), or a tuple
            or mapping holding them (a HuggingFace ``ModelOutput``: its ``logits``).
        layers: names as given by ``model.named_modules()`` (e.g. ``"conv1"``, ``"layer2.3"``). A module
            that runs several times in one forward pass (ALBERT's shared layer) is probed at one call:
            ``"name#1"`` for the first, ``"name#2"`` for the second, and so on. A module returning a tuple
            or a mapping (``BaseModelOutput``) is recorded by its first tensor (the hidden states).
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
        self.device = torch.device(device) if device is not None else model_device(model)
        modules = dict(model.named_modules())
        valid = [n for n in modules if n]
        self.modules: dict[str, nn.Module] = {}
        #: layer name -> (module name, which call of it: 1, 2, ... for ``"name#k"``; None: the only call)
        self.calls: dict[str, tuple[str, int | None]] = {}
        for name in self.layers:
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
            base, call = name, None
            if "#" in name:
                base, _, k = name.rpartition("#")
                if not k.isdigit() or int(k) < 1:
                    raise ValueError(f"layer {name!r}: after '#' comes which call of the module to record "
                                     f"(1 for the first), got {k!r}")
                call = int(k)
            if base not in modules or base == "":
                raise LayerNotFoundError(unknown_layer_message(base, valid, kind=type(model).__name__))
            self.modules[name] = modules[base]
            self.calls[name] = (base, call)
        self._base_modules = {base: modules[base] for base, _ in self.calls.values()}
        #: layers whose output the model overwrites in place later in its forward pass: copied in the hook
        self.copied_layers: set[str] = set()

    def __repr__(self) -> str:
        return f"TorchLayerProbe(model={type(self.model).__name__}, layers={self.layers})"

    def run(self, x: Tensor | MultiInput, *, grad: bool = False) -> ProbeResult:
        """Run the model on ``x`` and return its outputs and the flattened HAPs of every probed layer.

        ``x`` is a batch tensor (``model(x)``) or a :class:`~libnet_plugin._batches.MultiInput` of several
        (``model(*tensors)`` or ``model(**tensors)``, e.g. ``input_ids`` and ``attention_mask``).

        The model runs in eval mode (dropout off, batch-norm running statistics used and left unchanged);
        the caller's train/eval mode of every submodule is restored afterwards. The HAP of a layer is
        the module's output as the module returned it: when a later operation of the forward pass writes
        into that tensor in place (``ReLU(inplace=True)``, ``out += identity``), the probe notices it
        through the tensor's version counter, runs the batch again with a copy taken for that layer,
        and takes copies for it from then on (so models without in-place writes pay nothing).

        Args:
            x: a batch of inputs ``[B, ...]``; moved to the model's device, floating tensors cast to the
                model's floating dtype.
            grad: keep the autograd graph (for attacks); default runs under ``torch.no_grad()``.
        """
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        device = model_device(self.model, self.device)
        dtype = model_float_dtype(self.model)

        def prepare(t: Tensor) -> Tensor:  # floating inputs take the model's dtype; integer ids stay as they are
            if t.is_floating_point():
                return t.to(device, dtype if dtype is not None else t.dtype)
            return t.to(device)

        for t in input_tensors(x):
            if t.is_meta:
                raise ValueError(f"the input batch of shape {list(t.shape)} is on the 'meta' device and holds no "
                                 "values; pass real data")
        check_inputs_finite(x)
        x = x.map(prepare) if isinstance(x, MultiInput) else prepare(x)
        outputs, captured, overwritten = self._forward(x, grad)
        if overwritten:
            self.copied_layers.update(overwritten)
            outputs, captured, overwritten = self._forward(x, grad)
            if overwritten:  # pragma: no cover - a copy taken in the hook cannot be written by the model
                raise RuntimeError(f"the activations of layers {overwritten} changed after they were copied")
        return ProbeResult.from_activations(outputs, captured, self.device, detach=not grad)

    def _forward(self, x: Tensor | MultiInput, grad: bool) -> tuple[Any, dict[str, Tensor], list[str]]:
        """One forward pass with the hooks: outputs, the HAP per layer, the layers overwritten in place."""
        by_module = {base for base, _ in self.calls.values()}
        captured: dict[str, list[tuple[Tensor, int]]] = {base: [] for base in by_module}
        copied = {self.calls[name][0] for name in self.copied_layers}
        handles = []

        caller = threading.get_ident()

        def make_hook(base: str):
            copy = base in copied

            def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
                if threading.get_ident() != caller:  # another thread's forward pass of the same model
                    return
                if isinstance(out, Mapping) and out:  # e.g. a HuggingFace BaseModelOutput: its hidden states
                    out = next(iter(out.values()))
                if isinstance(out, (tuple, list)) and out:
                    out = out[0]
                if not isinstance(out, Tensor):
                    raise TypeError(f"layer {base!r} returned {type(out).__name__}, expected a Tensor")
                kept = out if grad else out.detach()
                captured[base].append((kept.clone() if copy else kept, out._version))
            return hook

        try:
            for base in sorted(by_module):
                handles.append(self._base_modules[base].register_forward_hook(make_hook(base)))
            with eval_mode(self.model), torch.set_grad_enabled(grad):
                outputs = x.call(self.model) if isinstance(x, MultiInput) else self.model(x)
        finally:
            for h in handles:
                h.remove()
        picked: dict[str, tuple[Tensor, int]] = {}
        for name in self.layers:
            base, call = self.calls[name]
            outs = captured[base]
            if not outs:
                raise LayerNotFoundError(
                    f"layer {base!r} never fired during the forward pass (it exists in the model but "
                    f"forward() did not call it); probed layers: {self.layers}"
                )
            if call is None and len(outs) > 1:
                raise ValueError(
                    f"layer {name!r} fired {len(outs)} times in one forward pass (a module reused in forward, "
                    f"as ALBERT's shared layers are); name one call: '{name}#1' ... '{name}#{len(outs)}'"
                )
            if call is not None and call > len(outs):
                raise LayerNotFoundError(f"layer {name!r}: the module {base!r} ran {len(outs)} time(s) in the "
                                         f"forward pass, so there is no call {call}")
            picked[name] = outs[(call or 1) - 1]
        overwritten = [name for name in self.layers
                       if name not in self.copied_layers and picked[name][0]._version != picked[name][1]]
        return outputs, {name: picked[name][0] for name in self.layers}, overwritten
