"""Layer specs (a module's input, its output, an activation after it) and ``layers="auto"``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors._posthoc import resolve_logits
from libnet_plugin.errors import LayerNotFoundError
from libnet_plugin.experiments.models import MnistNet, ResNet44
from libnet_plugin.probe import TorchLayerProbe, auto_layers, parse_layer_spec

TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture
def mnist():
    torch.manual_seed(0)
    return MnistNet().eval(), torch.rand(6, 1, 28, 28)


def test_specs_of_a_net_with_functional_relu_and_pooling(mnist):
    model, x = mnist
    probe = TorchLayerProbe(model, ["conv1", "conv1:relu", "conv2:input", "fc1:input", "fc2:input", "fc2:output"])
    haps = probe.run(x).haps
    with torch.no_grad():
        c1 = model.conv1(x)
        block1 = F.max_pool2d(F.relu(c1), 2)
        block2 = F.max_pool2d(F.relu(model.conv2(block1)), 2).flatten(1)
        pen = F.relu(model.fc1(block2))
    torch.testing.assert_close(haps["conv1"], c1.flatten(1), **TOL)
    torch.testing.assert_close(haps["conv1:relu"], F.relu(c1).flatten(1), **TOL)
    torch.testing.assert_close(haps["conv2:input"], block1.flatten(1), **TOL)
    torch.testing.assert_close(haps["fc1:input"], block2, **TOL)
    torch.testing.assert_close(haps["fc2:input"], pen, **TOL)
    torch.testing.assert_close(haps["fc2:output"], model.fc2(pen), **TOL)
    assert bool((haps["conv1"] < 0).any()) and bool((haps["conv1:relu"] >= 0).all())


def test_input_spec_in_a_residual_block_with_inplace_relu():
    torch.manual_seed(1)
    model = ResNet44().eval()
    x = torch.rand(3, 3, 32, 32)
    block = model.layer2[0]
    seen = {}
    handles = [block.conv2.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0].detach().clone())),
               block.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o.detach().clone()))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    probe = TorchLayerProbe(model, ["layer2.0.conv2:input", "layer2.1.conv1:input", "layer2.0"])
    haps = probe.run(x).haps
    torch.testing.assert_close(haps["layer2.0.conv2:input"], seen["mid"].flatten(1), **TOL)  # after bn1 and ReLU
    torch.testing.assert_close(haps["layer2.1.conv1:input"], seen["out"].flatten(1), **TOL)  # the block's output
    assert bool((haps["layer2.0.conv2:input"] >= 0).all())


def test_input_spec_recorded_before_a_module_that_writes_its_input_in_place():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).eval()
    x = torch.randn(5, 4)
    res = TorchLayerProbe(model, ["1:input", "1", "2:input"]).run(x)
    with torch.no_grad():
        pre = model[0](x)
    torch.testing.assert_close(res.haps["1:input"], pre, **TOL)  # before the in-place ReLU overwrote it
    assert bool((res.haps["1:input"] < 0).any())
    torch.testing.assert_close(res.haps["1"], F.relu(pre), **TOL)
    torch.testing.assert_close(res.haps["2:input"], F.relu(pre), **TOL)


def test_input_specs_of_an_exported_graph_match_the_eager_model(mnist):
    model, x = mnist
    layers = ["conv1", "conv1:relu", "conv2:input", "fc1:input", "fc2:input"]
    eager = TorchLayerProbe(model, layers).run(x)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    graph = TorchLayerProbe(exported, layers).run(x[:4])
    for l in layers:
        torch.testing.assert_close(graph.haps[l], eager.haps[l][:4], **TOL)


@pytest.mark.parametrize("spec, message", [
    ("conv1:softplus", "unknown part 'softplus'"),
    (":input", "names no module"),
    ("conv1#0:input", "after '#'"),
])
def test_bad_specs_name_the_spec_and_the_valid_forms(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_layer_spec(spec)
    assert repr(spec) in str(err.value)


def test_unknown_module_in_a_spec(mnist):
    model, _ = mnist
    with pytest.raises(LayerNotFoundError, match="'fc3' does not exist.*Did you mean"):
        TorchLayerProbe(model, ["fc3:input"])


def test_spec_of_a_module_whose_name_holds_a_colon():
    model = nn.Sequential()
    model.add_module("a:b", nn.Linear(3, 2))
    assert parse_layer_spec("a:b", {"a:b": None}).module == "a:b"
    assert TorchLayerProbe(model, ["a:b"]).run(torch.randn(2, 3)).haps["a:b"].shape == (2, 2)


def test_auto_layers_rule(mnist):
    model, x = mnist
    assert auto_layers(model, x) == ["conv2:input", "fc1:input", "fc2:input"]
    assert auto_layers(ResNet44().eval(), torch.rand(2, 3, 32, 32)) == [
        "layer1.0.conv1:input", "layer2.0.conv1:input", "layer3.0.conv1:input", "linear:input"]
    seq = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    assert auto_layers(seq, torch.rand(2, 3, 4)) == ["3:input", "5:input"]
    with pytest.raises(LayerNotFoundError, match="name the layers"):
        auto_layers(nn.Sequential(nn.Linear(3, 2)), torch.rand(2, 3))


def test_library_network_and_detector_with_auto_layers(mnist, tmp_path):
    model, _ = mnist
    torch.manual_seed(3)
    x = torch.rand(120, 1, 28, 28)
    net = lnp.LibraryNetwork(model, "auto", thresholds=0.9)
    assert net.layers == []
    net.fit(x)
    assert net.layers == ["conv2:input", "fc1:input", "fc2:input"]
    net.save(tmp_path / "net.pt")
    loaded = lnp.LibraryNetwork.load(tmp_path / "net.pt", model)
    assert loaded.layers == net.layers
    torch.testing.assert_close(loaded.run(x[:3]).haps["fc1:input"], net.run(x[:3]).haps["fc1:input"], **TOL)
    det = lnp.ConsistencyDetector(model, train=x, thresholds=0.9).calibrate(x[:60], fpr=0.1)
    assert det.net.layers == net.layers
    assert det.score(x[:5]).shape == (5,)
    with pytest.raises(ValueError, match="name the layers"):
        lnp.LibraryNetwork(model, "auto", thresholds={"fc1:input": 0.9})


def test_detectors_read_channels_and_logits_of_specs(mnist, tmp_path):
    model, _ = mnist
    torch.manual_seed(4)
    x, y = torch.rand(150, 1, 28, 28), torch.randint(0, 10, (150,))
    net = lnp.LibraryNetwork(model, ["conv2:input", "fc1:input", "fc2:input", "fc2"], thresholds=0.9).fit(x)
    maha = lnp.ConsistencyDetector(net, method="mahalanobis-multilayer", train=(x, y))
    assert maha.scorer.channels_["conv2:input"] == 20  # conv2's input channels, not its 50 outputs
    assert resolve_logits(net, "auto", "energy") == "fc2"  # never "fc2:input", fc2's input
    det = lnp.ConsistencyDetector(net, method="library-gaussian-fusion", train=(x, y),
                                  settings={"layers": ["conv2:input", "fc1:input"]}).calibrate(x[:60], fpr=0.1)
    assert det.scorer.feature_names()[-2:] == ["conv2:input/gaussian", "fc1:input/gaussian"]
    s = det.score(x[60:70])
    det.save(tmp_path / "det.pt")
    torch.testing.assert_close(lnp.ConsistencyDetector.load(tmp_path / "det.pt", model).score(x[60:70]), s, **TOL)


def test_specs_of_a_compiled_model_match_the_eager_model(mnist):
    import warnings

    model, x = mnist
    layers = ["conv1:relu", "conv2:input", "fc2:input"]
    compiled = torch.compile(model, backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        probe = TorchLayerProbe(compiled, layers)
        got = probe.run(x).haps
    assert not [str(w.message) for w in record if "could not be compiled" in str(w.message)]
    assert probe._dynamo_ctx is not None  # the probed forward ran compiled, pre-hooks included
    want = TorchLayerProbe(model, layers).run(x).haps
    for l in layers:
        torch.testing.assert_close(got[l], want[l], **TOL)


def test_exponential_tail_separates_far_from_just_past_the_clean_range(mnist, tmp_path):
    model, _ = mnist
    torch.manual_seed(5)
    x = torch.rand(200, 1, 28, 28)
    net = lnp.LibraryNetwork(model, ["conv1", "fc2:input"], thresholds=0.9).fit(x[:100])
    dets = {tail: lnp.ConsistencyDetector(net, method="library-fusion", settings={"tail": tail}).calibrate(
        x[100:], fpr=0.1) for tail in ("none", "exponential")}
    near, far = (x[:8] * 1.5).clamp(0, 1), (x[:8] * 6.0)
    plain, tailed = dets["none"], dets["exponential"]
    assert bool((tailed.score(far) > tailed.score(near)).all())
    # the conformal floor caps the plain score: both land at (about) the same value, far below the tailed one
    assert float(tailed.score(far).min()) > 2 * float(plain.score(far).max())
    inside = x[100:110]  # calibration inputs below every feature's maximum score the same with or without the tail
    feats = tailed.scorer.features(net, net.run(inside))
    below = (feats < tailed.scorer.fusion.sorted_reference[-1].to(feats.dtype)).all(dim=1)
    torch.testing.assert_close(tailed.score(inside)[below], plain.score(inside)[below], **TOL)
    assert abs(tailed.threshold_ - plain.threshold_) < 0.5 * plain.threshold_
    tailed.save(tmp_path / "t.pt")
    back = lnp.ConsistencyDetector.load(tmp_path / "t.pt", model)
    assert back.scorer.tail == "exponential"
    torch.testing.assert_close(back.score(far[:4]), tailed.score(far[:4]), **TOL)
