"""The ONNX Runtime layer probe: one session run returns the model's output and every probed tensor."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import helper
from torch import Tensor

from libnet_plugin import MultiInput
from libnet_plugin.errors import ShapeMismatchError
from libnet_plugin.probe import LayerSpec, ProbeResult, check_batch_dims, check_inputs_finite

from .errors import InputTypeError, OnnxModelError
from .graph import LayerInfo, OnnxGraph, TensorSpec, is_inference_session
from .providers import ProviderSpec, default_providers, resolve_providers

__all__ = ["OnnxModel", "OnnxLayerProbe"]

#: dict keys that the core reads as the one input tensor of a batch (a dict holding one of them is cut to it)
_ONE_TENSOR_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
#: SessionOptions settings carried over from a caller's InferenceSession to the probing session.
_COPIED_SESSION_OPTIONS = ("graph_optimization_level", "intra_op_num_threads", "inter_op_num_threads",
                           "execution_mode", "enable_cpu_mem_arena", "enable_mem_pattern", "log_severity_level",
                           "use_deterministic_compute")


def _copy_session_options(src: ort.SessionOptions) -> ort.SessionOptions:
    """A fresh SessionOptions with the threading / optimisation settings of ``src`` (not its file paths)."""
    dst = ort.SessionOptions()
    for attr in _COPIED_SESSION_OPTIONS:
        try:
            setattr(dst, attr, getattr(src, attr))
        except (AttributeError, TypeError):
            pass
    return dst


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    """The numpy dtype of a torch dtype, ``None`` where numpy has none (bfloat16)."""
    try:
        return torch.empty(0, dtype=dtype).numpy().dtype
    except (TypeError, RuntimeError):
        return None


class OnnxModel:
    """An ONNX classifier together with the onnxruntime settings to run it with.

    ``LibraryNetwork`` accepts a path, ``onnx.ModelProto`` or ``onnxruntime.InferenceSession`` directly; wrap
    it in ``OnnxModel`` to choose execution providers, session options or the output to read. The model
    is read and checked when the object is made; the caller's file, ModelProto and session are never
    modified (probing runs a separate session on a copy of the graph).

    Args:
        model: a path to an ``.onnx`` file, an ``onnx.ModelProto``, serialized ``bytes``, or an
            ``onnxruntime.InferenceSession`` (its model, providers and threading settings are reused).
        providers: execution providers, in order of preference: short names (``"cpu"``, ``"cuda"``,
            ``"tensorrt"``), full names, or ``(name, options)`` pairs. Default: the session's providers for
            an ``InferenceSession``; otherwise CUDA then CPU when the library network's device is
            ``cuda``, else CPU.
        session_options: ``onnxruntime.SessionOptions`` for the probing session.
        output: name of the tensor holding the class scores ``[B, C]``: a graph output or any probe-able
            tensor (default: the first graph output that is a floating tensor of rank 2 or more, so a
            classifier whose first output is its int64 labels is read by its probabilities; a clear
            error when there is none, e.g. a ZipMap).
        fallback: drop providers that are not available with a ``RuntimeWarning`` naming them (default);
            if False, raise :class:`~libnet_onnx.errors.ExecutionProviderError` instead.

    Attributes:
        graph: the :class:`~libnet_onnx.graph.OnnxGraph` (types inferred, layer names indexed).
        input: the :class:`~libnet_onnx.graph.TensorSpec` of the graph input.
        output: the name of the output read as the model's answer.

    Example:
        >>> import torch
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
        >>> proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
        >>> model = OnnxModel(proto, providers=["cpu"])
        >>> model(torch.tensor([[-1.0, 2.0]]))
        tensor([[0., 2.]])
    """

    def __init__(self, model: Any, *, providers: Sequence[ProviderSpec] | ProviderSpec | None = None,
                 session_options: ort.SessionOptions | None = None, output: str | None = None,
                 fallback: bool = True):
        if isinstance(model, OnnxModel):
            raise TypeError("model is already an OnnxModel; pass its source to make one with other settings")
        self.graph = OnnxGraph(model)
        self.source = self.graph.source
        #: True when the caller named the output (it is then not replaced by a saved choice at load)
        self.output_given = output is not None
        #: why no output could be chosen (raised when the model is first run; a saved choice may come first)
        self.no_output: str | None = None
        if output is None:
            try:
                output = self._class_scores_output()
            except OnnxModelError as exc:
                self.no_output = str(exc)
        elif output not in self.graph.outputs and not self.graph.is_probeable(output):
            raise ValueError(f"output {output!r} is neither an output of {self.source} (its outputs are "
                             f"{self.graph.outputs}) nor one of its probe-able tensors")
        self.output: str | None = output
        if providers is None and is_inference_session(model):
            provider_options = model.get_provider_options()
            providers = [(name, dict(provider_options.get(name, {}))) for name in model.get_providers()]
        if session_options is None and is_inference_session(model):
            session_options = _copy_session_options(model.get_session_options())
        self.providers = providers
        self.session_options = session_options
        self.fallback = bool(fallback)
        self._plain_probe: OnnxLayerProbe | None = None

    def with_output(self, output: str) -> OnnxModel:
        """A copy of this model (same graph, providers and options) reading its class scores from ``output``.

        Args:
            output: a graph output or a probe-able tensor name.

        Returns:
            the new :class:`OnnxModel`.
        """
        if output not in self.graph.outputs and not self.graph.is_probeable(output):
            raise ValueError(f"output {output!r} is neither an output of {self.source} nor one of its probe-able tensors")
        other = copy.copy(self)
        other.output, other.output_given, other.no_output, other._plain_probe = output, True, None, None
        return other

    def _class_scores_output(self) -> str:
        """The first graph output that is a floating tensor of rank 2 or more (class scores ``[B, C]``).

        A classifier exported by skl2onnx, for example, has ``label`` (int64 ``[B]``) first and then
        ``probabilities``; with a ZipMap its scores are a sequence of maps, which no tensor can hold.
        """
        reasons = []
        for vi in self.graph.model.graph.output:
            name = vi.name
            if not vi.type.HasField("tensor_type"):
                kind = vi.type.WhichOneof("value")
                reasons.append(f"{name!r} is a {kind} (" + ("a ZipMap: one dict per input" if kind == "sequence_type"
                                                            else "not a tensor") + ")")
                continue
            spec = self.graph.spec(name)
            if spec is None or spec.elem_type not in (1, 10, 11, 16) or (spec.shape is not None and len(spec.shape) < 2):
                reasons.append(spec.describe() if spec is not None else f"{name!r} of unknown type")
                continue
            return name
        raise OnnxModelError(
            f"none of the outputs of {self.source} holds class scores as a floating tensor [B, C]: "
            f"{'; '.join(reasons)}. Pass output= naming the [B, C] tensor (any probe-able tensor, e.g. the "
            f"probabilities before a ZipMap; see `libnet layers`), or export without the ZipMap: zipmap=False "
            "(skl2onnx: to_onnx(model, X, options={'zipmap': False}))")

    def __repr__(self) -> str:
        return (f"OnnxModel({self.source}, input={self.input.describe()}, output={self.output!r}, "
                f"providers={self.providers!r})")

    @property
    def input(self) -> TensorSpec:
        """The graph's (first) input.

        Returns:
            its :class:`~libnet_onnx.graph.TensorSpec`.
        """
        return self.graph.input

    def layers(self, kind: str = "all") -> list[LayerInfo]:
        """The probe-able names of this model (see :func:`libnet_onnx.list_layers`).

        Args:
            kind: ``"module"``, ``"tensor"`` or ``"all"``.

        Returns:
            a :class:`~libnet_onnx.graph.LayerInfo` per layer.
        """
        return self.graph.layers(kind)  # type: ignore[arg-type]

    def session(self, extra_outputs: Sequence[str] = (), device: Any = None) -> ort.InferenceSession:
        """A new ``InferenceSession`` on a copy of the graph whose outputs also include ``extra_outputs``.

        Args:
            extra_outputs: tensor names to make readable (typed from shape inference).
            device: the torch device of the library network; picks the default providers (see class doc).

        Returns:
            the ``onnxruntime.InferenceSession``.
        """
        proto = onnx.ModelProto()
        proto.CopyFrom(self.graph.model)
        present = {o.name for o in proto.graph.output}
        for t in extra_outputs:
            if t not in present:
                proto.graph.output.append(self.graph.value_info(t))
                present.add(t)
        requested = self.providers if self.providers is not None else default_providers(device)
        names, options = resolve_providers(requested, fallback=self.fallback)
        try:
            return ort.InferenceSession(proto.SerializeToString(), sess_options=self.session_options,
                                        providers=names, provider_options=options)
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise OnnxModelError(f"onnxruntime could not load {self.source}: {exc}") from exc

    def probe(self, layers: Sequence[str] | str, device: Any = None) -> OnnxLayerProbe:
        """A probe of some layers of this model.

        Args:
            layers: module or tensor names.
            device: where the probe returns its tensors (default: CPU).

        Returns:
            an :class:`OnnxLayerProbe`.
        """
        return OnnxLayerProbe(self, layers, device=device)

    def __call__(self, x: Tensor | MultiInput) -> Tensor:
        """The model's output for a batch (one session run; on CPU).

        Args:
            x: the batch.

        Returns:
            ``Tensor[B, C]``.
        """
        if self._plain_probe is None:
            self._plain_probe = OnnxLayerProbe(self, [])
        return self._plain_probe.run(x).outputs


class OnnxLayerProbe:
    """Probe intermediate tensors of an ONNX classifier with onnxruntime.

    The chosen tensors are added to a copy of the graph's outputs (typed by shape inference) and one
    session returns the model's output and every probed tensor in one run per batch. HAPs are the
    probed tensors flattened per input, as float32 on ``device``. The caller's model and session are not
    touched.

    Layer names are PyTorch module names recorded by the exporter (``"conv1"``, ``"layer2.3"``; the
    module's forward output) or ONNX tensor names; a name that is both is read as the module. Layer specs
    on a module name work as in the torch probe: ``"fc1:input"`` (what the module receives),
    ``"conv1:relu"`` (its output with the activation applied after reading it), ``"conv1:output"``; see
    :meth:`~libnet_onnx.graph.OnnxGraph.layer_spec`. See :func:`libnet_onnx.list_layers`.

    One row per input: a tensor whose batch is not its first dimension (a sequence-first module's ``[T, B, ...]``:
    ``nn.LSTM``, ``nn.TransformerEncoderLayer`` with ``batch_first=False``) has that dimension moved first. Where
    the batch is comes from the caller (:meth:`set_batch_dims`), else from a network fitted with the torch probe
    (its saved dimensions, see :meth:`restore`), else from the graph's shapes (the graph input's symbolic batch
    dimension found at exactly one other axis of the tensor); otherwise the first dimension is the batch.

    A graph exported with a fixed batch size ``N`` is run in chunks of ``N`` (the last chunk padded),
    with a one-time warning; export with a dynamic batch dimension (:func:`libnet_onnx.export_onnx`) to
    run a whole batch in one call.

    Args:
        model: an :class:`OnnxModel`, or anything it accepts (path, ``ModelProto``, bytes, ``InferenceSession``).
        layers: names to probe, in order; kept as given (``probe.layers``), so saved library networks map
            by name.
        device: where the returned tensors live (default CPU). With ``cuda`` and no explicit providers,
            the CUDA execution provider is tried first.
        providers, session_options, output, fallback: as in :class:`OnnxModel`, when ``model`` is not one.
        batch_dims: ``{layer: dim}``, see :meth:`set_batch_dims`.

    Raises:
        LayerNotFoundError: a name is neither a module scope nor a probe-able tensor (close matches listed).
        OnnxModelError, ExecutionProviderError: see :class:`OnnxModel`.

    Example:
        >>> import torch
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
        >>> nodes = [helper.make_node("Relu", ["x"], ["h"], name="/act/Relu"),
        ...          helper.make_node("Neg", ["h"], ["y"], name="/head/Neg")]
        >>> proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
        >>> res = OnnxLayerProbe(proto, ["act"]).run(torch.tensor([[-1.0, 2.0]]))
        >>> res.haps["act"], res.outputs
        (tensor([[0., 2.]]), tensor([[-0., -2.]]))
    """

    def __init__(self, model: Any, layers: Sequence[str] | str, device: Any = None, *,
                 providers: Sequence[ProviderSpec] | ProviderSpec | None = None,
                 session_options: ort.SessionOptions | None = None, output: str | None = None,
                 fallback: bool = True, batch_dims: Mapping[str, int] | None = None):
        if isinstance(model, OnnxModel):
            if providers is not None or session_options is not None or output is not None or not fallback:
                raise TypeError("model is an OnnxModel: set providers, session_options, output and fallback on it")
        else:
            model = OnnxModel(model, providers=providers, session_options=session_options, output=output,
                              fallback=fallback)
        if isinstance(layers, str):
            layers = [layers]
        self.model = model
        self.layers = list(layers)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        graph = model.graph
        #: layer -> its parsed spec (``"fc1:input"``, ``"conv1:relu"``); ``None`` for a module or tensor name
        self.specs: dict[str, LayerSpec | None] = {name: graph.layer_spec(name) for name in self.layers}
        self.tensors: dict[str, str] = {name: graph.resolve(name) for name in self.layers}
        for name in self.layers:
            spec = self.specs[name]
            caveat = graph.module_caveat(name if spec is None else spec.module) if (
                spec is None or spec.where == "output") else None
            if caveat:
                warnings.warn(caveat, RuntimeWarning, stacklevel=2)
        self.session: ort.InferenceSession | None = None
        self.providers: list[str] | None = None
        if model.output is not None:
            self._open_session()
        self._np_dtypes = {spec.name: np.dtype(helper.tensor_dtype_to_np_dtype(spec.elem_type)) for spec in graph.inputs}
        first = graph.input.shape[0] if graph.input.shape else None
        self.fixed_batch: int | None = first if isinstance(first, int) and first > 0 else None
        self._warned_fixed_batch = False
        self._checked_copies = len(self.layers) < 2
        #: ``{layer: dim}`` holding the batch, named by the caller (:meth:`set_batch_dims`)
        self.batch_dims: dict[str, int] = {}
        #: ``{layer: dim}`` holding the batch as the probe of the network's fit read it (:meth:`restore`)
        self.saved_batch_dims: dict[str, int] = {}
        #: ``{layer: dim}`` holding the batch by the graph's shapes (the input's batch symbol at one other axis)
        self.graph_batch_dims: dict[str, int] = {}
        #: layers whose tensor has the graph input's batch symbol at its first dimension only, by the graph's shapes
        self._batch_first_in_graph: set[str] = set()
        self._read_graph_batch_dims()
        self._warned_ambiguous = False
        self.set_batch_dims(batch_dims)

    def _read_graph_batch_dims(self) -> None:
        """The layers whose tensor holds the graph input's symbolic batch dimension (``"batch"``) at exactly one
        axis: not the first (a sequence-first ``[T, batch, F]``) in ``graph_batch_dims``, else in
        ``_batch_first_in_graph``, by the inferred shapes."""
        graph = self.model.graph
        first = graph.input.shape[0] if graph.input.shape else None
        if not isinstance(first, str):
            return
        for name, tensor in self.tensors.items():
            spec = graph.spec(tensor)
            at = [i for i, d in enumerate(spec.shape or ()) if d == first] if spec is not None else []
            if at == [0]:
                self._batch_first_in_graph.add(name)
            elif len(at) == 1:
                self.graph_batch_dims[name] = at[0]

    def _warn_ambiguous(self, acts: Mapping[str, np.ndarray], b: int) -> None:
        """Warn once when nothing tells where a layer's batch is and its tensor is ``[b, b, ...]``: batch-first
        and sequence-first ``[T, B, ...]`` with ``T == B`` look the same; it is read batch-first."""
        told = {*self.batch_dims, *self.saved_batch_dims, *self.graph_batch_dims, *self._batch_first_in_graph}
        unsure = [name for name, a in acts.items() if name not in told and a.ndim >= 3 and a.shape[0] == a.shape[1] == b]
        if unsure:
            self._warned_ambiguous = True
            warnings.warn(f"layers {unsure} of {self.model.source} have tensors [{b}, {b}, ...] for a batch of {b} "
                          "inputs and the graph's shapes do not tell which dimension holds the batch; they are read "
                          "batch-first. If a layer is sequence-first ([T, B, ...]), name it: "
                          "LibraryNetwork(..., batch_dims={layer: 1}) ({layer: 0} silences this)", RuntimeWarning,
                          stacklevel=3)

    def set_batch_dims(self, batch_dims: Mapping[str, int] | None) -> None:
        """Name the dimension of a layer's tensor that holds the batch, ``{layer: dim}`` (as the torch probe's
        :meth:`~libnet_plugin.probe.TorchLayerProbe.set_batch_dims`); that dimension is moved first. It
        overrides the dimensions saved with a network and those read from the graph's shapes.

        Args:
            batch_dims: ``{layer: dim}`` (``None``: none).

        Raises:
            ValueError: a layer that is not probed, or a dimension that is not an int >= 0.
        """
        self.batch_dims = check_batch_dims(batch_dims, self.layers)
        self._set_tensor_dims()

    def layer_batch_dims(self) -> dict[str, int]:
        """The dimension of each layer's tensor that this probe reads as the batch.

        Returns:
            ``{layer: dim}`` for every probed layer: the caller's, else the saved, else the graph's, else ``0``.
        """
        return {name: self.batch_dims.get(name, self.saved_batch_dims.get(name, self.graph_batch_dims.get(name, 0)))
                for name in self.layers}

    def _set_tensor_dims(self) -> None:
        """Per probed tensor: (its batch dimension, whether it was named by the caller, the layer naming it)."""
        dims: dict[str, tuple[int, bool, str]] = {}
        for name, d in self.layer_batch_dims().items():
            tensor, entry = self.tensors[name], (d, name in self.batch_dims, name)
            if tensor in dims and dims[tensor][0] != d:
                raise ValueError(f"layers {dims[tensor][2]!r} and {name!r} read the same tensor {tensor!r} of "
                                 f"{self.model.source} with the batch at dimensions {dims[tensor][0]} and {d}")
            dims.setdefault(tensor, entry)
        self._tensor_dims = {t: e for t, e in dims.items() if e[0] != 0}

    def _batch_first(self, tensor: str, arr: np.ndarray) -> np.ndarray:
        """``arr`` (the value of ``tensor``) with its batch dimension moved first."""
        entry = self._tensor_dims.get(tensor)
        if entry is None or tensor == self.model.output:
            return arr
        d, named, layer = entry
        if d >= arr.ndim:
            if named:
                raise ShapeMismatchError(f"batch_dims puts the batch of layer {layer!r} at dimension {d}, but its "
                                         f"tensor {tensor!r} has shape {list(arr.shape)}")
            return arr
        if not named and arr.ndim < 3:  # as the torch probe: only a [T, B, ...] of 3 or more dimensions is transposed
            return arr
        return np.ascontiguousarray(np.moveaxis(arr, d, 0))

    def _open_session(self) -> None:
        model = self.model
        if model.output is None:
            raise OnnxModelError(model.no_output or f"no output of {model.source} holds the class scores")
        fed = {spec.name for spec in model.graph.inputs}  # a module's input can be a graph input: read from the feed
        self._fetch = [model.output] + list(dict.fromkeys(t for t in self.tensors.values()
                                                          if t != model.output and t not in fed))
        self._fetch_index = {t: i for i, t in enumerate(self._fetch)}
        self.session = model.session(self._fetch, device=self.device)
        self.providers = self.session.get_providers()

    def config(self) -> dict[str, Any]:
        """What a saved library network keeps of this probe.

        Returns:
            ``{"output": the tensor read as the class scores, "batch_dims": {layer: dim}}``.
        """
        return {"output": self.model.output, "batch_dims": self.layer_batch_dims()}

    def restore(self, config: Mapping[str, Any]) -> None:
        """Read the class scores from the saved ``output`` again (a network saved with ``output=`` loaded from a path).

        A network fitted with the torch probe saved where each layer's batch was (``"batch_dims"``: ``1`` for
        a sequence-first module); those dimensions are read here (the caller's :meth:`set_batch_dims` still
        wins). A file without them reads the batch as before (the graph's shapes, else the first dimension).

        Args:
            config: what :meth:`config` returned.

        Raises:
            ValueError: the model was given with another explicit ``output=`` than the saved one, or the saved
                batch dimensions are malformed.
        """
        saved_dims = config.get("batch_dims")
        if saved_dims is not None:
            try:  # the probed layers' dimensions, checked as the caller's are
                self.saved_batch_dims = check_batch_dims(
                    {str(k): d for k, d in dict(saved_dims).items() if str(k) in self.layers}, self.layers)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"the saved batch_dims should map layers to dimension indices, got {saved_dims!r}"
                                 ) from exc
            self._set_tensor_dims()
        saved = config.get("output")
        if saved is None or (saved == self.model.output and self.session is not None):
            return
        if self.model.output_given:
            raise ValueError(f"the network was saved reading its class scores from {saved!r}, but the model was given "
                             f"with output={self.model.output!r}")
        self.model = self.model.with_output(saved)
        self._open_session()

    def __repr__(self) -> str:
        return f"OnnxLayerProbe({self.model.source}, layers={self.layers}, providers={self.providers})"

    # ------------------------------------------------------------------ input
    def _array(self, spec: Any, x: Tensor) -> np.ndarray:
        expected = self._np_dtypes[spec.name]
        if _numpy_dtype(x.dtype) != expected:
            raise InputTypeError(f"the input batch has dtype {x.dtype}; the ONNX graph expects input {spec.describe()}")
        if spec.shape is not None:
            bad_rank = x.dim() != len(spec.shape)
            bad_dims = not bad_rank and any(isinstance(d, int) and d > 0 and i > 0 and x.shape[i] != d
                                            for i, d in enumerate(spec.shape))
            if bad_rank or bad_dims:
                raise ShapeMismatchError(f"the input batch has shape {list(x.shape)}; the ONNX graph expects input "
                                         f"{spec.describe()}")
        return x.detach().cpu().contiguous().numpy()

    def _feed(self, x: Tensor | MultiInput) -> dict[str, np.ndarray]:
        """The session's feed: one array per graph input, from a Tensor (one input) or a MultiInput (by name or order)."""
        specs = self.model.graph.inputs
        names = [spec.name for spec in specs]
        if isinstance(x, Tensor):
            if len(specs) != 1:
                cut = [n for n in names if n in _ONE_TENSOR_KEYS]
                note = (f" A dict batch with the key {cut[0]!r} is read as that one tensor (its other keys are not "
                        f"passed), so feed this graph a tuple batch in the order {names}, e.g. "
                        f"(({', '.join(names)}), y)"
                        if cut else "")
                raise InputTypeError(f"{self.model.source} has {len(specs)} graph inputs {names} but the batch gave one "
                                     "tensor; pass a dict of tensors keyed by the input names, or a tuple in that "
                                     f"order.{note}")
            return {specs[0].name: self._array(specs[0], x)}
        if isinstance(x.parts, dict):
            missing, extra = [n for n in names if n not in x.parts], [k for k in x.parts if k not in names]
            if missing or extra:
                raise InputTypeError(f"the batch gives the inputs {sorted(x.parts)}; {self.model.source} takes "
                                     f"{names} (missing {missing}, not in the graph {extra})")
            return {spec.name: self._array(spec, x.parts[spec.name]) for spec in specs}
        if len(x.parts) != len(specs):
            raise InputTypeError(f"the batch holds {len(x.parts)} inputs; {self.model.source} takes {len(specs)}: {names}")
        return {spec.name: self._array(spec, t) for spec, t in zip(specs, x.parts)}

    def _warn_copies(self, acts: Mapping[str, Tensor]) -> None:
        """Warn once when probed layers carry the same values (skl2onnx's ``probability_tensor`` and the
        normalised ``probabilities``): the consistency between them is 1 whatever the input."""
        flat = {name: a.reshape(a.shape[0], -1).double() for name, a in acts.items()}
        names = list(flat)
        same = [(a, c) for i, a in enumerate(names) for c in names[i + 1:]
                if flat[a].shape == flat[c].shape and torch.allclose(flat[a], flat[c], rtol=1e-5, atol=1e-7)]
        if not same:
            return
        pairs = ", ".join(f"{a!r} = {c!r}" for a, c in same)
        whole = len(same) == len(names) * (len(names) - 1) // 2
        warnings.warn(f"probed layers of {self.model.source} carry the same values on the first batch ({pairs}, tensors "
                      f"{sorted({self.tensors[n] for pair in same for n in pair})}): their class evidence is the same, "
                      "so the consistency between them (CPL) is 1 for every input"
                      + (" and CPL-based detection is vacuous" if whole else "")
                      + "; probe layers that compute different things (see `libnet layers`)",
                      RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ run
    def _session_run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The fetched tensors for ``feed``, each with its batch dimension first (:meth:`_batch_first`)."""
        if self.session is None:
            self._open_session()  # raises the reason no output holds the class scores
        assert self.session is not None
        return [self._batch_first(t, r) for t, r in zip(self._fetch, self.session.run(self._fetch, feed))]

    def _run_fixed_batch(self, feed: dict[str, np.ndarray], n_fixed: int) -> list[np.ndarray]:
        b = next(iter(feed.values())).shape[0]
        if not self._warned_fixed_batch:
            warnings.warn(f"the ONNX graph {self.model.source} has a fixed batch size of {n_fixed}; running {b} inputs in "
                          f"{math.ceil(b / n_fixed)} session calls. Export with a dynamic batch dimension "
                          "(libnet_onnx.export_onnx) to run a whole batch in one call", RuntimeWarning, stacklevel=3)
            self._warned_fixed_batch = True
        parts: list[list[np.ndarray]] = []
        for start in range(0, b, n_fixed):
            chunk = {k: a[start:start + n_fixed] for k, a in feed.items()}
            n = min(n_fixed, b - start)
            if n < n_fixed:
                chunk = {k: np.concatenate([a, np.repeat(a[-1:], n_fixed - n, axis=0)]) for k, a in chunk.items()}
            results = self._session_run(chunk)
            for t, r in zip(self._fetch, results):
                self._check_batch(t, r, n_fixed)
            parts.append([r[:n] for r in results])
        return [np.concatenate([p[i] for p in parts]) for i in range(len(self._fetch))]

    def _check_batch(self, tensor: str, arr: np.ndarray, b: int) -> None:
        if arr.ndim == 0 or arr.shape[0] != b:
            layers = [l for l, t in self.tensors.items() if t == tensor] or ["the model output"]
            raise ShapeMismatchError(
                f"tensor {tensor!r} ({', '.join(map(repr, layers))}) of {self.model.source} has shape {list(arr.shape)} "
                f"for a batch of {b} inputs; its first dimension must be the batch to give one HAP per input (for a "
                "sequence-first [T, B, ...] tensor, name the dimension holding the batch: "
                "LibraryNetwork(..., batch_dims={layer: dim}))")

    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """Run the model once on the batch ``x``; return its outputs and the flattened HAPs of every layer.

        Args:
            x: a batch ``[B, ...]`` matching the graph input's dtype and non-batch dimensions; for a graph
                with several inputs (``input_ids`` and ``attention_mask``), a
                :class:`~libnet_plugin.MultiInput` of them by name (from a dict batch) or in the
                graph's order (from a tuple).

        Returns:
            :class:`~libnet_plugin.probe.ProbeResult` with ``outputs`` ``[B, C]`` and ``haps``
            ``{layer: float32 Tensor[B, D]}``, on the probe's device, in layer order.

        Raises:
            TypeError: ``x`` is not a Tensor. InputTypeError: its dtype is not the graph input's.
            ShapeMismatchError: its shape does not fit the graph input (the message gives the expected
                input), or a probed tensor has no batch dimension.
            NonFiniteError: the input, or a probed layer, holds NaN or infinity.
        """
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        check_inputs_finite(x)
        feed = self._feed(x)
        b = len(x) if isinstance(x, MultiInput) else int(x.shape[0])
        if self.fixed_batch is not None and b != self.fixed_batch:
            results = self._run_fixed_batch(feed, self.fixed_batch)
        else:
            results = self._session_run(feed)  # opens the session first, or raises why it cannot
        outputs = results[0]
        self._check_batch(self.model.output, outputs, b)
        acts: dict[str, Tensor] = {}
        raw: dict[str, np.ndarray] = {}
        for name in self.layers:
            tensor, spec = self.tensors[name], self.specs[name]
            arr_l = (self._batch_first(tensor, feed[tensor].copy()) if tensor not in self._fetch_index
                     else results[self._fetch_index[tensor]])
            self._check_batch(tensor, arr_l, b)
            raw[name] = arr_l
            acts[name] = torch.from_numpy(arr_l) if spec is None else spec.apply(torch.from_numpy(arr_l))
        if not self._warned_ambiguous and b >= 2:
            self._warn_ambiguous(raw, b)
        if not self._checked_copies and b >= 2:
            self._checked_copies = True
            self._warn_copies(acts)
        return ProbeResult.from_activations(torch.from_numpy(outputs), acts, self.device,
                                            output_name=self.model.output)
