"""Layer probes: run a model on a batch and collect each probed layer's flattened activations (HAPs).

The built-in :class:`TorchLayerProbe` uses forward hooks on ``torch.nn.Module`` objects. Other model
formats (ONNX) are served by adapter plugins through the ``libnet_layer_probe`` hook.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import threading
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from ._batches import MultiInput, input_tensors, n_rows
from .errors import LayerNotFoundError, NonFiniteError, ShapeMismatchError

__all__ = ["ProbeResult", "LayerProbe", "ConfigurableProbe", "TorchLayerProbe", "eval_mode", "model_float_dtype", "check_inputs_finite", "check_finite", "unknown_layer_message", "model_device",
           "class_scores", "flatten_activations", "layer_output", "sequence_first", "check_keywords", "LayerSpec",
           "parse_layer_spec", "SPEC_ACTIVATIONS", "auto_layers", "AUTO_N_LAYERS", "first_layer"]


@dataclass
class ProbeResult:
    """What one probe run returns.

    Attributes:
        outputs: the model's outputs, ``Tensor[B, C]`` (logits or log-probabilities), detached.
        haps: ``{layer: Tensor[B, D_layer]}`` flattened, un-normalised activations, float32, on the
            device of the library network, in the probe's layer order.

    Example:
        >>> r = ProbeResult(outputs=torch.tensor([[0.1, 2.0], [3.0, -1.0]]), haps={"fc": torch.ones(2, 4)})
        >>> r.answers, r.haps["fc"].shape
        (tensor([1, 0]), torch.Size([2, 4]))
    """

    outputs: Tensor
    haps: dict[str, Tensor]

    @property
    def answers(self) -> Tensor:
        """The model's answers.

        Returns:
            the argmax of the outputs, ``LongTensor[B]``.
        """
        return self.outputs.argmax(dim=1)

    @classmethod
    def from_activations(cls, outputs: Any, activations: Mapping[str, Tensor], device: torch.device | str | None,
                         *, detach: bool = True, what: str = "the model",
                         output_name: str | None = None) -> ProbeResult:
        """The result of one probe run from the model's raw outputs and the layers' raw outputs.

        Every probe (torch hooks, ONNX Runtime, Captum) ends the same way: the outputs must be class
        scores ``[B, C]`` (see :func:`class_scores`), each activation is flattened per input, moved to
        ``device`` as float32 and checked for NaN/inf (see :func:`flatten_activations`).

        Args:
            outputs: the model's raw outputs.
            activations: ``{layer: raw output}``.
            device: where the HAPs go (``None``: where they are).
            detach: detach the outputs from the autograd graph.
            what: how error messages name the model.
            output_name: the name of the output to read when the model returns several.

        Returns:
            the :class:`ProbeResult`.
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
    if outputs.dim() > 2 and any(s != 1 for s in outputs.shape[2:]):
        named = f"output {output_name!r} of shape" if output_name is not None else "a Tensor of shape"
        raise ValueError(
            f"{what} returned {named} {list(outputs.shape)}, not class scores [B, C] (one score per class): its "
            f"{outputs.shape[1] * math.prod(outputs.shape[2:])} values per input would be read as that many classes. "
            "Wrap the model so that it returns [B, C] (for example a module whose forward returns "
            "model(x)[:, :, -1] or model(x).mean(dim=-1)); an ONNX model with several outputs takes output=")
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


def layer_output(out: Any, layer: str, module: nn.Module | None = None) -> Tensor:
    """The tensor that stands for a module's forward output ``out``, read as :class:`TorchLayerProbe` reads it,
    for probes other than its own hooks (the Captum adapter's): a Tensor as it is; a PackedSequence unpacked
    batch-first; the first value of a mapping (a HuggingFace ``BaseModelOutput``: its hidden states) or the first
    item of a tuple or list (``nn.LSTM``'s ``(output, (h, c))``, ``nn.MultiheadAttention``'s ``(output, None)``);
    a NestedTensor padded with zeros; and, when ``module`` is given and puts the sequence first
    (:func:`sequence_first`), ``[T, B, ...]`` transposed to ``[B, T, ...]``.

    Raises:
        TypeError: that is not a Tensor (the message names ``layer``).

    Example:
        >>> import torch
        >>> layer_output((torch.zeros(2, 3), (torch.ones(1), torch.ones(1))), "lstm").shape
        torch.Size([2, 3])
        >>> layer_output((torch.zeros(5, 2, 3), None), "lstm", nn.LSTM(4, 3)).shape  # [T, B, F] -> [B, T, F]
        torch.Size([2, 5, 3])
    """
    packed = isinstance(out, PackedSequence) or (
        isinstance(out, (tuple, list)) and bool(out) and isinstance(out[0], PackedSequence))
    out = _first_tensor(out)
    if not isinstance(out, Tensor):
        raise TypeError(f"layer {layer!r} returned {type(out).__name__}, expected a Tensor")
    if out.is_nested:
        return _padded(out, None)
    if module is not None and not packed and out.dim() >= 3 and sequence_first(module):
        return out.transpose(0, 1)
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
    """A :class:`LayerProbe` with settings that a saved library network keeps (the ONNX probe's output choice,
    the torch probe's batch dimensions).

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


_TORCHSCRIPT_MESSAGE = (
    "{what} is a TorchScript module (torch.jit.script or torch.jit.trace): it runs its compiled graph without "
    "calling its submodules' forward, so its layers cannot be probed. Three forms work: the eager nn.Module it "
    "was made from (the same weights, so a detector fitted on it serves the same model); "
    "torch.export.export(model, (x,)).module(), probed through the exported graph; or an ONNX export with the "
    "ONNX adapter (pip install 'libnet-plugin[onnx]')")


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` is ``torch.compile(module)`` (an ``OptimizedModule`` around ``model._orig_mod``)."""
    return type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module)


def _is_exported(model: nn.Module) -> bool:
    """Whether ``model`` is ``ExportedProgram.module()``: a graph whose nodes name the modules that made them."""
    if not isinstance(model, torch.fx.GraphModule) or type(model.graph._codegen).__name__ != "_PyTreeCodeGen":
        return False
    return any(n.op == "call_function" and n.meta.get("nn_module_stack") for n in model.graph.nodes)


def sequence_first(module: nn.Module) -> bool | None:
    """Whether ``module`` returns its outputs sequence-first (``[T, B, ...]``) by its ``batch_first`` flag.

    ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN``, ``nn.MultiheadAttention`` and ``nn.Transformer`` carry the flag;
    ``nn.TransformerEncoder(Layer)`` and ``nn.TransformerDecoder(Layer)`` follow their attention's. ``None``
    for any other module (a ``batch_first`` attribute of a module of one's own is not read).

    Example:
        >>> from torch import nn
        >>> sequence_first(nn.LSTM(4, 8)), sequence_first(nn.GRU(4, 8, batch_first=True)), sequence_first(nn.ReLU())
        (True, False, None)
    """
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return sequence_first(module.layers[0]) if len(module.layers) else None
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention, nn.Transformer)):
        return not module.batch_first
    return None


def _first_tensor(out: Any) -> Any:
    """The output that a layer's HAP is read from: a PackedSequence unpacked batch-first; else the first item
    of a mapping (a HuggingFace ``BaseModelOutput``'s hidden states) or of a tuple/list (an LSTM's output)."""
    if isinstance(out, PackedSequence):
        return pad_packed_sequence(out, batch_first=True)[0]
    if isinstance(out, Mapping) and out:
        out = next(iter(out.values()))
    if isinstance(out, (tuple, list)) and out and not isinstance(out, PackedSequence):
        out = out[0]
    if isinstance(out, PackedSequence):  # nn.LSTM on packed input: (PackedSequence, (h, c))
        return pad_packed_sequence(out, batch_first=True)[0]
    return out


def _padded(out: Tensor, length: int | None) -> Tensor:
    """A NestedTensor (``nn.TransformerEncoder``'s fast path with a padding mask) as a padded batch-first
    tensor, zero at the padded positions (as the encoder's own output is), padded to ``length`` steps."""
    dense = out.to_padded_tensor(0.0)
    if length is not None and dense.dim() >= 2 and dense.shape[1] < length:
        pad = [0, 0] * (dense.dim() - 2) + [0, length - dense.shape[1]]
        dense = torch.nn.functional.pad(dense, pad)
    return dense


#: the activations a layer spec may apply after a module's output (``"conv1:relu"``)
SPEC_ACTIVATIONS: dict[str, Any] = {
    "relu": torch.relu, "gelu": torch.nn.functional.gelu, "silu": torch.nn.functional.silu,
    "sigmoid": torch.sigmoid, "tanh": torch.tanh,
}

_SPEC_FORMS = ("'MODULE' or 'MODULE:output' (what the module returns), 'MODULE:input' (its first input, as the "
               "model computed it before the call: after functional activations, pooling, flattening), "
               "'MODULE:ACT' (ACT applied to its output, ACT one of " + ", ".join(SPEC_ACTIVATIONS) + "); "
               "'MODULE#K...' for the K-th call of a module that runs several times")


@dataclass(frozen=True)
class LayerSpec:
    """A parsed layer spec: which module, which of its calls, its input or output, and an activation after it.

    Attributes:
        module: the ``model.named_modules()`` name.
        call: which call of the module (1, 2, ... for ``"name#k"``); ``None``: its only call.
        where: ``"output"`` (what the module returns) or ``"input"`` (its first input).
        activation: ``None``, or a name of :data:`SPEC_ACTIVATIONS` applied to the output.
    """

    module: str
    call: int | None = None
    where: str = "output"
    activation: str | None = None

    def apply(self, t: Tensor) -> Tensor:
        """``t`` with the spec's activation applied (``t`` itself without one)."""
        return t if self.activation is None else SPEC_ACTIVATIONS[self.activation](t)


def parse_layer_spec(spec: Any, modules: Any = None) -> LayerSpec:
    """Parse a layer spec: ``MODULE[#K][:WHERE]``, ``WHERE`` one of ``output`` (the default), ``input`` or an
    activation of :data:`SPEC_ACTIVATIONS` applied to the output.

    ``"conv1"`` / ``"conv1:output"`` is what ``conv1`` returns; ``"fc1:input"`` what ``fc1`` receives (on a net
    whose forward computes ``fc1(flatten(pool(relu(conv2(x)))))``: conv2's block after its functional ReLU,
    pooling and flattening, the general way to probe what no module returns); ``"conv1:relu"`` is
    ``relu(conv1(x))``. A module whose own name holds ``':'`` is taken by that name when ``modules`` (the
    names of the model's modules) holds it.

    Raises:
        ValueError: a malformed spec (the message names it and the valid forms).

    Example:
        >>> parse_layer_spec("fc1:input")
        LayerSpec(module='fc1', call=None, where='input', activation=None)
        >>> parse_layer_spec("layer.0#2:relu")
        LayerSpec(module='layer.0', call=2, where='output', activation='relu')
        >>> parse_layer_spec("conv1:softplus")
        Traceback (most recent call last):
        ...
        ValueError: layer spec 'conv1:softplus': unknown part 'softplus' after ':'; valid forms: ...
    """
    if not isinstance(spec, str):
        raise TypeError(f"layer names must be strings, got {type(spec).__name__}: {spec!r}")
    base, where, activation = spec, "output", None
    if ":" in spec and not (modules is not None and spec.split("#")[0] in modules):
        base, _, part = spec.rpartition(":")
        if part == "input":
            where = "input"
        elif part in SPEC_ACTIVATIONS:
            activation = part
        elif part != "output":
            raise ValueError(f"layer spec {spec!r}: unknown part {part!r} after ':'; valid forms: {_SPEC_FORMS}")
    call = None
    if "#" in base:
        base, _, k = base.rpartition("#")
        if not k.isdigit() or int(k) < 1:
            raise ValueError(f"layer {spec!r}: after '#' comes which call of the module to record "
                             f"(1 for the first), got {k!r}")
        call = int(k)
    if not base:
        raise ValueError(f"layer spec {spec!r} names no module; valid forms: {_SPEC_FORMS}")
    return LayerSpec(base, call, where, activation)


def _parametrised_calls(model: nn.Module, x: Tensor | MultiInput,
                        what: str) -> tuple[nn.Module, list[tuple[str, Any]], int]:
    """One forward pass over ``x``: the model run (a compiled model's original), its calls of the leaf
    modules that hold a weight matrix or kernel in call order (name, first input) and the rows of ``x``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} reads a torch.nn.Module's forward pass; name the layers of this "
                        f"{type(model).__name__}")
    runner: Any = model._orig_mod if _is_compiled(model) else model
    names = {mod: name for name, mod in runner.named_modules() if name and not list(mod.children())
             and any(p.dim() >= 2 for p in mod.parameters(recurse=False))}
    rows = n_rows(x)
    calls: list[tuple[str, Any]] = []

    def hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
        inp = args[0] if args else next((v for v in kwargs.values() if isinstance(v, Tensor)), None)
        calls.append((names[mod], inp))

    device, dtype = model_device(runner), model_float_dtype(runner)

    def prepare(t: Tensor) -> Tensor:
        return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype)

    x = x.map(prepare) if isinstance(x, MultiInput) else prepare(x)
    handles = [mod.register_forward_pre_hook(hook, with_kwargs=True) for mod in names]
    try:
        with eval_mode(runner), torch.no_grad():
            x.call(runner) if isinstance(x, MultiInput) else runner(x)
    finally:
        for h in handles:
            h.remove()
    return runner, calls, rows


#: how many layers ``layers="auto"`` picks (:func:`auto_layers`)
AUTO_N_LAYERS = 4


def auto_layers(model: nn.Module, x: Tensor | MultiInput, n: int = AUTO_N_LAYERS, *, stem: bool = False) -> list[str]:
    """The layers ``layers="auto"`` probes: ``n`` block outputs after their activation, evenly spaced by depth.

    The rule: one forward pass over ``x`` (eval mode, no gradients) lists the leaf modules that hold a weight
    matrix or kernel (``Linear``, ``Conv*d``...) in the order the pass calls them; each one's input, as the
    model computed it (after the functional or module activations, pooling and flattening before it), is a
    candidate ``"MODULE:input"``, except the first module's input (the model's input) and inputs that are not
    floating ``[B, ...]`` tensors (token ids, sequence-first tensors), that another module read before (a
    shortcut convolution reading its block's input) or whose module runs more than once. ``n`` candidates
    are kept, evenly spaced, the first and the last always among them: the last is the final classifier's
    input, the penultimate features.

    Args:
        model: a ``torch.nn.Module`` (a compiled model's original is run).
        x: a batch of inputs (a Tensor, or a :class:`~libnet_plugin.MultiInput`).
        n: how many block outputs to keep.
        stem: also return :func:`first_layer`'s stem, first in the list, from the same forward pass.

    Returns:
        the layer names (the stem first with ``stem=True``).

    Raises:
        LayerNotFoundError: no candidate (a model with fewer than two parametrised modules): name the layers.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 8), nn.ReLU(),
        ...                       nn.Linear(8, 3))
        >>> auto_layers(model, torch.zeros(2, 1, 6, 6))
        ['3:input', '5:input']
        >>> auto_layers(model, torch.zeros(2, 1, 6, 6), stem=True)
        ['0', '3:input', '5:input']
    """
    runner, calls, rows = _parametrised_calls(model, x, "layers='auto'")
    blocks = _block_outputs(runner, calls, rows, n)
    return [_stem(runner, calls), *blocks] if stem else blocks


def _block_outputs(runner: nn.Module, calls: list[tuple[str, Any]], rows: int, n: int) -> list[str]:
    """:func:`auto_layers`' rule on the calls of one forward pass (:func:`_parametrised_calls`)."""
    counts: dict[str, int] = {}
    for name, _ in calls:
        counts[name] = counts.get(name, 0) + 1
    seen: set[tuple[Any, ...]] = set()
    candidates = []
    for i, (name, inp) in enumerate(calls):
        key = (inp.data_ptr(), tuple(inp.shape), inp.stride()) if isinstance(inp, Tensor) else None
        fresh = key is not None and key not in seen
        if key is not None:
            seen.add(key)
        if (i == 0 or not fresh or counts[name] > 1 or not inp.is_floating_point() or inp.dim() < 2
                or inp.shape[0] != rows):
            continue
        candidates.append(f"{name}:input")
    if not candidates:
        raise LayerNotFoundError(
            f"layers='auto' found no block output to probe in {type(runner).__name__} (it takes the inputs of the "
            "parametrised modules after the first, and found "
            f"{len(calls)} call(s) of such modules); name the layers, e.g. layers=['fc1:input']")
    if len(candidates) <= n:
        return candidates
    picks = sorted({round(i * (len(candidates) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [len(candidates) - 1]
    return [candidates[i] for i in picks]


def first_layer(model: nn.Module, x: Tensor | MultiInput) -> str:
    """The first parametrised module a forward pass calls (the stem: a first convolution, patch or token
    embedding), as a layer name: its output, before any activation or pooling.

    It finds what :func:`auto_layers` leaves out, the model's first transform of its input, where input-space
    perturbations show most (``libnet_plugin.detectors.fusion_recipe`` probes it). A module that runs more
    than once is named with its first call (``"name#1"``).

    Args:
        model: a ``torch.nn.Module`` (a compiled model's original is run).
        x: a batch of inputs, as :func:`auto_layers` takes it.

    Returns:
        the layer name.

    Raises:
        LayerNotFoundError: the pass called no module that holds a weight matrix or kernel.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3))
        >>> first_layer(model, torch.zeros(2, 1, 6, 6))
        '0'
    """
    runner, calls, _ = _parametrised_calls(model, x, "first_layer")
    return _stem(runner, calls)


def _stem(runner: nn.Module, calls: list[tuple[str, Any]]) -> str:
    """:func:`first_layer`'s rule on the calls of one forward pass (:func:`_parametrised_calls`)."""
    if not calls:
        raise LayerNotFoundError(f"first_layer found no module with a weight matrix or kernel called by "
                                 f"{type(runner).__name__}'s forward pass; name the layer")
    name = calls[0][0]
    return f"{name}#1" if sum(n == name for n, _ in calls) > 1 else name


#: what a layer whose output is not one row per input can do instead
_BATCH_FIX = ("A library needs one row per input: if the module puts the sequence first, build it with "
              "batch_first=True; or name the dimension of its output that holds the batch, "
              "LibraryNetwork(..., batch_dims={layer: dim}) (network_options={'batch_dims': ...} for a "
              "ConsistencyDetector); or probe a module whose output is [B, ...] (the enclosing block, or a small "
              "wrapper module that returns the output batch-first or pooled over the sequence)")

#: the store of the recording nodes added to an exported graph, per thread
_GRAPH_RECORD = threading.local()


def _graph_input(nodes: list[Any], inside: set[Any], layer: str) -> Any:
    """The node of an exported graph that is a module call's input: the first tensor that the call's first
    nodes read from outside the call (its parameters are attributes, not tensors computed by the graph)."""
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside and arg.op in ("call_function", "placeholder") and isinstance(
                    arg.meta.get("val"), Tensor):
                return arg
    raise LayerNotFoundError(f"layer {layer!r}: the exported graph holds no tensor input of this module call; "
                             "probe the output of the module before it instead")


def _record_graph_value(value: Any, layer: str) -> None:
    """Called by the nodes :class:`TorchLayerProbe` adds to an exported graph: keep ``value`` for ``layer``."""
    store = getattr(_GRAPH_RECORD, "store", None)
    if store is not None:
        store[layer] = value.clone() if isinstance(value, Tensor) else value


def check_batch_dims(batch_dims: Mapping[str, int] | None, layers: Sequence[str]) -> dict[str, int]:
    """``batch_dims`` checked against the probed ``layers``: ``{layer: dim}`` with every layer probed and every
    dim an int >= 0 (``None``: ``{}``).

    Raises:
        ValueError: a layer that is not probed, or a dimension that is not an int >= 0.

    Example:
        >>> check_batch_dims({"lstm": 1}, ["lstm", "head"])
        {'lstm': 1}
    """
    dims = {}
    for layer, d in dict(batch_dims or {}).items():
        if layer not in layers:
            raise ValueError(f"batch_dims names the layer {layer!r}, which is not probed; probed layers: {list(layers)}")
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"batch_dims[{layer!r}] must be a dimension index (an int >= 0), got {d!r}")
        dims[layer] = int(d)
    return dims


def _layer_batch_dims(probe: TorchLayerProbe) -> dict[str, int]:
    """Which dimension of each layer's output holds the batch, as ``probe`` reads it: the caller's
    :meth:`TorchLayerProbe.set_batch_dims`, else ``1`` for a sequence-first module (or one inside it; the probe
    transposes such outputs of 3 or more dimensions), else the exported graph's batch dimension, else ``0``.

    Returns:
        ``{layer: dim}`` for every probed layer, in layer order.

    Example:
        >>> from torch import nn
        >>> class Seq(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lstm, self.head = nn.LSTM(4, 8), nn.Linear(8, 3)
        ...     def forward(self, x):  # x [B, T, 4]
        ...         return self.head(self.lstm(x.transpose(0, 1))[0][-1])
        >>> _layer_batch_dims(TorchLayerProbe(Seq(), ["lstm", "head"]))
        {'lstm': 1, 'head': 0}
    """
    dims = {}
    for name in probe.layers:
        if name in probe.batch_dims:
            dims[name] = probe.batch_dims[name]
        elif probe.exported:
            dims[name] = probe._graph_batch_dims.get(name, 0)
        else:
            base = probe.calls[name][0]
            flagged = probe._seq_first.get(base, False) and not any(
                probe.calls[other][0] == base for other in probe.batch_dims)
            dims[name] = 1 if flagged else 0
    return dims


class TorchLayerProbe:
    """Probe the named submodules of a ``torch.nn.Module`` with forward hooks.

    The HAP of a layer is the module's forward output, as the module returned it, flattened per sample
    (see :meth:`run` for in-place writes and train mode). Hooks are registered for the duration of one
    forward pass and removed in ``finally``, also when the model raises.

    One row per input, always: a sequence-first module (``nn.LSTM``/``nn.GRU``/``nn.RNN``,
    ``nn.MultiheadAttention``, ``nn.TransformerEncoder(Layer)`` with ``batch_first=False``, PyTorch's
    default), and the modules inside it, are read by that flag and transposed to batch-first; a
    ``PackedSequence`` is unpacked (batch-first, padded with zeros); the NestedTensors that
    ``nn.TransformerEncoder`` hands its layers in eval mode are padded back to the input's length, and the
    positions the encoder's padding mask marks are zero in the HAPs of the encoder and the modules inside it
    whichever path it took (fast, or slow under grad or ``torch.compile``). Any other layer whose output
    does not have the batch as its first dimension is refused with its shape.

    Deployed forms: ``torch.compile(model)`` is probed by compiling the probed forward itself (the module it
    wraps, ``model._orig_mod``, run with the hooks, compiled once per probe with the model's own compile
    settings, so the hooks are traced into the probe's own graph: the output and the HAPs are the eager ones
    whatever the compiled model served before; if it cannot be compiled, the eager module runs, with a
    warning once; layer names with or without the ``_orig_mod.`` prefix); ``ExportedProgram.module()``
    through its graph (the last node each module's call produced, found from the graph's module-stack
    metadata, recorded by nodes added to a copy of the graph; the eager model's layer names). TorchScript
    modules are refused with the ways that work.

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

    def __init__(self, model: nn.Module, layers: Sequence[str], device: torch.device | str | None = None, *,
                 batch_dims: Mapping[str, int] | None = None):
        if isinstance(layers, str):
            layers = [layers]
        if isinstance(model, torch.jit.ScriptModule):
            raise TypeError(_TORCHSCRIPT_MESSAGE.format(what=type(model).__name__))
        self.model = model
        self.layers = list(layers)
        self.device = torch.device(device) if device is not None else model_device(model)
        #: the module that runs: the eager module behind torch.compile, else the model
        self.runner: nn.Module = model._orig_mod if _is_compiled(model) else model
        self.exported = _is_exported(model)
        #: torch.compile(model): the probed forward compiled with the model's own settings (made at first use;
        #: None after it failed once, when the eager module runs instead)
        self._dynamo_ctx = model.dynamo_ctx if _is_compiled(model) and hasattr(model, "dynamo_ctx") else None
        self._compiled_call: Any = None
        self._compile_lock = threading.Lock()
        self.modules: dict[str, nn.Module] = {}
        #: layer name -> (module name, which call of it: 1, 2, ... for ``"name#k"``; None: the only call)
        self.calls: dict[str, tuple[str, int | None]] = {}
        #: layers whose output the model overwrites in place later in its forward pass: copied in the hook
        self.copied_layers: set[str] = set()
        #: ``{layer: dimension of its output that holds the batch}`` named by the caller (see :meth:`set_batch_dims`)
        self.batch_dims: dict[str, int] = {}
        #: layer name -> its parsed spec (module, call, input or output, activation after it)
        self.specs: dict[str, LayerSpec] = {}
        if self.exported:
            self._init_graph()
        else:
            self._init_hooks()
        self.set_batch_dims(batch_dims)

    def set_batch_dims(self, batch_dims: Mapping[str, int] | None) -> None:
        """Name the dimension of a layer's output that holds the batch, ``{layer: dim}``, for a module that puts
        it elsewhere without a ``batch_first`` flag the probe reads; that dimension is moved first, and the
        probe's own reading (sequence-first flags) is not applied to the layer.

        Args:
            batch_dims: ``{layer: dim}`` (``None``: none).

        Example:
            >>> from torch import nn
            >>> class TimeMajor(nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
            ...     def forward(self, x):  # x [B, T, 4]; proj sees [T, B, 4]
            ...         return self.head(self.proj(x.transpose(0, 1)).mean(dim=0))
            >>> probe = TorchLayerProbe(TimeMajor(), ["proj"], batch_dims={"proj": 1})
            >>> tuple(probe.run(torch.randn(3, 5, 4)).haps["proj"].shape)
            (3, 30)
        """
        self.batch_dims = check_batch_dims(batch_dims, self.layers)

    def config(self) -> dict[str, Any]:
        """What a saved library network keeps of this probe: ``{"batch_dims": {layer: dim}}`` from
        :func:`_layer_batch_dims`, so that a probe of an export of the model (the ONNX adapter's, which sees no
        ``batch_first`` flag) reads each layer's batch where this probe read it.

        Returns:
            ``{"batch_dims": {layer: dim}}``.
        """
        return {"batch_dims": _layer_batch_dims(self)}

    def restore(self, config: Mapping[str, Any]) -> None:
        """Nothing to restore: this probe reads the modules' ``batch_first`` flags itself (a network saved by
        another probe loads as well).

        Args:
            config: what a probe's ``config()`` returned.
        """

    def _init_hooks(self) -> None:
        """An eager module: the modules to hook, and how to read each one's output."""
        model = self.model
        modules = dict(self.runner.named_modules())
        valid = [n for n in modules if n]
        for name in self.layers:
            spec = self.specs[name] = parse_layer_spec(name, modules)
            base, call = spec.module, spec.call
            key = base[len("_orig_mod."):] if self.runner is not model and base.startswith("_orig_mod.") else base
            if key not in modules or key == "":
                raise LayerNotFoundError(unknown_layer_message(base, valid, kind=type(self.runner).__name__))
            self.modules[name] = modules[key]
            self.calls[name] = (base, call)
        self._base_modules = {base: self.modules[name] for name, (base, _) in self.calls.items()}
        names = {id(m): n for n, m in modules.items()}
        #: module name -> whether its output is sequence-first: its own flag, else its nearest flagged ancestor's
        self._seq_first: dict[str, bool] = {}
        #: module name -> the nn.TransformerEncoder around it, or itself (its input's length pads NestedTensor
        #: outputs; the positions its padding mask marks are zero in the HAPs)
        self._encoders: dict[str, nn.Module] = {}
        for base, module in self._base_modules.items():
            path = names[id(module)]
            flag = None
            for k in range(path.count(".") + 1, -1, -1):
                anc = modules[".".join(path.split(".")[:k])] if k else self.runner
                if flag is None:
                    flag = sequence_first(anc)
                if isinstance(anc, nn.TransformerEncoder) and base not in self._encoders:
                    self._encoders[base] = anc
            self._seq_first[base] = bool(flag)

    def _init_graph(self) -> None:
        """An exported graph: find the node each probed module's call ended with; record it in a copy of the graph."""
        import copy

        graph = self.model.graph
        groups: dict[str, dict[str, list[Any]]] = {}  # module path -> {call key: [its nodes, in order]}
        for node in graph.nodes:
            if node.op != "call_function":
                continue
            for key, entry in (node.meta.get("nn_module_stack") or {}).items():
                path = entry[0] if isinstance(entry, (tuple, list)) else str(entry)
                groups.setdefault(path, {}).setdefault(key, []).append(node)
        valid = sorted(p for p in groups if p)
        first = next((n.meta["val"] for n in graph.nodes if n.op == "placeholder"
                      and isinstance(n.meta.get("val"), Tensor) and n.meta["val"].dim()), None)
        batch_sym = str(first.shape[0]) if first is not None and isinstance(first.shape[0], torch.SymInt) else None
        #: the batch size the graph was exported for when its batch dimension is static (None: dynamic)
        self._graph_static_batch = int(first.shape[0]) if first is not None and batch_sym is None else None
        chosen: dict[str, Any] = {}
        #: layer -> the dimension of its recorded value that is the batch (from the exported shapes)
        self._graph_batch_dims: dict[str, int] = {}
        for name in self.layers:
            spec = self.specs[name] = parse_layer_spec(name, groups)
            base, call = spec.module, spec.call
            if base not in groups:
                raise LayerNotFoundError(unknown_layer_message(base, valid, kind="exported graph"))
            calls = list(groups[base].values())
            if call is None and len(calls) > 1:
                raise ValueError(f"layer {name!r} ran {len(calls)} times in the exported graph (a module reused in "
                                 f"forward); name one call: '{name}#1' ... '{name}#{len(calls)}'")
            if call is not None and call > len(calls):
                raise LayerNotFoundError(f"layer {name!r}: the module {base!r} ran {len(calls)} time(s) in the "
                                         f"exported graph, so there is no call {call}")
            nodes = calls[(call or 1) - 1]
            inside = set(nodes)
            tensors = [n for n in nodes if isinstance(n.meta.get("val"), Tensor)]
            if not tensors:
                raise LayerNotFoundError(f"layer {name!r}: the exported graph holds no tensor computed by {base!r}")
            if spec.where == "input":
                chosen[name] = _graph_input(nodes, inside, name)
            else:
                leaving = [n for n in tensors if any(u not in inside for u in n.users)]
                chosen[name] = (leaving or tensors)[-1]
            shape = chosen[name].meta["val"].shape
            dims = [d for d, s in enumerate(shape) if batch_sym is not None and str(s) == batch_sym]
            self._graph_batch_dims[name] = dims[0] if len(dims) == 1 else 0
            self.calls[name] = (base, call)
        g = copy.deepcopy(graph)
        by_name = {n.name: n for n in g.nodes}
        for name, node in chosen.items():
            target = by_name[node.name]
            with g.inserting_after(target):
                g.call_function(_record_graph_value, (target, name))
        g.lint()
        # the copy shares the exported module's parameters and buffers (GraphModule copies references)
        self._graph_runner = torch.fx.GraphModule(self.model, g)
        self._base_modules = {}
        self._seq_first = {}
        self._encoders = {}

    def __repr__(self) -> str:
        return f"TorchLayerProbe(model={type(self.model).__name__}, layers={self.layers})"

    def run(self, x: Tensor | MultiInput, *, grad: bool = False) -> ProbeResult:
        """Run the model on ``x`` and return its outputs and the flattened HAPs of every probed layer.

        ``x`` is a batch tensor (``model(x)``) or a :class:`~libnet_plugin._batches.MultiInput` of several
        (``model(*tensors)`` or ``model(**tensors)``, e.g. ``input_ids`` and ``attention_mask``).

        The model runs in eval mode (dropout off, batch-norm running statistics used and left unchanged);
        the caller's train/eval mode of every submodule is restored afterwards (an exported graph runs as
        it was exported). The HAP of a layer is
        the module's output as the module returned it: when a later operation of the forward pass writes
        into that tensor in place (``ReLU(inplace=True)``, ``out += identity``), the probe notices it
        through the tensor's version counter, runs the batch again with a copy taken for that layer,
        and takes copies for it from then on (so models without in-place writes pay nothing).

        Args:
            x: a batch of inputs ``[B, ...]``; moved to the model's device, floating tensors cast to the
                model's floating dtype.
            grad: keep the autograd graph (for attacks); default runs under ``torch.no_grad()``.

        Returns:
            the :class:`ProbeResult`.

        Raises:
            ShapeMismatchError: a layer's (or the model's) output does not have the batch as its first dimension.
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
        if isinstance(x, MultiInput) and isinstance(x.parts, dict):
            check_keywords(self.runner, x.parts)
        if self.exported:
            outputs, captured = self._forward_graph(x, grad)
        elif self._dynamo_ctx is not None:
            outputs, captured = self._forward_compiled(x, grad)
        else:
            outputs, captured, overwritten = self._forward(x, grad)
            if overwritten:
                self.copied_layers.update(overwritten)
                outputs, captured, overwritten = self._forward(x, grad)
                if overwritten:  # pragma: no cover - a copy taken in the hook cannot be written by the model
                    raise RuntimeError(f"the activations of layers {overwritten} changed after they were copied")
        for name, d in self.batch_dims.items():
            act = captured[name]
            if d >= act.dim():
                raise ShapeMismatchError(f"batch_dims puts the batch of layer {name!r} at dimension {d}, but its "
                                         f"output has shape {list(act.shape)}")
            captured[name] = act.movedim(d, 0)
        n = n_rows(x)
        for name, act in captured.items():
            if act.dim() == 0 or act.shape[0] != n:
                raise ShapeMismatchError(
                    f"layer {name!r} returned an output of shape {list(act.shape)} for a batch of {n} inputs: its "
                    f"first dimension is not the batch. {_BATCH_FIX}")
        result = ProbeResult.from_activations(outputs, captured, self.device, detach=not grad)
        if result.outputs.shape[0] != n:
            raise ShapeMismatchError(f"the model returned outputs of shape {list(result.outputs.shape)} for a batch "
                                     f"of {n} inputs; expected class scores [B, C] with B = {n}")
        return result

    def _call(self, module: nn.Module, x: Tensor | MultiInput) -> Any:
        return x.call(module) if isinstance(x, MultiInput) else module(x)

    def _forward_graph(self, x: Tensor | MultiInput, grad: bool) -> tuple[Any, dict[str, Tensor]]:
        """One run of the exported graph's copy whose added nodes record every probed layer."""
        static = self._graph_static_batch
        if static is not None and n_rows(x) != static:
            raise ShapeMismatchError(
                f"the exported program was exported for batches of exactly {static} inputs (a static batch "
                f"dimension) and got {n_rows(x)}; export it with a dynamic batch: torch.export.export(model, (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)).module()")
        store: dict[str, Any] = {}
        before = getattr(_GRAPH_RECORD, "store", None)
        _GRAPH_RECORD.store = store
        try:
            with torch.set_grad_enabled(grad):
                outputs = self._call(self._graph_runner, x)
        finally:
            _GRAPH_RECORD.store = before
        captured = {}
        for name in self.layers:
            value = _first_tensor(store.get(name))
            if not isinstance(value, Tensor):
                raise LayerNotFoundError(f"layer {name!r} was not computed in this run of the exported graph")
            d = self._graph_batch_dims.get(name, 0) if name not in self.batch_dims else 0
            value = self.specs[name].apply(value if grad else value.detach())
            captured[name] = value.movedim(d, 0) if d else value
        return outputs, captured

    def _forward_compiled(self, x: Tensor | MultiInput, grad: bool) -> tuple[Any, dict[str, Tensor]]:
        """A compiled model: the probed forward (the eager module with the hooks, every HAP copied) compiled once
        per probe with the model's own ``torch.compile`` settings, so Dynamo traces the hooks into the probe's
        own graph (a graph cached by the model's plain calls, without hooks, is never used here). When it
        cannot be compiled, or a layer's hook did not run in it, the eager module runs instead, from then on."""
        if self._compiled_call is None:
            # a function of its own (a fresh code object), so Dynamo keeps this probe's graphs apart from any other
            namespace: dict[str, Any] = {}
            exec("def probed_forward(module, args, kwargs):\n    return module(*args, **kwargs)\n", namespace)
            self._compiled_call = self._dynamo_ctx(namespace["probed_forward"])
        try:
            with self._compile_lock:  # the traced hooks do not tell threads apart: one compiled probe run at a time
                outputs, captured, _ = self._forward(x, grad, compiled=self._compiled_call)
            return outputs, captured
        except Exception as exc:  # the eager module decides: its own error is raised as it is
            outputs, captured, overwritten = self._forward(x, grad)
            if overwritten:
                self.copied_layers.update(overwritten)
                outputs, captured, _ = self._forward(x, grad)
            warnings.warn(f"the probed forward of the compiled model could not be compiled ({type(exc).__name__}: "
                          f"{str(exc)[:300]}); it runs eagerly on model._orig_mod from now on (the same outputs and "
                          "HAPs, without the compiler's speed)", RuntimeWarning, stacklevel=3)
            self._dynamo_ctx = None
            return outputs, captured

    def _forward(self, x: Tensor | MultiInput, grad: bool, compiled: Any = None
                 ) -> tuple[Any, dict[str, Tensor], list[str]]:
        """One forward pass with the hooks: outputs, the HAP per layer, the layers overwritten in place.

        ``compiled``: the compiled probed forward to run the module with (every HAP is copied then).
        """
        # what to record: (module name, "output" or "input"), each call of the module in order
        by_module = {self._hooked(name) for name in self.layers}
        captured: dict[tuple[str, str], list[tuple[Tensor, int, Tensor]]] = {key: [] for key in by_module}
        copied = {self._hooked(name) for name in self.copied_layers} if compiled is None else by_module
        handles = []
        lengths: dict[int, int] = {}  # id(encoder) -> its input's length (pads NestedTensor outputs inside it)
        pads: dict[int, Tensor] = {}  # id(encoder) -> BoolTensor[B, T], True at the positions its padding mask marks

        caller = threading.get_ident()

        def make_hook(key: tuple[str, str]):
            base = key[0]
            copy = key in copied
            seq_first = self._seq_first.get(base, False) and not any(
                self.calls[name][0] == base for name in self.batch_dims)
            encoder = self._encoders.get(base)

            def input_hook(module: nn.Module, args: Any, kwargs: Any) -> None:
                inp = args if args else tuple(v for v in kwargs.values() if isinstance(v, Tensor))
                if not inp:
                    raise TypeError(f"layer '{base}:input': the module {base!r} was called without a tensor input")
                hook(module, None, inp)

            def hook(_module: nn.Module, _inp: Any, out: Any) -> None:
                # another thread's forward pass of the same model; torch.compile cannot trace get_ident
                if not torch.compiler.is_compiling() and threading.get_ident() != caller:
                    return
                packed = isinstance(out, PackedSequence) or (
                    isinstance(out, (tuple, list)) and bool(out) and isinstance(out[0], PackedSequence))
                out = _first_tensor(out)
                if not isinstance(out, Tensor):
                    raise TypeError(f"layer {base!r} returned {type(out).__name__}, expected a Tensor")
                version = out._version if compiled is None and not out.is_nested else 0
                if out.is_nested:
                    kept = _padded(out, lengths.get(id(encoder)) if encoder is not None else None)
                elif seq_first and not packed and out.dim() >= 3:  # [T, B, ...] (an unbatched [T, F] stays)
                    kept = out.transpose(0, 1)
                else:
                    kept = out
                pad = pads.get(id(encoder)) if encoder is not None else None
                if pad is not None and kept.dim() >= 3 and tuple(kept.shape[:2]) == tuple(pad.shape):
                    # zero where padded, as the encoder's fast path gives it: its slow path (under grad or
                    # torch.compile) computes values there, which would make the same input's HAPs differ
                    kept = kept.masked_fill(pad.to(kept.device).reshape(*pad.shape, *[1] * (kept.dim() - 2)), 0.0)
                kept = kept if grad else kept.detach()
                captured[key].append((kept.clone() if copy else kept, version, out))
            return input_hook if key[1] == "input" else hook

        def length_hook(encoder: nn.Module, args: Any, kwargs: Any) -> None:
            src = args[0] if args else kwargs.get("src")
            if isinstance(src, Tensor) and src.dim() >= 2:
                lengths[id(encoder)] = int(src.shape[0 if sequence_first(encoder) else 1])
            mask = kwargs.get("src_key_padding_mask", args[2] if len(args) > 2 else None)
            if isinstance(mask, Tensor) and mask.dim() == 2:
                pads[id(encoder)] = mask if mask.dtype == torch.bool else torch.isneginf(mask)

        try:
            for key in sorted(by_module):
                module = self._base_modules[key[0]]
                handles.append(module.register_forward_pre_hook(make_hook(key), with_kwargs=True) if key[1] == "input"
                               else module.register_forward_hook(make_hook(key)))
            for encoder in {id(e): e for e in self._encoders.values()}.values():
                handles.append(encoder.register_forward_pre_hook(length_hook, with_kwargs=True))
            with eval_mode(self.runner), torch.set_grad_enabled(grad):
                if compiled is not None:
                    args = () if isinstance(x, MultiInput) and isinstance(x.parts, dict) else (
                        tuple(x.parts) if isinstance(x, MultiInput) else (x,))
                    outputs = compiled(self.runner, args, dict(x.parts) if not args else {})
                else:
                    outputs = self._call(self.runner, x)
        finally:
            for h in handles:
                h.remove()
        picked: dict[str, tuple[Tensor, int, Tensor]] = {}
        for name in self.layers:
            base, call = self.calls[name]
            outs = captured[self._hooked(name)]
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
        overwritten = [name for name in self.layers if compiled is None and name not in self.copied_layers
                       and not picked[name][2].is_nested and picked[name][2]._version != picked[name][1]]
        return outputs, {name: self.specs[name].apply(picked[name][0]) for name in self.layers}, overwritten

    def _hooked(self, name: str) -> tuple[str, str]:
        """What layer ``name`` records: ``(module name, "output" or "input")``."""
        return self.calls[name][0], self.specs[name].where


def check_keywords(model: nn.Module, parts: Mapping[str, Tensor]) -> None:
    """Refuse a batch whose keys ``model.forward`` does not take by keyword (a clear message, not torch's).

    Example:
        >>> from torch import nn
        >>> check_keywords(nn.Linear(2, 2), {"input": torch.zeros(1, 2), "mask": torch.ones(1, 2)})
        Traceback (most recent call last):
        ...
        TypeError: the batch's tensors ['input', 'mask'] are passed to Linear.forward by keyword, but it takes no ['mask']; ...
    """
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - a forward without a signature: let the call decide
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    named = {k for k, p in params.items() if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                         inspect.Parameter.KEYWORD_ONLY)}
    unknown = [k for k in parts if k not in named]
    if unknown:
        raise TypeError(
            f"the batch's tensors {list(parts)} are passed to {type(model).__name__}.forward by keyword, but it "
            f"takes no {unknown}; its arguments are {list(params)}. Name the dict's keys after forward's arguments "
            "(labels as 'label'/'labels'/'y'), or pass the inputs alone: a tensor, (x, y), or ((x1, x2), y)")
