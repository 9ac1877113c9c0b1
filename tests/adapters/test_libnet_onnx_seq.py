"""Sequence-first layers ([T, B, ...]: nn.LSTM, nn.TransformerEncoderLayer with batch_first=False) on ONNX
Runtime: the batch moved first as the torch probe does, by the dims a torch-fitted network saved, by the
graph's shapes, or by the caller's batch_dims; a batch as large as the sequence is long included (T == B)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import libnet_plugin as lnp  # noqa: E402
from libnet_onnx import OnnxLayerProbe, export_onnx  # noqa: E402
from libnet_plugin.errors import ShapeMismatchError  # noqa: E402
from libnet_plugin.probe import TorchLayerProbe  # noqa: E402

T, F = 4, 6  # the sequence length (static in the export) and the features per step
LAYERS = ["lstm", "enc", "enc.linear1", "head"]
SEQ_FIRST = {"lstm": 1, "enc": 1, "enc.linear1": 1, "head": 0}


class SeqFirstNet(nn.Module):
    """Inputs [B, T, F]; an nn.LSTM and an nn.TransformerEncoderLayer, both sequence-first (PyTorch's default)."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(F, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(0, 1))  # [T, B, 8]
        return self.head(self.enc(out).mean(dim=0))


@pytest.fixture(scope="module")
def seq_net(tmp_path_factory):
    torch.manual_seed(0)
    model = SeqFirstNet().eval()
    folder = tmp_path_factory.mktemp("seq")
    paths = {"legacy": export_onnx(model, torch.randn(3, T, F), folder / "legacy.onnx", dynamo=False)}
    try:
        import onnxscript  # noqa: F401  the dynamo exporter needs it
    except ImportError:
        pass
    else:
        paths["dynamo"] = export_onnx(model, torch.randn(3, T, F), folder / "dynamo.onnx", dynamo=True)
    return model, paths


def _path(seq_net, kind):
    if kind not in seq_net[1]:
        pytest.skip("the dynamo exporter needs onnxscript")
    return seq_net[1][kind]


def _unnamed_batch(path, fixed: int | None = None) -> onnx.ModelProto:
    """The export with its batch dimension unnamed (or fixed): its shapes no longer tell where the batch is."""
    proto = onnx.load(str(path))
    del proto.graph.value_info[:]
    for vi in (*proto.graph.input, *proto.graph.output):
        dim = vi.type.tensor_type.shape.dim[0]
        dim.Clear()
        if fixed is not None:
            dim.dim_value = fixed
    return proto


def _data(n_train=120):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, T, F, generator=g) for n in (n_train, 40, T, 5))  # train, clean, B == T, B != T


def _assert_same_haps(got, want):
    for layer in want:
        torch.testing.assert_close(got[layer], want[layer], rtol=1e-5, atol=1e-5, msg=layer)


def test_the_torch_probe_saves_where_each_layer_holds_the_batch():
    torch.manual_seed(0)
    model = SeqFirstNet().eval()
    assert TorchLayerProbe(model, LAYERS).config() == {"batch_dims": SEQ_FIRST}
    assert TorchLayerProbe(model, LAYERS, batch_dims={"head": 0, "lstm": 0}).config()["batch_dims"]["lstm"] == 0
    net = lnp.LibraryNetwork(model, LAYERS, thresholds=0.5).fit(next(_data()))
    assert net.config()["probe"] == {"batch_dims": SEQ_FIRST}


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_a_detector_fitted_in_torch_on_sequence_first_layers_scores_the_same_on_onnx(kind, seq_net, tmp_path):
    model, path = seq_net[0], _path(seq_net, kind)
    train, clean, square, other = _data()
    det = lnp.ConsistencyDetector.from_model(model, train, layers=LAYERS, thresholds=0.5).calibrate(clean, fpr=0.1)
    det.save(tmp_path / "det.lnp")
    # the shapes of the export say where the batch is; the graph with the batch unnamed does not: the saved dims do
    for onto in (path, _unnamed_batch(path)):
        loaded = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", onto)
        assert isinstance(loaded.net.probe, OnnxLayerProbe)
        assert loaded.net.probe.layer_batch_dims() == SEQ_FIRST
        for q in (square, other):  # B == T: read batch-first, the rows would be time steps
            _assert_same_haps(loaded.net.run(q).haps, det.net.run(q).haps)
            torch.testing.assert_close(loaded.score(q), det.score(q), rtol=1e-5, atol=1e-5)


def test_an_old_file_without_batch_dims_loads_and_reads_the_batch_first(seq_net):
    model, path = seq_net[0], _path(seq_net, "legacy")
    train, _, square, _ = _data()
    net = lnp.LibraryNetwork(model, LAYERS, thresholds=0.5).fit(train)
    cfg = net.config()
    cfg["probe"] = None  # as written before the torch probe saved its batch dims
    proto = _unnamed_batch(path)
    old = lnp.LibraryNetwork.from_state(net.state_tensors(), cfg, proto)
    assert old.probe.layer_batch_dims() == dict.fromkeys(LAYERS, 0)
    with pytest.warns(RuntimeWarning, match=r"\['lstm', 'enc', 'enc.linear1'\] .* \[4, 4, \.\.\.\] .* read batch-first"):
        before = OnnxLayerProbe(proto, LAYERS).run(square).haps  # as before: [T, B, ...] read as it is
    with pytest.warns(RuntimeWarning, match="batch_dims=\\{layer: 1\\}"):
        _assert_same_haps(old.run(square).haps, before)
    assert not torch.allclose(before["lstm"], net.run(square).haps["lstm"], rtol=1e-3, atol=1e-3)
    # the graph's shapes tell it, where the export names its batch dimension
    assert lnp.LibraryNetwork.from_state(net.state_tensors(), cfg, path).probe.layer_batch_dims() == SEQ_FIRST


@pytest.mark.parametrize("kind", ["legacy", "dynamo"])
def test_the_graph_shapes_tell_a_sequence_first_tensor(kind, seq_net):
    model, path = seq_net[0], _path(seq_net, kind)
    _, _, square, _ = _data()
    probe = OnnxLayerProbe(path, LAYERS)
    assert probe.graph_batch_dims == {"lstm": 1, "enc": 1, "enc.linear1": 1}
    _assert_same_haps(probe.run(square).haps, TorchLayerProbe(model, LAYERS).run(square).haps)


def test_batch_dims_by_hand_on_an_onnx_only_network(seq_net):
    model, path = seq_net[0], _path(seq_net, "legacy")
    train, clean, square, other = _data()
    proto = _unnamed_batch(path)
    dims = {"lstm": 1, "enc": 1, "enc.linear1": 1}
    want = TorchLayerProbe(model, LAYERS).run(square).haps
    net = lnp.LibraryNetwork(proto, LAYERS, thresholds=0.5, batch_dims=dims).fit(train)
    assert net.probe.layer_batch_dims() == SEQ_FIRST and net.config()["batch_dims"] == dims
    _assert_same_haps(net.run(square).haps, want)
    det = lnp.ConsistencyDetector.from_model(proto, train, layers=LAYERS, thresholds=0.5,
                                             network_options={"batch_dims": dims}).calibrate(clean, fpr=0.1)
    ref = lnp.ConsistencyDetector.from_model(model, train, layers=LAYERS, thresholds=0.5).calibrate(clean, fpr=0.1)
    for q in (square, other):
        torch.testing.assert_close(det.score(q), ref.score(q), rtol=1e-5, atol=1e-5)
    # without them the unnamed graph reads [T, B, ...] batch-first: a batch of B != T is refused, B == T is not
    plain = OnnxLayerProbe(proto, LAYERS)
    assert plain.graph_batch_dims == {} and plain.layer_batch_dims() == dict.fromkeys(LAYERS, 0)
    with pytest.raises(ShapeMismatchError, match=r"'lstm'.*batch_dims=\{layer: dim\}"):
        plain.run(other)
    plain.set_batch_dims(dict.fromkeys(LAYERS, 0))  # said batch-first: read so without a warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plain.run(square).haps["lstm"].shape == (T, T * 8)
    with pytest.raises(ValueError, match="'nope', which is not probed"):
        plain.set_batch_dims({"nope": 1})
    with pytest.raises(ValueError, match=r"batch_dims\['lstm'\] must be a dimension index"):
        plain.set_batch_dims({"lstm": -1})
    plain.set_batch_dims({"lstm": 3})
    with pytest.raises(ShapeMismatchError, match=r"layer 'lstm' at dimension 3.*shape \[4, 4, 8\]"):
        plain.run(square)


def test_a_fixed_batch_graph_runs_sequence_first_tensors_in_chunks(seq_net):
    model, path = seq_net[0], _path(seq_net, "legacy")
    train, _, _, other = _data()
    net = lnp.LibraryNetwork(model, LAYERS, thresholds=0.5).fit(train)
    fixed = lnp.LibraryNetwork.from_state(net.state_tensors(), net.config(), _unnamed_batch(path, fixed=T))
    with pytest.warns(RuntimeWarning, match="fixed batch size of 4"):
        got = fixed.run(other).haps  # 5 inputs: two runs of 4, the last padded
    _assert_same_haps(got, net.run(other).haps)


def test_malformed_saved_batch_dims_are_refused(seq_net):
    model, path = seq_net[0], _path(seq_net, "legacy")
    net = lnp.LibraryNetwork(model, LAYERS, thresholds=0.5).fit(next(_data()))
    cfg = net.config()
    for bad in ({"lstm": -1}, {"lstm": "1"}, [1, 0]):
        cfg["probe"] = {"batch_dims": bad}
        with pytest.raises(lnp.SaveFormatError, match="saved batch_dims should map layers"):
            lnp.LibraryNetwork.from_state(net.state_tensors(), cfg, path)
