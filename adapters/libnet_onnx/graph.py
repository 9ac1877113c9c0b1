"""Reading an ONNX classifier: loading and checking, shape inference, the tensors that can be probed, and
the PyTorch module names the exporters record.

Two kinds of layer names resolve to an ONNX tensor:

* an **ONNX tensor name** (the output of any node that is floating point and depends on the graph input),
  for example ``/conv1/Conv_output_0`` (legacy exporter) or ``conv2d`` (dynamo exporter);
* a **PyTorch module name** such as ``conv1`` or ``layer2.3``, read from the exporter's records: the
  dynamo exporter stores each node's module scope in the node metadata key
  ``pkg.torch.onnx.name_scopes``; the legacy exporter encodes it in the node name
  (``/layer2/layer2.3/conv1/Conv``). A module's tensor is its forward output: the tensor produced inside
  the module's scope and used outside it (by a node of another scope, or as a graph output), i.e. the
  output of the last node of the scope. A module called twice in ``forward`` is recorded as one scope by
  the dynamo exporter (naming it is then an error that lists both tensors) and as ``act`` and ``act_1``
  by the legacy exporter (the first and the second call).
* a **layer spec** on a module name, as in the torch probe (:func:`libnet_plugin.probe.parse_layer_spec`):
  ``"fc1:output"`` is ``"fc1"``; ``"fc1:input"`` is the tensor the module's scope reads from outside it
  (its input as the graph computed it: after functional activations, pooling, flattening); ``"conv1:relu"``
  is the module's output, the activation being applied by the probe after reading it. ``"name#K"`` (one
  call of a module) is not read here: name that call's ONNX tensor. A name that is a module or tensor of
  the graph is always taken as such, so tensor names holding ``':'`` keep working.

Caveat: exporter optimisations change which tensors exist. The dynamo exporter's optimiser (and the
legacy exporter's constant folding) fuse a BatchNorm into the preceding convolution, so the convolution's
own output no longer exists, and ``Relu(Relu(x))`` becomes one node. Export with
:func:`libnet_onnx.export_onnx` (``optimize=False``, the default) to keep every module output;
onnxruntime still optimises the graph when it loads it. Where a graph shows signs of such fusion, the
adapter warns (a module output may differ) or says so in the error (a module is missing).
"""

from __future__ import annotations

import ast
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, shape_inference

from libnet_plugin.errors import LayerNotFoundError
from libnet_plugin.probe import LayerSpec, parse_layer_spec, unknown_layer_message

from .errors import OnnxModelError

__all__ = ["OnnxGraph", "LayerInfo", "TensorSpec", "load_model", "list_layers", "NAME_SCOPES_KEY",
           "legacy_chain"]

#: Node metadata key in which the dynamo exporter records the module scope of each node.
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"
#: Older / alternative record of the same scope: ``": Net/layer1: Sequential/layer1.0: Block/add: aten.add"``.
NAMESPACE_KEY = "namespace"
#: Set by the onnxscript optimiser on nodes it rewrote (e.g. ``"FuseBatchNormIntoConv"``).
REWRITE_RULE_KEY = "pkg.onnxscript.rewriter.rule_name"

#: Optimiser rules whose fused node absorbs only nodes *after* it (its inputs are untouched), so they do
#: not change the tensor a preceding module outputs.
_DOWNSTREAM_FUSIONS = frozenset({"FuseBatchNormIntoConv", "FuseBatchNormIntoConvTranspose", "FuseBatchNormIntoGemm"})
_FLOAT_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16})
_MAX_PROTO_BYTES = 2**31 - 1

#: what to do about a graph that ends in a ZipMap (skl2onnx's default export of a classifier)
ZIPMAP_HINT = (". The graph ends in a ZipMap (one dict of class probabilities per input), and the ZipMap's "
               "inputs may be untyped: export without it, zipmap=False (skl2onnx: to_onnx(model, X, "
               "options={'zipmap': False})), or probe tensors before it (see `libnet layers`)")

Dim = int | str | None
LayerKind = Literal["module", "tensor", "input"]


def dtype_name(elem_type: int) -> str:
    """The numpy-style name of an ONNX element type (``1`` -> ``"float32"``)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return TensorProto.DataType.Name(elem_type).lower()


def format_shape(shape: tuple[Dim, ...] | None) -> str:
    """``("batch", 1, 28, 28)`` -> ``"[batch, 1, 28, 28]"``; unknown dimensions show as ``?``."""
    if shape is None:
        return "[?]"
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorSpec:
    """Type and shape of a graph tensor as recorded in (or inferred for) the graph.

    Attributes:
        name: the ONNX tensor name.
        elem_type: the ONNX element type (``onnx.TensorProto.FLOAT`` ...).
        shape: one entry per dimension: an int, a symbolic name (``"batch"``), or ``None`` if unknown;
            ``None`` for the whole shape when even the rank is unknown.

    Example:
        >>> from onnx import TensorProto
        >>> spec = TensorSpec("input", TensorProto.FLOAT, ("batch", 1, 28, 28))
        >>> spec.dtype, spec.describe()
        ('float32', "'input' of type float32 and shape [batch, 1, 28, 28]")
    """

    name: str
    elem_type: int
    shape: tuple[Dim, ...] | None

    @property
    def dtype(self) -> str:
        """The numpy-style dtype name.

        Returns:
            e.g. ``"float32"``.
        """
        return dtype_name(self.elem_type)

    def describe(self) -> str:
        """The tensor in words, for messages.

        Returns:
            e.g. ``'input' of type float32 and shape [batch, 1, 28, 28]``.
        """
        return f"{self.name!r} of type {self.dtype} and shape {format_shape(self.shape)}"


@dataclass(frozen=True)
class LayerInfo:
    """One probe-able layer of an ONNX model, as listed by :func:`list_layers`.

    Attributes:
        name: the name to pass in ``layers=[...]``.
        kind: ``"module"`` (a PyTorch module name from the exporter's records), ``"tensor"``, or ``"input"``
            (a ``"MODULE:input"`` layer spec: the tensor the module receives).
        tensor: the ONNX tensor the name resolves to.
        op_type: the operator producing that tensor (``"Conv"``, ``"Relu"``...; ``"(graph input)"`` for one).
        dtype: numpy-style element type of the tensor.
        shape: its shape (ints, symbolic names such as ``"batch"``, ``None`` for unknown dimensions).

    Example:
        >>> info = LayerInfo("conv1", "module", "/conv1/Conv_output_0", "Conv", "float32", ("batch", 6, 24, 24))
        >>> info.size
        3456
    """

    name: str
    kind: LayerKind
    tensor: str
    op_type: str
    dtype: str
    shape: tuple[Dim, ...] | None

    @property
    def size(self) -> int | None:
        """The length of the flattened HAP.

        Returns:
            the product of the non-batch dimensions, ``None`` if not all are known.
        """
        if self.shape is None or not all(isinstance(d, int) for d in self.shape[1:]):
            return None
        return int(np.prod(self.shape[1:], dtype=np.int64))


# ---------------------------------------------------------------------------------------------- loading
def _session_type() -> type | None:
    ort = sys.modules.get("onnxruntime")
    return getattr(ort, "InferenceSession", None) if ort is not None else None


def is_inference_session(obj: Any) -> bool:
    """True for an ``onnxruntime.InferenceSession`` (without importing onnxruntime)."""
    cls = _session_type()
    return cls is not None and isinstance(obj, cls)


def describe_source(source: Any) -> str:
    """A short human name for where a model came from (for messages)."""
    if isinstance(source, (str, os.PathLike)):
        return repr(os.fspath(source))
    if is_inference_session(source):
        path = getattr(source, "_model_path", None)
        return f"InferenceSession({path!r})" if path else "InferenceSession(<bytes>)"
    if isinstance(source, onnx.ModelProto):
        return f"ModelProto(graph={source.graph.name!r})"
    return type(source).__name__


def _parse_file(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise FileNotFoundError(f"ONNX model file not found: {os.fspath(path)!r}")
    if path.is_dir():
        raise OnnxModelError(f"{os.fspath(path)!r} is a directory, expected an ONNX model file")
    try:
        return onnx.load(os.fspath(path))
    except Exception as exc:  # DecodeError, missing external data, ...
        raise OnnxModelError(f"{os.fspath(path)!r} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc


def load_model(source: Any) -> onnx.ModelProto:
    """Read ``source`` into an ``onnx.ModelProto`` without modifying it, and run the ONNX checker.

    Args:
        source: a path to an ``.onnx`` file (external weight files next to it are read too), an
            ``onnx.ModelProto``, serialized model ``bytes``, or an ``onnxruntime.InferenceSession``
            (its model is re-read from the path or bytes it was created from).

    Returns:
        The model (for a ``ModelProto`` argument, the same object: callers must not modify it).

    Raises:
        FileNotFoundError: the path does not exist.
        OnnxModelError: the file does not parse as ONNX, the model fails ``onnx.checker.check_model``,
            or it is over the 2 GB protobuf limit.
        TypeError: ``source`` is none of the above.

    Example:
        >>> import onnx
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
        >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))
        >>> load_model(m.SerializeToString()).graph.node[0].op_type
        'Relu'
    """
    what = describe_source(source)
    if isinstance(source, onnx.ModelProto):
        model = source
    elif isinstance(source, (str, os.PathLike)):
        model = _parse_file(Path(source))
    elif isinstance(source, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(source))
        except Exception as exc:
            raise OnnxModelError(f"the bytes given are not a serialized ONNX model: {type(exc).__name__}: {exc}") from exc
        what = "the serialized model"
    elif is_inference_session(source):
        path, data = getattr(source, "_model_path", None), getattr(source, "_model_bytes", None)
        if path:
            model = _parse_file(Path(path))
        elif data:
            model = onnx.load_from_string(data)
        else:
            raise OnnxModelError(f"{what} does not keep the model it was created from; pass the model path or an "
                                 "onnx.ModelProto instead")
    else:
        raise TypeError(f"expected an ONNX file path, onnx.ModelProto, bytes or onnxruntime.InferenceSession, "
                        f"got {type(source).__module__}.{type(source).__qualname__}")
    if model.ByteSize() > _MAX_PROTO_BYTES:
        raise OnnxModelError(f"{what} is larger than 2 GB; models over the protobuf limit are not supported")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise OnnxModelError(f"{what} fails the ONNX checker: {exc}") from exc
    if not model.graph.output:
        raise OnnxModelError(f"{what} has no graph outputs")
    return model


# ---------------------------------------------------------------------------------------------- scopes
def _dynamo_chain(node: onnx.NodeProto) -> tuple[str, ...] | None:
    """Qualified module names enclosing ``node`` (outermost first) from the dynamo exporter's metadata."""
    meta = {p.key: p.value for p in node.metadata_props}
    if NAME_SCOPES_KEY in meta:
        try:
            scopes = ast.literal_eval(meta[NAME_SCOPES_KEY])
        except (ValueError, SyntaxError):
            return None
        if not isinstance(scopes, (list, tuple)) or len(scopes) < 2 or scopes[0] != "":
            return None  # e.g. ['_empty_nn_module_stack_from_metadata_hook', 'sym_size_int']: no scope
        return tuple(str(s) for s in scopes[1:-1])
    if NAMESPACE_KEY in meta and "/" in meta[NAMESPACE_KEY]:
        names = [part.split(":", 1)[0].strip() for part in meta[NAMESPACE_KEY].split("/")]
        if names and names[0] == "":
            return tuple(names[1:-1])
    return None


def _unqualified(name: str) -> str:
    """The legacy exporter's scope name of the module named ``name``: its last non-numeric atom and the atoms
    after it (``encoder.layers.0`` -> ``layers.0``, ``layer1.0.conv1`` -> ``conv1``, ``0.1`` -> ``0.1``)."""
    atoms = name.split(".")
    for i in range(len(atoms) - 1, -1, -1):
        if not atoms[i].isnumeric():
            return ".".join(atoms[i:])
    return name


def known_module_names(model: onnx.ModelProto) -> frozenset[str]:
    """Module names read from the initializers that keep their ``state_dict`` names (``encoder.layers.0.fc.weight``
    gives ``encoder.layers.0.fc``, ``encoder.layers.0``, ``encoder.layers`` and ``encoder``)."""
    names: set[str] = set()
    for init in model.graph.initializer:
        if "::" in init.name or "/" in init.name or "." not in init.name:
            continue  # a folded constant (``onnx::Conv_12``) or a name that is not a parameter path
        atoms = init.name.split(".")[:-1]
        names.update(".".join(atoms[:i]) for i in range(1, len(atoms) + 1))
    return frozenset(names)


def _legacy_child(parent: str, comp: str, known: frozenset[str]) -> str:
    """The qualified name of the module whose legacy scope name is ``comp``, called inside module ``parent``.

    The child is ``parent.comp`` (a module under a ModuleList, which is never called: ``encoder`` then
    ``layers.0`` is ``encoder.layers.0``), or, when ``comp`` starts with the parent's own scope name, the
    parent's child in a called container (``layer1`` then ``layer1.0`` is ``layer1.0``). Module names read
    from the parameters (``known``) decide between the two, and find a child called through a module that
    was not (``encoder`` calling ``encoder.sub.fc`` directly); without them the container reading wins.
    """
    own = _unqualified(parent)
    candidates = [parent + comp[len(own):]] if comp.startswith(own + ".") else []
    candidates.append(f"{parent}.{comp}")
    if known:
        for name in candidates:
            if name in known:
                return name
        deeper = {n for n in known if n.startswith(parent + ".") and n.endswith("." + comp)}
        if len(deeper) == 1:
            return deeper.pop()
    return candidates[0]


def legacy_chain(node: onnx.NodeProto, known: frozenset[str] = frozenset()) -> tuple[str, ...] | None:
    """Qualified module names from a legacy-exporter node name such as ``/layer1/layer1.0/conv1/Conv``.

    The legacy exporter names each scope by the module's qualified name cut back to its last non-numeric
    atom (``layer1.0.conv1`` -> ``conv1``, ``layer1.0`` -> ``layer1.0``, ``encoder.layers.0`` ->
    ``layers.0``), so the full names are rebuilt from the parent's (see :func:`_legacy_child`; ``known``:
    the module names of :func:`known_module_names`); ``None`` for a node name that is not such a path.
    """
    if not node.name.startswith("/"):
        return None
    chain: list[str] = []
    for comp in node.name.split("/")[1:-1]:
        if not comp:
            return None
        chain.append(_legacy_child(chain[-1], comp, known) if chain else comp)
    return tuple(chain)


def _node_chain(node: onnx.NodeProto, known: frozenset[str] = frozenset()) -> tuple[str, ...] | None:
    chain = _dynamo_chain(node)
    return chain if chain is not None else legacy_chain(node, known)


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a control-flow node's subgraphs read (a superset of its outer-scope inputs)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = list(attr.graphs) + ([attr.g] if attr.HasField("g") else [])
        for g in graphs:
            for n in g.node:
                names.update(i for i in n.input if i)
                names |= _subgraph_inputs(n)
    return names


def _spec_of(vi: onnx.ValueInfoProto) -> TensorSpec | None:
    if not vi.type.HasField("tensor_type"):
        return None
    tt = vi.type.tensor_type
    shape: tuple[Dim, ...] | None = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
    return TensorSpec(vi.name, tt.elem_type, shape)


# ---------------------------------------------------------------------------------------------- graph
class OnnxGraph:
    """An ONNX classifier read for probing: types and shapes inferred, tensors and module scopes indexed.

    The graph has one or more inputs that are not initializers (a batch each, e.g. ``input_ids`` and
    ``attention_mask``); the first one is :attr:`input`.

    Args:
        model: anything :func:`load_model` accepts.

    Attributes:
        model: the model after ``onnx.shape_inference.infer_shapes`` (a copy; the caller's is unchanged).
        source: a short description of where the model came from, for messages.
        inputs: the :class:`TensorSpec` of every graph input, in order.
        input: the first of them (the only one for most classifiers).
        outputs: the graph's output names, in order (the first one is taken as the classifier's output).

    Example:
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
        >>> nodes = [helper.make_node("Relu", ["x"], ["h"], name="/act/Relu"),
        ...          helper.make_node("Neg", ["h"], ["y"], name="/head/Neg")]
        >>> g = OnnxGraph(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
        >>> g.module_names, g.tensor_names
        (['act', 'head'], ['h', 'y'])
        >>> g.resolve("act"), g.resolve("y")
        ('h', 'y')
    """

    def __init__(self, model: Any):
        proto = load_model(model)
        self.source = describe_source(model)
        try:
            self.model = shape_inference.infer_shapes(proto, check_type=False, strict_mode=False, data_prop=True)
        except Exception as exc:  # onnx.shape_inference.InferenceError and friends
            raise OnnxModelError(f"shape inference failed on {self.source}: {exc}") from exc
        g = self.model.graph
        initializers = {t.name for t in g.initializer} | {t.values.name for t in g.sparse_initializer}
        inputs = [vi for vi in g.input if vi.name not in initializers]
        if not inputs:
            raise OnnxModelError(f"{self.source} has no graph input (only initializers): nothing to feed it")
        self.inputs: list[TensorSpec] = []
        for vi in inputs:
            spec = _spec_of(vi)
            if spec is None:
                raise OnnxModelError(f"the graph input {vi.name!r} of {self.source} is not a tensor")
            self.inputs.append(spec)
        self.input: TensorSpec = self.inputs[0]
        self.outputs: list[str] = [o.name for o in g.output]
        self._value_infos: dict[str, onnx.ValueInfoProto] = {}
        for vi in (*g.input, *g.value_info, *g.output):
            self._value_infos.setdefault(vi.name, vi)
        self.nodes: list[onnx.NodeProto] = list(g.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = {}
        dependent = {spec.name for spec in self.inputs}
        for i, node in enumerate(self.nodes):
            reads = {t for t in node.input if t} | _subgraph_inputs(node)
            for t in reads:
                self.consumers.setdefault(t, []).append(i)
            for t in node.output:
                if t:
                    self.producer[t] = i
            if reads & dependent:
                dependent.update(t for t in node.output if t)
        self._dependent = dependent
        known = known_module_names(self.model)
        self.chains: list[tuple[str, ...] | None] = [_node_chain(n, known) for n in self.nodes]
        self._module_nodes: dict[str, list[int]] = {}
        for i, chain in enumerate(self.chains):
            for name in chain or ():
                self._module_nodes.setdefault(name, []).append(i)
        self._module_cache: dict[str, tuple[list[str], str | None]] = {}

    # ------------------------------------------------------------------ tensors
    def spec(self, tensor: str) -> TensorSpec | None:
        """The inferred type and shape of a tensor.

        Args:
            tensor: an ONNX tensor name.

        Returns:
            its :class:`TensorSpec`, or ``None`` if its type is unknown.
        """
        vi = self._value_infos.get(tensor)
        return _spec_of(vi) if vi is not None else None

    def value_info(self, tensor: str) -> onnx.ValueInfoProto:
        """A typed ``ValueInfoProto`` for ``tensor``, fit to be added as a graph output.

        Args:
            tensor: an ONNX tensor name.

        Returns:
            a copy of its ``onnx.ValueInfoProto``.

        Raises:
            OnnxModelError: its type could not be inferred.
        """
        vi = self._value_infos.get(tensor)
        if vi is None or not vi.type.HasField("tensor_type") or not vi.type.tensor_type.elem_type:
            raise OnnxModelError(f"the type of tensor {tensor!r} in {self.source} could not be inferred, so it cannot "
                                 "be added as an output" + (ZIPMAP_HINT if self.has_zipmap else ""))
        out = onnx.ValueInfoProto()
        out.CopyFrom(vi)
        return out

    def _why_not_probeable(self, tensor: str) -> str | None:
        if tensor in {spec.name for spec in self.inputs}:
            return "it is a graph input, not the output of a layer"
        if tensor not in self.producer:
            return "it is not produced by any node"
        if tensor not in self._dependent:
            return f"it does not depend on the graph inputs {[spec.name for spec in self.inputs]} (a constant)"
        spec = self.spec(tensor)
        if spec is None:
            return "its type could not be inferred"
        if spec.elem_type not in _FLOAT_TYPES:
            return f"it holds {spec.dtype} values, not activations"
        return None

    def is_probeable(self, tensor: str) -> bool:
        """Whether a tensor can be probed.

        Args:
            tensor: an ONNX tensor name.

        Returns:
            True when ``tensor`` is a node output of floating type that depends on the graph input.
        """
        return self._why_not_probeable(tensor) is None

    @property
    def tensor_names(self) -> list[str]:
        """All probe-able tensor names.

        Returns:
            the names, in graph order.
        """
        return [t for node in self.nodes for t in node.output if t and self.is_probeable(t)]

    # ------------------------------------------------------------------ modules
    def _module_candidates(self, name: str) -> tuple[list[str], str | None]:
        """(escaping tensors in graph order, a caveat) for module ``name``."""
        if name in self._module_cache:
            return self._module_cache[name]
        inside = set(self._module_nodes.get(name, ()))
        graph_outputs = set(self.outputs)
        candidates = []
        for i in sorted(inside):
            for t in self.nodes[i].output:
                if not t or not self.is_probeable(t):
                    continue
                used_outside = any(c not in inside and self.chains[c] is not None for c in self.consumers.get(t, ()))
                if t in graph_outputs or used_outside:
                    candidates.append(t)
        if not candidates:  # a dead end (its output is used nowhere): the last node's output
            last = [t for i in sorted(inside) for t in self.nodes[i].output if t and self.is_probeable(t)]
            candidates = last[-1:]
        caveat = self._fusion_caveat(name, candidates[-1], inside) if len(candidates) == 1 else None
        self._module_cache[name] = (candidates, caveat)
        return candidates, caveat

    def _fusion_caveat(self, name: str, tensor: str, inside: set[int]) -> str | None:
        for c in self.consumers.get(tensor, ()):
            rule = self._rewrite_rule(c)
            upstream = [r for r in (r.strip() for r in rule.split(",")) if "Fuse" in r and r not in _DOWNSTREAM_FUSIONS]
            if c not in inside and upstream:
                return (f"module {name!r} resolves to tensor {tensor!r}, whose consumer {self.nodes[c].name!r} was "
                        f"rewritten by the exporter's optimiser ({rule}); the module's own output may have been fused "
                        "away, so its HAPs can differ from the PyTorch module's. Re-export with "
                        "libnet_onnx.export_onnx(..., optimize=False) for exact module outputs")
        node = self.nodes[self.producer[tensor]]
        initializers = {t.name for t in self.model.graph.initializer}
        if (node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1 and node.input[1] in initializers
                and node.input[1].startswith("onnx::")):
            return (f"module {name!r} resolves to the output of {node.name!r}, whose weights were rewritten by the "
                    "legacy exporter's constant folding (a BatchNorm after a convolution is folded into it), so its "
                    "HAPs can differ from the PyTorch module's. Re-export with "
                    "libnet_onnx.export_onnx(..., dynamo=False, optimize=False) for exact module outputs")
        return None

    def _rewrite_rule(self, i: int) -> str:
        return next((p.value for p in self.nodes[i].metadata_props if p.key == REWRITE_RULE_KEY), "")

    def _has_fusion(self) -> bool:
        return any("Fuse" in self._rewrite_rule(i) for i in range(len(self.nodes)))

    @property
    def module_names(self) -> list[str]:
        """PyTorch module names recorded by the exporter that resolve to exactly one probe-able tensor.

        Returns:
            the names, in order of their first node.
        """
        return [m for m in self._module_nodes if len(self._module_candidates(m)[0]) == 1]

    def module_output(self, name: str) -> str:
        """The tensor holding the forward output of PyTorch module ``name``.

        Args:
            name: a module name recorded by the exporter (``"conv1"``).

        Returns:
            the ONNX tensor name.

        Raises:
            LayerNotFoundError: no node of the graph is in that module's scope.
            ValueError: the scope has several outputs used elsewhere (a module called more than once, or
                one returning several tensors): name one of the listed tensors instead.
        """
        if name not in self._module_nodes:
            raise LayerNotFoundError(self._unknown_message(name))
        candidates, _ = self._module_candidates(name)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise LayerNotFoundError(f"module {name!r} of {self.source} has no floating-point output that depends on "
                                     "the graph input; probe one of its tensors by ONNX name instead")
        raise ValueError(f"module {name!r} of {self.source} produces {len(candidates)} tensors used outside it "
                         f"{candidates} (a module called more than once in forward, or one returning several "
                         "tensors); pass one of these ONNX tensor names instead")

    def _module_reads(self, name: str) -> list[str]:
        """Tensors the nodes of module ``name``'s scope read from outside it (graph inputs or outputs of other
        nodes; not initializers), in the order the scope first reads them."""
        inside = set(self._module_nodes.get(name, ()))
        graph_inputs = {spec.name for spec in self.inputs}
        reads: list[str] = []
        for i in sorted(inside):
            node = self.nodes[i]
            for t in [*node.input, *sorted(_subgraph_inputs(node))]:
                if not t or t in reads:
                    continue
                producer = self.producer.get(t)
                if (producer is None and t not in graph_inputs) or (producer is not None and producer in inside):
                    continue  # an initializer (a weight), a subgraph's own name, or a tensor made inside the scope
                reads.append(t)
        return reads

    def _input_candidates(self, name: str) -> tuple[list[str], list[str]]:
        """(every tensor module ``name`` reads from outside it, the activations among them): floating tensors
        that depend on the graph input, i.e. probe-able node outputs or floating graph inputs."""
        reads = self._module_reads(name)
        floating_inputs = {s.name for s in self.inputs if s.elem_type in _FLOAT_TYPES}
        return reads, [t for t in reads if t in floating_inputs or self.is_probeable(t)]

    def module_input(self, name: str) -> str:
        """The tensor module ``name`` receives: the one floating tensor depending on the graph input that its
        scope reads from outside it (its first input as the graph computed it; weights are initializers and
        are not counted). It can be a graph input (the model's input for the first module).

        Args:
            name: a module name recorded by the exporter (``"fc1"``).

        Returns:
            the ONNX tensor name.

        Raises:
            LayerNotFoundError: no node of the graph is in that module's scope, or the scope reads no such
                tensor (the message lists what it reads).
            ValueError: the scope reads several (a module taking several tensors, or one called more than
                once): name one of the listed tensors instead.

        Example:
            >>> from onnx import helper, TensorProto
            >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
            >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
            >>> nodes = [helper.make_node("Relu", ["x"], ["h"], name="/act/Relu"),
            ...          helper.make_node("Neg", ["h"], ["y"], name="/head/Neg")]
            >>> g = OnnxGraph(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
            >>> g.module_input("head"), g.module_input("act")
            ('h', 'x')
        """
        if name not in self._module_nodes:
            raise LayerNotFoundError(self._unknown_message(name))
        reads, candidates = self._input_candidates(name)
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise LayerNotFoundError(
                f"module {name!r} of {self.source} reads no floating-point tensor that depends on the graph input "
                f"from outside its scope (it reads {reads}), so '{name}:input' names nothing; probe one of its "
                f"tensors by ONNX name instead. Valid layer names: {(self.module_names + self.tensor_names)[:40]}")
        raise ValueError(f"module {name!r} of {self.source} reads {len(candidates)} tensors from outside it "
                         f"{candidates} (a module taking several inputs, or one called more than once in forward), so "
                         f"'{name}:input' is ambiguous; pass one of these ONNX tensor names instead")

    def module_caveat(self, name: str) -> str | None:
        """A warning text when the exporter's optimisations may have changed module ``name``'s output.

        Args:
            name: a module name.

        Returns:
            the warning, or ``None``.
        """
        if name not in self._module_nodes:
            return None
        return self._module_candidates(name)[1]

    # ------------------------------------------------------------------ names
    @property
    def has_zipmap(self) -> bool:
        """Whether the graph turns class scores into a ZipMap (one dict per input; skl2onnx's default).

        Returns:
            a bool.
        """
        return any(node.op_type == "ZipMap" for node in self.nodes)

    def _unknown_message(self, name: str) -> str:
        valid = self.module_names + self.tensor_names
        if name in self.producer or name in self._value_infos:
            reason = f"tensor {name!r} of {self.source} cannot be probed: {self._why_not_probeable(name)}."
            return unknown_layer_message(name, valid, reason=reason) + (ZIPMAP_HINT if self.has_zipmap else "")
        msg = unknown_layer_message(name, valid, kind=f"ONNX model {self.source}")
        if self.has_zipmap:
            msg += ZIPMAP_HINT
        if self._has_fusion():
            msg += (". The exporter's optimiser fused some nodes of this graph (e.g. BatchNorm into Conv), which "
                    "removes the outputs of the fused modules; re-export with "
                    "libnet_onnx.export_onnx(..., optimize=False) to keep them")
        return msg

    def layer_spec(self, name: str) -> LayerSpec | None:
        """How a layer name reads the graph: ``None`` for a module or probe-able tensor name, else its parsed
        layer spec (``"fc1:input"``, ``"conv1:relu"``, ``"fc1:output"``) on a module of the graph.

        Args:
            name: a layer name.

        Returns:
            ``None`` or the :class:`~libnet_plugin.probe.LayerSpec`.

        Raises:
            TypeError: ``name`` is not a string.
            LayerNotFoundError: neither a module, a probe-able tensor nor a spec on a module of the graph.
            ValueError: a malformed spec, or one naming a call (``"name#K"``), which the graph cannot tell
                apart: name that call's ONNX tensor instead.

        Example:
            >>> from onnx import helper, TensorProto
            >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
            >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
            >>> nodes = [helper.make_node("Neg", ["x"], ["h"], name="/fc/Neg"),
            ...          helper.make_node("Abs", ["h"], ["y"], name="/head/Abs")]
            >>> g = OnnxGraph(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
            >>> g.layer_spec("fc") is None, g.layer_spec("fc:relu")
            (True, LayerSpec(module='fc', call=None, where='output', activation='relu'))
            >>> g.resolve("head:input"), g.resolve("fc:relu")
            ('h', 'h')
        """
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}: {name!r}")
        if name in self._module_nodes or self.is_probeable(name):
            return None
        if (":" not in name and "#" not in name) or name in self.producer or name in self._value_infos:
            raise LayerNotFoundError(self._unknown_message(name))
        try:
            spec = parse_layer_spec(name)
        except ValueError as exc:
            base = name.rpartition(":")[0] if ":" in name else name
            if base.rpartition("#")[0] in self._module_nodes or base in self._module_nodes:
                raise  # a malformed spec on a module of the graph: the message names the valid forms
            raise LayerNotFoundError(self._unknown_message(name) + f". As a layer spec: {exc}") from exc
        if spec.module not in self._module_nodes:
            raise LayerNotFoundError(unknown_layer_message(
                spec.module, self.module_names, kind=f"ONNX model {self.source} (the layer spec {name!r} needs a "
                "PyTorch module name recorded by the exporter)"))
        if spec.call is not None:
            calls = self._module_candidates(spec.module)[0]
            raise ValueError(f"layer {name!r}: the ONNX adapter does not pick one call of a module ('#K'); name the "
                             f"ONNX tensor of that call instead (module {spec.module!r} outputs {calls}; "
                             "`libnet layers MODEL.onnx` lists the tensors)")
        return spec

    def resolve(self, name: str) -> str:
        """The ONNX tensor a layer name stands for: a PyTorch module name first, else an ONNX tensor name, else
        a layer spec on a module (``"fc1:input"``; ``"conv1:relu"`` resolves to conv1's output, the probe
        applies the activation).

        Args:
            name: a module or tensor name, or a layer spec.

        Returns:
            the ONNX tensor name.

        Raises:
            TypeError: ``name`` is not a string.
            LayerNotFoundError: neither a module scope, a probe-able tensor nor a spec on a module; the
                message lists close matches and the valid names.
            ValueError: see :meth:`layer_spec`, :meth:`module_output` and :meth:`module_input`.
        """
        spec = self.layer_spec(name)
        if spec is None:
            return self.module_output(name) if name in self._module_nodes else name
        return self.module_input(spec.module) if spec.where == "input" else self.module_output(spec.module)

    def module_inputs(self) -> dict[str, str]:
        """``{"MODULE:input": tensor}`` for every recorded module that reads exactly one activation (see
        :meth:`module_input`), in order of the modules' first nodes.

        Returns:
            the specs and the tensors they resolve to.
        """
        out = {}
        for m in self._module_nodes:
            candidates = self._input_candidates(m)[1]
            if len(candidates) == 1:
                out[f"{m}:input"] = candidates[0]
        return out

    def layers(self, kind: LayerKind | Literal["all"] = "all") -> list[LayerInfo]:
        """The probe-able layers: module names (in graph order) and/or tensor names (in graph order), or the
        ``"MODULE:input"`` specs.

        Args:
            kind: ``"module"``, ``"tensor"``, ``"all"`` (both), or ``"input"`` (the ``"MODULE:input"`` specs of
                :meth:`module_inputs`; not part of ``"all"``).

        Returns:
            a :class:`LayerInfo` per layer.
        """
        if kind not in ("all", "module", "tensor", "input"):
            raise ValueError(f"kind must be 'all', 'module', 'tensor' or 'input', got {kind!r}")
        names: list[tuple[str, LayerKind, str]] = []
        if kind in ("all", "module"):
            names += [(m, "module", self.module_output(m)) for m in self.module_names]
        if kind in ("all", "tensor"):
            names += [(t, "tensor", t) for t in self.tensor_names]
        if kind == "input":
            names += [(m, "input", t) for m, t in self.module_inputs().items()]
        out = []
        for name, k, tensor in names:
            spec = self.spec(tensor)
            assert spec is not None  # probe-able tensors and graph inputs have a type
            op = self.nodes[self.producer[tensor]].op_type if tensor in self.producer else "(graph input)"
            out.append(LayerInfo(name, k, tensor, op, spec.dtype, spec.shape))
        return out


def list_layers(model: Any, kind: LayerKind | Literal["all"] = "all") -> list[LayerInfo]:
    """The names that can be probed in an ONNX model, with the tensor, operator, dtype and shape of each.

    Args:
        model: an ONNX file path, ``onnx.ModelProto``, serialized bytes, ``onnxruntime.InferenceSession``, or a
            :class:`libnet_onnx.OnnxModel`.
        kind: ``"module"`` for the PyTorch module names recorded by the exporter, ``"tensor"`` for ONNX tensor
            names, ``"all"`` (default) for both, modules first; ``"input"`` for the ``"MODULE:input"`` layer
            specs (what each module receives).

    Returns:
        A list of :class:`LayerInfo`.

    Example:
        >>> from onnx import helper, TensorProto
        >>> x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
        >>> y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])
        >>> m = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")],
        ...                                         "g", [x], [y]))
        >>> [(l.name, l.kind, l.shape) for l in list_layers(m)]
        [('act', 'module', ('batch', 3)), ('y', 'tensor', ('batch', 3))]
        >>> [(l.name, l.tensor, l.op_type) for l in list_layers(m, kind="input")]
        [('act:input', 'x', '(graph input)')]
    """
    graph = getattr(model, "graph", None)
    if not isinstance(graph, OnnxGraph):
        graph = OnnxGraph(model)
    return graph.layers(kind)
