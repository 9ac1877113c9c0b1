"""The ONNX Runtime adapter on tiny graphs: hand-built ONNX models (values computed by hand), legacy
exports of small torch models, name resolution, batching, providers, the CLI, and bad input."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import libnet_plugin as lnp  # noqa: E402
from libnet_onnx import (  # noqa: E402
    ExecutionProviderError,
    InputTypeError,
    OnnxLayerProbe,
    OnnxModel,
    OnnxModelError,
    export_onnx,
    list_layers,
)
from libnet_onnx import plugin as onnx_plugin  # noqa: E402
from libnet_onnx.graph import NAME_SCOPES_KEY, REWRITE_RULE_KEY, OnnxGraph, legacy_chain  # noqa: E402
from libnet_onnx.providers import default_providers, resolve_providers  # noqa: E402
from libnet_plugin import MultiInput  # noqa: E402
from libnet_plugin.errors import LayerNotFoundError, NonFiniteError, ShapeMismatchError  # noqa: E402
from libnet_plugin.probe import TorchLayerProbe  # noqa: E402

# x @ W1 -> relu -> @ W2. For x = [1, 2]: h1 = [5, -1], h2 = [5, 0], y = [5, 0, 5];
# for x = [-1, 1]: h1 = [1, 1], h2 = [1, 1], y = [1, 1, 2].
# Every input, weight and intermediate value is a small integer, so each product and sum is exact in float32
# on any CPU, kernel and thread count: the tests compare these hand-computed values with torch.equal.
W1 = np.array([[1.0, -1.0], [2.0, 0.0]], dtype=np.float32)
W2 = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=np.float32)
X = torch.tensor([[1.0, 2.0], [-1.0, 1.0]])
H1 = torch.tensor([[5.0, -1.0], [1.0, 1.0]])
H2 = torch.tensor([[5.0, 0.0], [1.0, 1.0]])
Y = torch.tensor([[5.0, 0.0, 5.0], [1.0, 1.0, 2.0]])


def _scoped(node: onnx.NodeProto, scopes: list[str], rule: str | None = None) -> onnx.NodeProto:
    entry = node.metadata_props.add()
    entry.key, entry.value = NAME_SCOPES_KEY, repr(scopes)
    if rule:
        entry = node.metadata_props.add()
        entry.key, entry.value = REWRITE_RULE_KEY, rule
    return node


def tiny_proto(style: str = "legacy", batch: int | str = "batch", extra_nodes=()) -> onnx.ModelProto:
    """The hand-set graph above, with module scopes recorded the legacy way (node names), the dynamo way
    (node metadata), or not at all."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])
    inits = [numpy_helper.from_array(W1, "fc1.weight"), numpy_helper.from_array(W2, "fc2.weight")]
    if style == "legacy":
        nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h1"], name="/fc1/MatMul"),
                 helper.make_node("Relu", ["h1"], ["h2"], name="/act/Relu"),
                 helper.make_node("MatMul", ["h2", "fc2.weight"], ["y"], name="/fc2/MatMul")]
    elif style == "dynamo":
        nodes = [_scoped(helper.make_node("MatMul", ["x", "fc1.weight"], ["h1"], name="node_mm"), ["", "fc1", "mm"]),
                 _scoped(helper.make_node("Relu", ["h1"], ["h2"], name="node_relu"), ["", "act", "relu"]),
                 _scoped(helper.make_node("MatMul", ["h2", "fc2.weight"], ["y"], name="node_mm1"), ["", "fc2", "mm1"])]
    else:
        nodes = [helper.make_node("MatMul", ["x", "fc1.weight"], ["h1"]),
                 helper.make_node("Relu", ["h1"], ["h2"]),
                 helper.make_node("MatMul", ["h2", "fc2.weight"], ["y"])]
    graph = helper.make_graph(nodes + list(extra_nodes), "tiny", [x], [y], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


class MLP(nn.Module):
    """A small torch classifier with named and nested modules (exported with the legacy exporter: fast)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.block = nn.Sequential(nn.Linear(16, 12), nn.Tanh())
        self.fc2 = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.block(torch.relu(self.fc1(x))))


@pytest.fixture(scope="module")
def mlp_onnx(tmp_path_factory) -> tuple[MLP, pathlib.Path]:
    torch.manual_seed(0)
    model = MLP().eval()
    path = export_onnx(model, torch.randn(3, 6), tmp_path_factory.mktemp("onnx") / "mlp.onnx", dynamo=False)
    return model, path


@pytest.fixture
def tiny_path(tmp_path) -> pathlib.Path:
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny_proto(), path)
    return path


# ------------------------------------------------------------------------------------------ the hook
def test_entry_point_plugin_is_registered_and_claims_onnx_objects(tiny_path):
    pm = lnp.get_plugin_manager(autoload=True)
    assert pm.get_plugin("onnx") is onnx_plugin
    proto = tiny_proto()
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for model in (str(tiny_path), tiny_path, proto, session, OnnxModel(proto)):
        assert onnx_plugin.claims(model)
        probe = pm.hook.libnet_layer_probe(model=model, layers=["act"], device=torch.device("cpu"))
        assert isinstance(probe, OnnxLayerProbe)
        assert torch.equal(probe.run(X).haps["act"], H2)
    assert not onnx_plugin.claims(nn.Linear(2, 2))
    assert onnx_plugin.libnet_layer_probe(model=nn.Linear(2, 2), layers=["x"], device="cpu") is None
    torch_probe = pm.hook.libnet_layer_probe(model=nn.Sequential(nn.Linear(2, 2)), layers=["0"], device="cpu")
    assert isinstance(torch_probe, TorchLayerProbe)  # torch modules stay with the built-in probe


def test_plugin_and_cli_modules_do_not_import_onnx():
    code = ("import sys, libnet_onnx, libnet_onnx.plugin, libnet_onnx.cli; "
            "print(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("style", ["legacy", "dynamo"])
def test_hand_computed_haps_by_module_and_tensor_name(style):
    probe = OnnxLayerProbe(tiny_proto(style), ["fc1", "act", "h1", "y"])
    res = probe.run(X)
    assert probe.layers == ["fc1", "act", "h1", "y"]  # the user's names are kept
    assert probe.tensors == {"fc1": "h1", "act": "h2", "h1": "h1", "y": "y"}
    assert torch.equal(res.haps["fc1"], H1) and torch.equal(res.haps["h1"], H1)
    assert torch.equal(res.haps["act"], H2)
    assert torch.equal(res.outputs, Y) and torch.equal(res.haps["y"], Y)
    assert res.answers.tolist() == [0, 2]
    assert all(h.dtype == torch.float32 for h in res.haps.values())


def test_graph_without_scopes_offers_tensor_names_only():
    g = OnnxGraph(tiny_proto("plain"))
    assert g.module_names == [] and g.tensor_names == ["h1", "h2", "y"]
    with pytest.raises(LayerNotFoundError, match=r"'fc1' does not exist.*Valid layer names: \['h1', 'h2', 'y'\]"):
        g.resolve("fc1")


def test_legacy_scope_names_are_rebuilt_into_qualified_module_names():
    def chain(name):
        return legacy_chain(helper.make_node("Relu", ["a"], ["b"], name=name))

    assert chain("/layer1/layer1.0/conv1/Conv") == ("layer1", "layer1.0", "layer1.0.conv1")
    assert chain("/features/features.0/features.0.1/Relu") == ("features", "features.0", "features.0.1")
    assert chain("/0/0.1/Gemm") == ("0", "0.1")
    assert chain("/Relu") == ()
    assert chain("Identity_0") is None
    # a ModuleList is never called: its items' scopes come straight under the module holding it
    assert chain("/encoder/layers.0/self_attn/MatMul") == ("encoder", "encoder.layers.0", "encoder.layers.0.self_attn")
    assert chain("/encoder/blocks.1/ff/ff.0/Gemm")[-1] == "encoder.blocks.1.ff.0"


def test_legacy_scope_names_are_checked_against_the_parameter_names():
    def chain(name, known):
        return legacy_chain(helper.make_node("Relu", ["a"], ["b"], name=name), frozenset(known))

    # a ModuleList named like the module holding it, and a module called through one that is not called
    assert chain("/blocks/blocks.0/Relu", {"blocks", "blocks.blocks", "blocks.blocks.0"})[-1] == "blocks.blocks.0"
    assert chain("/encoder/fc/Gemm", {"encoder", "encoder.sub", "encoder.sub.fc"})[-1] == "encoder.sub.fc"
    assert chain("/layer1/layer1.0/Relu", {"layer1", "layer1.0"})[-1] == "layer1.0"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.acts = nn.ModuleList([nn.Tanh(), nn.Sequential(nn.Linear(8, 8), nn.ReLU())])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        for act in self.acts:
            x = act(x)
        return x


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class NestedNet(nn.Module):
    """ModuleLists two and three levels down, as in every HuggingFace encoder (``encoder.layer.0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = Encoder()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x) + x)


@pytest.mark.parametrize("dynamo", [False, True])
def test_modules_under_nested_module_lists_keep_their_torch_names(dynamo, tmp_path):
    if dynamo:
        pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = NestedNet().eval()
    path = export_onnx(model, torch.randn(3, 8), tmp_path / "nested.onnx", dynamo=dynamo)
    names = [l.name for l in list_layers(path, kind="module")]
    for name in ("encoder.blocks.0", "encoder.blocks.0.fc", "encoder.blocks.1.acts.0", "encoder.blocks.1.acts.1",
                 "encoder.blocks.1.acts.1.0", "head"):
        assert name in names, (name, names)
    assert not any(n.startswith(("encoder.0", "encoder.1")) for n in names), names
    layers = ["encoder.blocks.0", "encoder.blocks.1.acts.0", "encoder.blocks.1.acts.1.0", "head"]
    g = torch.Generator().manual_seed(1)
    x, q = torch.randn(120, 8, generator=g), torch.randn(20, 8, generator=g)
    net_t = lnp.LibraryNetwork(model, layers, thresholds=0.9).fit(x)
    net_t.save(tmp_path / "net.lnp")
    loaded = lnp.LibraryNetwork.load(tmp_path / "net.lnp", path)  # fitted in torch, loaded onto the export
    for layer, p in net_t.predict_scores(q).items():
        assert torch.allclose(loaded.predict_scores(q)[layer], p, atol=1e-5), layer


def test_transformer_encoder_layers_keep_their_names_in_a_legacy_export(tmp_path):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Flatten(), nn.Linear(32, 3))
    path = export_onnx(model.eval(), torch.randn(3, 4, 8), tmp_path / "encoder.onnx", dynamo=False)
    names = [l.name for l in list_layers(path, kind="module")]
    assert {"0.layers.0", "0.layers.0.self_attn", "0.layers.1.linear2", "0.layers.1.norm2"} <= set(names), names
    layers = ["0.layers.0", "0.layers.1.linear2", "2"]
    x = torch.randn(5, 4, 8, generator=torch.Generator().manual_seed(1))
    res_t, res_o = TorchLayerProbe(model, layers).run(x), OnnxLayerProbe(path, layers).run(x)
    for name in layers:
        torch.testing.assert_close(res_o.haps[name], res_t.haps[name], rtol=1e-5, atol=1e-5)


def test_module_output_is_the_tensor_used_outside_the_scope():
    # module "blk" computes a = relu(x), b = neg(a); only b leaves the module
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="/blk/Relu"),
             helper.make_node("Neg", ["a"], ["b"], name="/blk/inner/Neg"),
             helper.make_node("Abs", ["b"], ["y"], name="/head/Abs")]
    g = OnnxGraph(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
    assert g.module_names == ["blk", "blk.inner", "head"]
    assert g.resolve("blk") == "b" and g.resolve("blk.inner") == "b" and g.resolve("head") == "y"


def test_module_called_twice_is_ambiguous_and_lists_its_tensors():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [_scoped(helper.make_node("Relu", ["x"], ["r1"]), ["", "act", "relu"]),
             _scoped(helper.make_node("Neg", ["r1"], ["n"]), ["", "mid", "neg"]),
             _scoped(helper.make_node("Relu", ["n"], ["y"]), ["", "act", "relu_1"])]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    assert "act" not in OnnxGraph(proto).module_names
    with pytest.raises(ValueError, match=r"module 'act'.*2 tensors used outside it \['r1', 'y'\]"):
        OnnxLayerProbe(proto, ["act"])


def test_fused_graphs_warn_or_explain():
    # the consumer of fc1's output absorbed a preceding node (Relu(Relu)): fc1's tensor may differ
    proto = tiny_proto("dynamo")
    proto.graph.node[1].metadata_props.add(key=REWRITE_RULE_KEY, value="FuseSuccessiveRelu")
    with pytest.warns(RuntimeWarning, match=r"module 'fc1'.*FuseSuccessiveRelu.*optimize=False"):
        OnnxLayerProbe(proto, ["fc1"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnnxLayerProbe(proto, ["act"])  # nothing downstream of act was fused
    with pytest.raises(LayerNotFoundError, match=r"'conv1' does not exist.*fused.*optimize=False"):
        OnnxLayerProbe(proto, ["conv1"])


def test_list_layers_gives_names_kinds_and_shapes(mlp_onnx):
    _, path = mlp_onnx
    mods = list_layers(path, kind="module")
    assert [l.name for l in mods] == ["fc1", "block", "block.0", "block.1", "fc2"]
    by_name = {l.name: l for l in mods}
    assert by_name["fc1"].shape == ("batch", 16) and by_name["fc1"].size == 16 and by_name["fc1"].op_type == "Gemm"
    assert by_name["block"].tensor == by_name["block.1"].tensor and by_name["block.1"].op_type == "Tanh"
    assert by_name["fc2"].tensor == "output" and by_name["fc2"].dtype == "float32"
    tensors = list_layers(path, kind="tensor")
    assert {l.kind for l in tensors} == {"tensor"} and "output" in [l.name for l in tensors]
    assert list_layers(path) == mods + tensors
    with pytest.raises(ValueError, match="kind must be"):
        list_layers(path, kind="modules")


# ------------------------------------------------------------------------------------------ parity
def test_legacy_export_matches_the_torch_probe_and_builds_the_same_libraries(mlp_onnx, tmp_path):
    model, path = mlp_onnx
    layers = ["fc1", "block.0", "block", "fc2"]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 6, generator=g)
    res_t, res_o = TorchLayerProbe(model, layers).run(x), OnnxLayerProbe(path, layers).run(x)
    assert torch.allclose(res_o.outputs, res_t.outputs, atol=1e-5)
    for layer in layers:
        assert res_o.haps[layer].shape == res_t.haps[layer].shape
        assert torch.allclose(res_o.haps[layer], res_t.haps[layer], atol=1e-5), layer
    net_t = lnp.LibraryNetwork(model, layers, thresholds=0.95, batch_size=64).fit(x)
    net_o = lnp.LibraryNetwork(str(path), layers, thresholds=0.95, batch_size=64).fit(x)
    for layer in layers:
        assert torch.equal(net_o.libraries_[layer].node_indices, net_t.libraries_[layer].node_indices)
    # a network built on the torch model loads onto the ONNX model and scores the same
    net_t.save(tmp_path / "net.lnp")
    loaded = lnp.LibraryNetwork.load(tmp_path / "net.lnp", path)
    assert loaded.probe.layers == layers
    q = torch.randn(40, 6, generator=g)
    for layer, p in net_t.predict_scores(q).items():
        assert torch.allclose(loaded.predict_scores(q)[layer], p, atol=1e-5)
    assert torch.allclose(loaded.consistency(q), net_t.consistency(q), atol=1e-6)


def test_caller_model_and_session_are_untouched(tiny_path):
    proto = tiny_proto()
    before = proto.SerializeToString()
    session = ort.InferenceSession(before, providers=["CPUExecutionProvider"])
    for model in (proto, session):
        net = lnp.LibraryNetwork(model, ["fc1", "act"], thresholds=0.9).fit(X)
        assert net.library_sizes_ == {"fc1": 2, "act": 2}
    assert proto.SerializeToString() == before
    assert [o.name for o in session.get_outputs()] == ["y"]
    assert session.run(None, {"x": X.numpy()})[0].tolist() == Y.tolist()
    file_bytes = tiny_path.read_bytes()
    lnp.LibraryNetwork(tiny_path, ["act"]).fit(X)
    assert tiny_path.read_bytes() == file_bytes


def test_session_settings_are_reused():
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(tiny_proto().SerializeToString(), sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    model = OnnxModel(session)
    assert model.providers == [("CPUExecutionProvider", {})]
    assert model.session_options.intra_op_num_threads == 1


def test_onnx_model_call_and_output_choice():
    model = OnnxModel(tiny_proto())
    assert torch.equal(model(X), Y)
    assert model.input.describe() == "'x' of type float32 and shape [batch, 2]"
    inner = OnnxModel(tiny_proto(), output="h2")  # any probe-able tensor may hold the class scores
    assert inner.output == "h2" and inner(X).shape == (X.shape[0], 2)
    with pytest.raises(ValueError, match=r"output 'nope' is neither an output .* \(its outputs are \['y'\]\) nor one of its probe-able"):
        OnnxModel(tiny_proto(), output="nope")


def test_float64_graph_gives_float32_haps():
    x = helper.make_tensor_value_info("x", TensorProto.DOUBLE, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["batch", 2])
    proto = helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["h"], name="/a/Relu"),
                                                 helper.make_node("Neg", ["h"], ["y"], name="/b/Neg")], "g", [x], [y]))
    res = OnnxLayerProbe(proto, ["a"]).run(X.double())
    assert res.haps["a"].dtype == torch.float32 and torch.equal(res.haps["a"], X.clamp(min=0))
    assert res.outputs.dtype == torch.float64


# ------------------------------------------------------------------------------------------ layer specs
class SpecNet(nn.Module):
    """Functional ReLU, pooling and flattening before fc1, as in the paper's MNIST net: what fc1 receives is
    the output of no module, so only the spec ``"fc1:input"`` names it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.conv1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


SPECS = ["conv1", "conv1:relu", "conv2:input", "fc1:input", "fc2:output"]


@pytest.fixture(scope="module")
def spec_net(tmp_path_factory) -> tuple[SpecNet, dict[str, pathlib.Path]]:
    torch.manual_seed(0)
    model = SpecNet().eval()
    with torch.no_grad():  # without the biases the random net answers every class, not one for all inputs
        model.fc1.bias.zero_()
        model.fc2.bias.zero_()
    folder = tmp_path_factory.mktemp("specs")
    paths = {"legacy": export_onnx(model, torch.randn(2, 1, 14, 14), folder / "legacy.onnx", dynamo=False)}
    try:
        import onnxscript  # noqa: F401  the dynamo exporter needs it
    except ImportError:
        pass
    else:
        paths["dynamo"] = export_onnx(model, torch.randn(2, 1, 14, 14), folder / "dynamo.onnx", dynamo=True)
    return model, paths


def _spec_path(spec_net, kind: str) -> pathlib.Path:
    if kind not in spec_net[1]:
        pytest.skip("the dynamo exporter needs onnxscript")
    return spec_net[1][kind]


@pytest.mark.parametrize("style", ["legacy", "dynamo"])
def test_hand_computed_haps_by_layer_spec(style):
    names = ["fc1:input", "act:input", "fc1:relu", "fc2:input", "act:output", "fc2:sigmoid"]
    probe = OnnxLayerProbe(tiny_proto(style), names)
    assert probe.tensors == {"fc1:input": "x", "act:input": "h1", "fc1:relu": "h1", "fc2:input": "h2",
                             "act:output": "h2", "fc2:sigmoid": "y"}
    with pytest.warns(RuntimeWarning, match="carry the same values"):  # fc1:relu, fc2:input and act:output are H2
        res = probe.run(X)
    # exact by construction: X, W1, W2 hold small integers, so every product and sum is an integer below 2**24,
    # exact in float32 whatever the order, CPU or thread count; and fc1:input is a copy of the fed batch
    assert torch.equal(res.haps["fc1:input"], X)  # the graph input, read from the feed
    assert torch.equal(res.haps["act:input"], H1)
    assert torch.equal(res.haps["fc1:relu"], H2) and torch.equal(res.haps["fc2:input"], H2)
    assert torch.equal(res.haps["act:output"], H2)
    torch.testing.assert_close(res.haps["fc2:sigmoid"], torch.sigmoid(Y))
    assert torch.equal(res.outputs, Y)  # the activation is applied to the HAP only
    assert res.haps["fc1:input"].data_ptr() != X.data_ptr()  # a copy, not the caller's batch


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_layer_specs_match_the_torch_probe(kind, spec_net):
    model, path = spec_net[0], _spec_path(spec_net, kind)
    graph = OnnxGraph(path)
    fc1_in = graph.resolve("fc1:input")
    assert graph.nodes[graph.producer[fc1_in]].op_type in ("Flatten", "Reshape")  # after ReLU, pooling, flattening
    assert graph.resolve("conv1:relu") == graph.resolve("conv1") == graph.resolve("conv1:output")
    assert graph.resolve("fc2:output") == graph.resolve("fc2")
    x = torch.randn(6, 1, 14, 14, generator=torch.Generator().manual_seed(2))
    res_t, res_o = TorchLayerProbe(model, SPECS).run(x), OnnxLayerProbe(path, SPECS).run(x)
    torch.testing.assert_close(res_o.outputs, res_t.outputs, rtol=1e-5, atol=1e-5)
    for layer in SPECS:
        assert res_o.haps[layer].shape == res_t.haps[layer].shape, layer
        torch.testing.assert_close(res_o.haps[layer], res_t.haps[layer], rtol=1e-5, atol=1e-5, msg=layer)
    assert res_o.haps["fc1:input"].shape == (6, 16) and bool((res_o.haps["fc1:input"] >= 0).all())
    assert bool((res_o.haps["conv1"] < 0).any()) and bool((res_o.haps["conv1:relu"] >= 0).all())


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_a_detector_fitted_in_torch_on_layer_specs_scores_the_same_on_onnx(kind, spec_net, tmp_path):
    model, path = spec_net[0], _spec_path(spec_net, kind)
    layers = ["conv1:relu", "fc1:input", "fc1"]
    g = torch.Generator().manual_seed(4)
    train, clean, q = (torch.randn(n, 1, 14, 14, generator=g) for n in (160, 60, 20))
    assert len(model(train).argmax(dim=1).unique()) == 3
    # the default score averages a convolution's activations per channel, the channels read from the torch module
    # at fit; an ONNX graph holds no module, so the loaded detector takes them from the file
    det = lnp.ConsistencyDetector.from_model(model, train, layers=layers, thresholds=0.9).calibrate(clean, fpr=0.1)
    assert det.scorer.config()["channels_"]["conv1:relu"] == 3
    det.save(tmp_path / "det.lnp")
    loaded = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", path)  # fitted in torch, loaded onto the export
    assert isinstance(loaded.net.probe, OnnxLayerProbe) and loaded.net.probe.layers == layers
    torch.testing.assert_close(loaded.score(q), det.score(q), rtol=1e-5, atol=1e-5)
    want, got = det.net.predict_scores(q), loaded.net.predict_scores(q)
    for layer in layers:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5, msg=layer)
    torch.testing.assert_close(loaded.net.consistency(q), det.net.consistency(q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_list_layers_and_the_cli_show_the_module_inputs(kind, spec_net, capsys):
    from libnet_plugin.cli import main

    path = _spec_path(spec_net, kind)
    inputs = {l.name: l for l in list_layers(path, kind="input")}
    assert list(inputs) == ["conv1:input", "conv2:input", "fc1:input", "fc2:input"]
    assert {l.kind for l in inputs.values()} == {"input"}
    assert inputs["conv1:input"].op_type == "(graph input)" and inputs["conv1:input"].tensor == "input"
    assert inputs["conv2:input"].op_type == "MaxPool" and inputs["conv2:input"].shape == ("batch", 3, 6, 6)
    assert inputs["fc1:input"].tensor == OnnxGraph(path).resolve("fc1:input") and inputs["fc1:input"].size == 16
    assert list_layers(path) == list_layers(path, kind="module") + list_layers(path, kind="tensor")
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^Module inputs \(the layer specs 'MODULE:input'\): 4$", out, flags=re.M)
    assert re.search(r"^\s+fc1:input\s+(Flatten|Reshape)\s+float32\s+\[batch, 16\]\s+\S+$", out, flags=re.M)
    assert main(["layers", str(path), "--kind", "input", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list(inputs) and rows[0]["kind"] == "input"


def test_tensor_names_holding_a_colon_are_read_as_tensors():
    # the legacy exporter's folded constants are named "onnx::Conv_12"; any tensor name may hold ':'
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [helper.make_node("Neg", ["x"], ["blk:relu"], name="/blk/Neg"),
             helper.make_node("Relu", ["blk:relu"], ["onnx::Abs_1"], name="/act/Relu"),
             helper.make_node("Abs", ["onnx::Abs_1"], ["y"], name="/head/Abs")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    probe = OnnxLayerProbe(proto, ["blk:relu", "onnx::Abs_1", "blk", "head:input"])
    assert probe.specs["blk:relu"] is None and probe.specs["onnx::Abs_1"] is None
    assert probe.tensors == {"blk:relu": "blk:relu", "onnx::Abs_1": "onnx::Abs_1", "blk": "blk:relu",
                             "head:input": "onnx::Abs_1"}
    with pytest.warns(RuntimeWarning, match="carry the same values"):
        res = probe.run(X)
    assert torch.equal(res.haps["blk:relu"], -X)  # the tensor, not blk's output with a ReLU after it
    assert torch.equal(res.haps["head:input"], torch.relu(-X))


def test_bad_layer_specs_name_the_module_and_the_valid_names():
    proto = tiny_proto("dynamo")
    with pytest.raises(ValueError, match=r"layer spec 'fc1:softplus': unknown part 'softplus'.*'MODULE:input'"):
        OnnxLayerProbe(proto, ["fc1:softplus"])
    with pytest.raises(LayerNotFoundError, match=r"'fc3' does not exist .*spec 'fc3:input' needs a PyTorch module "
                                                 r"name.*Did you mean 'fc2', 'fc1'.*Valid layer names: \['fc1', 'act', "
                                                 r"'fc2'\]"):
        OnnxLayerProbe(proto, ["fc3:input"])
    with pytest.raises(ValueError, match=r"'act#2:relu': the ONNX adapter does not pick one call.*name the ONNX tensor.*"
                                         r"module 'act' outputs \['h2'\]"):
        OnnxLayerProbe(proto, ["act#2:relu"])
    with pytest.raises(LayerNotFoundError, match=r"'onnx::Gemm_3' does not exist.*Valid layer names"):
        OnnxLayerProbe(proto, ["onnx::Gemm_3"])  # not a spec on a module: an unknown tensor name


def test_module_input_must_be_one_floating_tensor_computed_from_the_input():
    # "act" runs twice (the dynamo exporter records one scope): it reads x, then n
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    nodes = [_scoped(helper.make_node("Relu", ["x"], ["r1"]), ["", "act", "relu"]),
             _scoped(helper.make_node("Neg", ["r1"], ["n"]), ["", "mid", "neg"]),
             _scoped(helper.make_node("Relu", ["n"], ["y"]), ["", "act", "relu_1"])]
    twice = helper.make_model(helper.make_graph(nodes, "g", [x], [y]))
    with pytest.raises(ValueError, match=r"module 'act' .* reads 2 tensors from outside it \['x', 'n'\].*"
                                         r"'act:input' is ambiguous"):
        OnnxLayerProbe(twice, ["act:input"])
    assert OnnxGraph(twice).resolve("mid:input") == "r1"
    # an embedding reads token ids (int64) and its table (an initializer): no activation comes in
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 2])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", 6])
    table = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "emb.weight")
    nodes = [helper.make_node("Gather", ["emb.weight", "ids"], ["e"], name="/emb/Gather"),
             helper.make_node("Flatten", ["e"], ["out"], name="/head/Flatten")]
    embed = helper.make_model(helper.make_graph(nodes, "g", [ids], [out], initializer=[table]),
                              opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(LayerNotFoundError, match=r"module 'emb' .* reads no floating-point tensor .* \(it reads "
                                                 r"\['ids'\]\), so 'emb:input' names nothing.*Valid layer names"):
        OnnxLayerProbe(embed, ["emb:input"])
    assert OnnxGraph(embed).resolve("head:input") == "e"


# ------------------------------------------------------------------------------------------ batching
def test_one_session_call_per_batch(mlp_onnx):
    _, path = mlp_onnx
    net = lnp.LibraryNetwork(path, ["fc1", "fc2"], thresholds=0.9, batch_size=50, cache_bytes=0)
    calls = []
    real_run = net.probe.session.run

    def counting_run(names, feed):
        calls.append(next(iter(feed.values())).shape[0])
        return real_run(names, feed)

    net.probe.session.run = counting_run
    net.fit(torch.randn(120, 6))
    # one call per batch, each returning the output and both layers; fit streams twice (library, readout)
    assert calls == [50, 50, 20] * 2


def test_fixed_batch_graph_runs_in_padded_chunks():
    res_dyn = OnnxLayerProbe(tiny_proto(batch="batch"), ["act"]).run(torch.cat([X, X, X[:1]]))
    probe = OnnxLayerProbe(tiny_proto(batch=2), ["act"])
    assert probe.fixed_batch == 2
    with pytest.warns(RuntimeWarning, match="fixed batch size of 2; running 5 inputs in 3 session calls"):
        res = probe.run(torch.cat([X, X, X[:1]]))
    assert torch.equal(res.haps["act"], res_dyn.haps["act"]) and torch.equal(res.outputs, res_dyn.outputs)


# ------------------------------------------------------------------------------------------ providers
def test_providers_default_to_cpu_and_follow_a_cuda_device():
    assert resolve_providers(None) == (["CPUExecutionProvider"], [{}])
    assert resolve_providers(("CPU", "cpu")) == (["CPUExecutionProvider"], [{}])
    assert resolve_providers(("cpu", {"arena_extend_strategy": "kSameAsRequested"})) == (
        ["CPUExecutionProvider"], [{"arena_extend_strategy": "kSameAsRequested"}])
    assert default_providers(torch.device("cpu")) == ["cpu"]
    assert default_providers(torch.device("cuda:1")) == [("cuda", {"device_id": 1}), "cpu"]
    assert OnnxLayerProbe(tiny_proto(), ["act"]).providers == ["CPUExecutionProvider"]


def test_unavailable_provider_falls_back_with_a_warning_or_raises(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.warns(RuntimeWarning, match=r"'CUDAExecutionProvider' is not available.*falling back to "
                                            r"\['CPUExecutionProvider'\]"):
        probe = OnnxLayerProbe(tiny_proto(), ["act"], providers=["cuda"])
    assert probe.providers == ["CPUExecutionProvider"] and torch.equal(probe.run(X).haps["act"], H2)
    with pytest.warns(RuntimeWarning) as record:
        assert resolve_providers(["tensorrt", "cuda"]) == (["CPUExecutionProvider"], [{}])
    assert ["TensorrtExecutionProvider" in str(w.message) for w in record] == [True, False]
    assert "CUDAExecutionProvider" in str(record[1].message)
    with pytest.raises(ExecutionProviderError, match="'CUDAExecutionProvider' is not available"):
        OnnxModel(tiny_proto(), providers=[("cuda", {"device_id": 0})], fallback=False).probe(["act"])


def test_unknown_provider_is_an_error():
    with pytest.raises(ExecutionProviderError, match=r"unknown onnxruntime execution provider 'cudda'.*'cuda'"):
        OnnxLayerProbe(tiny_proto(), ["act"], providers=["cudda"])


# ------------------------------------------------------------------------------------------ bad input
def test_a_file_that_is_not_onnx(tmp_path):
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(OnnxModelError, match=r"notes.onnx' is not a readable ONNX model"):
        lnp.LibraryNetwork(text, ["act"])
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(OnnxModelError, match="fails the ONNX checker"):
        lnp.LibraryNetwork(str(empty), ["act"])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        lnp.LibraryNetwork(str(tmp_path / "missing.onnx"), ["act"])


def test_a_model_that_fails_the_checker():
    proto = tiny_proto()
    proto.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(OnnxModelError, match="fails the ONNX checker.*undefined_tensor"):
        OnnxLayerProbe(proto, ["act"])


def test_graphs_the_adapter_cannot_probe():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["batch", 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])
    no_inputs = helper.make_model(helper.make_graph([helper.make_node("Constant", [], ["y"], value=helper.make_tensor(
        "c", TensorProto.FLOAT, [1, 2], [1.0, 2.0]))], "g", [], [y]))
    with pytest.raises(OnnxModelError, match="has no graph input"):
        OnnxLayerProbe(no_inputs, [])
    flat = helper.make_tensor_value_info("s", TensorProto.FLOAT, ["batch"])
    sums = helper.make_model(helper.make_graph(
        [helper.make_node("ReduceMax", ["a"], ["s"], axes=[1], keepdims=0, name="/sum/ReduceMax")], "g", [a], [flat]),
        opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(OnnxModelError, match=r"class scores as a floating tensor \[B, C\]: 's' of type float32 and "
                                             r"shape \[batch\]"):
        OnnxLayerProbe(sums, ["sum"]).run(X)  # raised when it runs: a saved output choice may come first


def test_unknown_layer_lists_close_matches(mlp_onnx):
    _, path = mlp_onnx
    with pytest.raises(LayerNotFoundError, match=r"'fc3' does not exist in the ONNX model .*Did you mean 'fc2', 'fc1'"):
        lnp.LibraryNetwork(path, ["fc1", "fc3"])
    with pytest.raises(LayerNotFoundError, match=r"'block.2' does not exist.*Did you mean .*'block.1'"):
        OnnxLayerProbe(path, ["block.2"])


def test_a_tensor_that_is_not_an_activation_is_refused():
    shape = helper.make_node("Shape", ["h2"], ["shape_of_h2"], name="/shape/Shape")
    proto = tiny_proto(extra_nodes=[shape])
    with pytest.raises(LayerNotFoundError, match=r"tensor 'shape_of_h2' .* cannot be probed: it holds int64 values"):
        OnnxLayerProbe(proto, ["shape_of_h2"])
    with pytest.raises(LayerNotFoundError, match=r"tensor 'x' .* cannot be probed: it is a graph input.*Valid layer names: \['fc1'"):
        OnnxLayerProbe(proto, ["x"])
    with pytest.raises(TypeError, match="layer names must be strings"):
        OnnxLayerProbe(proto, [3])


def test_input_of_the_wrong_shape_or_dtype_names_the_expected_input(mlp_onnx):
    _, path = mlp_onnx
    probe = OnnxLayerProbe(path, ["fc1"])
    with pytest.raises(ShapeMismatchError, match=r"shape \[4, 5\]; the ONNX graph expects input 'input' of type "
                                                 r"float32 and shape \[batch, 6\]"):
        probe.run(torch.randn(4, 5))
    with pytest.raises(ShapeMismatchError, match=r"shape \[4, 1, 6\]"):
        probe.run(torch.randn(4, 1, 6))
    with pytest.raises(InputTypeError, match=r"dtype torch.float64; the ONNX graph expects input 'input' of type float32"):
        probe.run(torch.randn(4, 6, dtype=torch.float64))
    with pytest.raises(InputTypeError, match="torch.bfloat16"):
        probe.run(torch.randn(4, 6).bfloat16())
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        probe.run(np.zeros((4, 6), np.float32))
    with pytest.raises(NonFiniteError, match="the input batch contains non-finite values"):
        probe.run(torch.full((2, 6), float("nan")))


def test_non_finite_activations_are_reported():
    log = helper.make_node("Log", ["h2"], ["logh"], name="/log/Log")
    proto = tiny_proto(extra_nodes=[log])
    with pytest.raises(NonFiniteError, match="activations of layer 'log'"):
        OnnxLayerProbe(proto, ["log"]).run(X)  # log(0) = -inf


def test_probe_options_belong_on_the_onnx_model():
    with pytest.raises(TypeError, match="set providers"):
        OnnxLayerProbe(OnnxModel(tiny_proto()), ["act"], providers=["cpu"])
    with pytest.raises(TypeError, match="expected an ONNX file path"):
        OnnxModel(12)


# ------------------------------------------------------------------------------------------ export
def test_export_onnx_restores_training_mode_and_makes_the_batch_dynamic(tmp_path):
    model = MLP().train()
    path = export_onnx(model, torch.randn(1, 6), tmp_path / "sub" / "m.onnx", dynamo=False)
    assert model.training and path.is_file()
    assert OnnxModel(path).input.shape == ("batch", 6)
    assert OnnxLayerProbe(path, ["fc2"]).run(torch.randn(7, 6)).outputs.shape == (7, 4)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        export_onnx(lambda x: x, torch.randn(2, 6), tmp_path / "f.onnx")
    with pytest.raises(ValueError, match="non-empty batch"):
        export_onnx(model, torch.randn(0, 6), tmp_path / "f.onnx")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_layers_prints_names_and_shapes(mlp_onnx, capsys):
    from libnet_plugin.cli import main

    _, path = mlp_onnx
    assert main(["layers", str(path)]) == 0
    out = capsys.readouterr().out
    assert "input 'input' of type float32 and shape [batch, 6]" in out
    assert re.search(r"^\s+fc1\s+Gemm\s+float32\s+\[batch, 16\]\s+/fc1/Gemm_output_0$", out, flags=re.M)
    assert re.search(r"^\s+block\.1\s+Tanh\s+float32\s+\[batch, 12\]", out, flags=re.M)
    assert main(["layers", str(path), "--kind", "module", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["fc1", "block", "block.0", "block.1", "fc2"]
    assert rows[0] == {"name": "fc1", "kind": "module", "tensor": "/fc1/Gemm_output_0", "op_type": "Gemm",
                       "dtype": "float32", "shape": ["batch", 16]}


def test_cli_layers_reports_a_bad_file(tmp_path, capsys):
    from libnet_plugin.cli import main

    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    assert main(["layers", str(bad)]) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ docs
@pytest.mark.parametrize("module", ["graph", "probe", "providers", "plugin", "export"])
def test_docstring_examples(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(f"libnet_onnx.{module}"))
    assert result.attempted > 0 and result.failed == 0


def test_lazy_package_exports():
    import libnet_onnx

    assert libnet_onnx.OnnxLayerProbe is OnnxLayerProbe and libnet_onnx.list_layers is list_layers
    assert set(libnet_onnx.__all__) <= set(dir(libnet_onnx))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        libnet_onnx.nope


# ------------------------------------------------------------------------------------------ README
def test_readme_onnx_example_runs(tmp_path, monkeypatch):
    from readme_blocks import run_readme_block

    monkeypatch.chdir(tmp_path)
    _, namespace = run_readme_block("onnx")
    net, net_torch, net_onnx = namespace["net"], namespace["net_torch"], namespace["net_onnx"]
    assert isinstance(net.probe, OnnxLayerProbe) and isinstance(net_onnx.probe, OnnxLayerProbe)
    assert net.library_sizes_ == net_torch.library_sizes_ == net_onnx.library_sizes_
    test = namespace["test"]
    assert torch.allclose(net.consistency(test), net_torch.consistency(test), atol=1e-5)
    assert torch.allclose(net_onnx.consistency(test), net_torch.consistency(test), atol=1e-5)


def test_a_graph_with_several_inputs_is_fed_by_name_or_order(tmp_path, capsys):
    import onnx

    from libnet_onnx.errors import InputTypeError
    from libnet_plugin.cli import main

    a = helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["batch", 3])
    b = helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Mul", ["input_ids", "attention_mask"], ["h"], name="/mask/Mul"),
             helper.make_node("Relu", ["h"], ["logits"], name="/head/Relu")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [a, b], [y]), opset_imports=[helper.make_opsetid("", 17)])
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randn(60, 3, generator=g), (torch.rand(60, 3, generator=g) > 0.3).float()
    probe = OnnxLayerProbe(proto, ["mask", "head"])
    by_name = probe.run(MultiInput({"attention_mask": mask, "input_ids": ids}))
    in_order = probe.run(MultiInput((ids, mask)))
    assert torch.equal(by_name.haps["mask"], ids * mask) and torch.equal(in_order.outputs, torch.relu(ids * mask))
    with pytest.raises(InputTypeError, match=r"2 graph inputs \['input_ids', 'attention_mask'\]"):
        probe.run(ids)
    with pytest.raises(InputTypeError, match=r"missing \['attention_mask'\]"):
        probe.run(MultiInput({"input_ids": ids}))
    net = lnp.LibraryNetwork(proto, ["mask", "head"], thresholds=0.9).fit({"input_ids": ids, "attention_mask": mask})
    assert net.n_train_ == 60 and net.consistency({"input_ids": ids[:5], "attention_mask": mask[:5]}).shape == (5,)
    path = tmp_path / "two.onnx"
    onnx.save(proto, str(path))
    assert main(["layers", str(path)]) == 0
    assert "inputs 'input_ids'" in capsys.readouterr().out


def test_a_two_input_graph_with_an_input_named_x_is_fed_dict_batches():
    x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])
    m_in = helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["batch", 3])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])
    nodes = [helper.make_node("Mul", ["x", "mask"], ["h"], name="/gate/Mul"),
             helper.make_node("Tanh", ["h"], ["logits"], name="/head/Tanh")]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x_in, m_in], [y]), opset_imports=[helper.make_opsetid("", 17)])
    g = torch.Generator().manual_seed(0)
    x, mask = torch.randn(60, 3, generator=g), (torch.rand(60, 3, generator=g) > 0.3).float()
    by_order = lnp.LibraryNetwork(proto, ["gate", "head"], thresholds=0.9).fit(((x, mask),))
    assert torch.equal(by_order.run(MultiInput((x, mask))).haps["gate"], x * mask)
    # a dict keyed by the graph's inputs: fed by name, or (while the key "x" is read as the one input of a
    # batch) refused with what to do instead, never run on a part of the inputs
    try:
        by_name = lnp.LibraryNetwork(proto, ["gate", "head"], thresholds=0.9).fit({"x": x, "mask": mask})
    except InputTypeError as exc:
        assert re.search(r"2 graph inputs \['x', 'mask'\] but the batch gave one tensor.*key 'x' is read as that one "
                         r"tensor.*tuple batch in the order \['x', 'mask'\], e\.g\. \(\(x, mask\), y\)", str(exc)), exc
    else:
        for layer, p in by_order.predict_scores(((x[:9], mask[:9]),)).items():
            torch.testing.assert_close(by_name.predict_scores({"x": x[:9], "mask": mask[:9]})[layer], p)


def test_skl2onnx_zipmap_and_copies_of_the_probabilities():
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 1).astype(int)
    clf = LogisticRegression().fit(x, y)
    xt = torch.from_numpy(x)
    zipmap = skl2onnx.to_onnx(clf, x[:1])  # the default: probabilities as one dict per input
    with pytest.raises(LayerNotFoundError, match=r"'probabilities'.*cannot be probed.*ZipMap.*zipmap=False"):
        lnp.LibraryNetwork(zipmap, ["probability_tensor", "probabilities"], thresholds=0.9)
    with pytest.raises(OnnxModelError, match=r"ZipMap.*zipmap=False"):
        OnnxModel(zipmap)(xt[:2])
    plain = skl2onnx.to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}})
    # probability_tensor and its L1-normalised copy probabilities hold the same values: CPL says nothing
    with pytest.warns(RuntimeWarning, match=r"same values.*'probability_tensor' = 'probabilities'.*CPL.*vacuous"):
        net = lnp.LibraryNetwork(plain, ["probability_tensor", "probabilities"], thresholds=0.9).fit(xt)
    torch.testing.assert_close(net.consistency(xt[:10]), torch.ones(10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        OnnxLayerProbe(plain, ["probabilities"]).run(xt[:4])  # one layer: nothing to compare
