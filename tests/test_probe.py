"""The torch probe records each module's output as the module returned it, and runs the model in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.probe import TorchLayerProbe, eval_mode


class Block(nn.Module):
    """A ResNet basic block: conv -> bn -> ReLU(inplace) -> conv -> bn, ``out += identity``, ReLU(inplace)."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.act(out)


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = Block()
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.drop(self.block(self.stem(x)).mean(dim=(2, 3))))


@pytest.fixture
def resnet():
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():  # non-trivial batch-norm statistics, so bn outputs are clearly signed
        for bn in (model.block.bn1, model.block.bn2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _true_outputs(model, x, names):
    """Each module's output cloned at the moment it returned (what the probe must record)."""
    modules = dict(model.named_modules())
    seen = {}
    handles = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().clone()))
               for n in names]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return {n: seen[n].flatten(1) for n in names}


def _count_forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, i: calls.append(1))
    return calls


def test_in_place_writes_after_a_layer_do_not_change_its_hap(resnet):
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    layers = ["block.bn1", "block.bn2", "block.conv2", "block"]
    want = _true_outputs(resnet, x, layers)
    assert float(want["block.bn1"].min()) < 0  # the ReLU(inplace) after bn1 would clip these
    probe = TorchLayerProbe(resnet, layers)
    calls = _count_forwards(resnet)
    got = probe.run(x).haps
    for name in layers:
        assert torch.equal(got[name], want[name]), name
    assert probe.copied_layers == {"block.bn1", "block.bn2"}  # overwritten by the ReLU / the residual add
    assert len(calls) == 2  # the first batch ran again with copies for those two layers
    again = probe.run(x).haps
    assert len(calls) == 3  # from then on, one forward pass per batch
    assert all(torch.equal(again[n], want[n]) for n in layers)


def test_layers_not_written_in_place_are_not_copied(resnet):
    probe = TorchLayerProbe(resnet, ["block.conv2", "head"])
    calls = _count_forwards(resnet)
    probe.run(torch.randn(3, 1, 8, 8))
    assert probe.copied_layers == set() and len(calls) == 1


def test_network_predictions_use_the_true_activations(resnet):
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    net = lnp.LibraryNetwork(resnet, ["block.bn1", "head"], thresholds=0.8).fit(x)
    nodes = net.libraries_["block.bn1"].nodes
    assert float(nodes.min()) < 0  # a post-ReLU recording would hold no negative value


def test_the_model_runs_in_eval_mode_and_keeps_its_mode(resnet):
    resnet.train()
    buffers = {k: v.clone() for k, v in resnet.state_dict().items()}
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    net = lnp.LibraryNetwork(resnet, ["block", "head"], thresholds=0.9).fit(x)
    a, b = net.predict_scores(x[:8]), net.predict_scores(x[:8])
    assert all(torch.equal(a[l], b[l]) for l in a)  # no dropout noise
    assert all(torch.equal(v, resnet.state_dict()[k]) for k, v in buffers.items())  # batch-norm untouched
    assert resnet.training and resnet.drop.training and resnet.block.bn1.training  # the caller's mode is back
    resnet.eval()
    assert all(torch.equal(a[l], net.predict_scores(x[:8])[l]) for l in a)  # the same as in eval mode


def test_eval_mode_restores_mixed_modes_also_when_the_model_raises():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    model[0].eval()
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        assert not model.training and not model[1].training
        raise RuntimeError("boom")
    assert model.training and not model[0].training and model[1].training


def test_a_detector_on_a_model_in_training_mode_says_to_call_eval(resnet):
    x = torch.randn(60, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    det = lnp.ConsistencyDetector(resnet, layers=["block", "head"], thresholds=0.9, train=x).calibrate(x[:40])
    resnet.train()
    with torch.no_grad():
        resnet(x)  # the user's own forward pass in training mode moves the batch-norm statistics
    from libnet_plugin.consistency_detector import ModelChangedError

    with pytest.raises(ModelChangedError, match=r"training mode.*model\.eval\(\)"):
        det.score(x[:4])


def test_captum_attribute_equals_predict_scores_on_in_place_layers(resnet):
    pytest.importorskip("captum")
    from libnet_captum import LibraryAttribution

    x = torch.randn(48, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    attr = LibraryAttribution(resnet, ["block.bn1", "block.bn2"]).fit(x, thresholds=0.8)
    got = attr.attribute(x[:6])
    want = attr.library_network.predict_scores(x[:6])
    assert torch.equal(got[0], want["block.bn1"]) and torch.equal(got[1], want["block.bn2"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_a_model_in_another_float_dtype_gets_float32_inputs_cast(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(120, 6)
    ref = lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.9).fit(x)
    low = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    low.load_state_dict(model.state_dict())
    low = low.to(dtype)
    net = lnp.LibraryNetwork(low, ["0", "2"], thresholds=0.9).fit(x)  # float32 inputs
    scores = net.predict_scores(x[:10])
    assert all(s.dtype == torch.float32 for s in scores.values())
    agree = (net.predict(x)["2"] == ref.predict(x)["2"]).float().mean()
    assert agree > 0.9, float(agree)


def test_an_overflowing_row_of_a_half_precision_model_is_flagged_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    with torch.no_grad():
        model[0].weight.abs_().mul_(4.0)  # positive weights: a large input row overflows float16 (max 65504)
    model = model.half()
    x = torch.randn(200, 4)
    det = lnp.ConsistencyDetector(model, layers=["0", "2"], thresholds=0.9, train=x,
                                  method="msp").calibrate(torch.randn(60, 4), fpr=0.1)
    batch = torch.randn(5, 4)
    batch[2] = 6e4  # finite in float32 and float16, but the first layer's outputs overflow float16
    scores = det.score(batch)
    assert torch.isinf(scores[2]) and bool(det.predict(batch)[2])
    assert torch.isfinite(scores[[0, 1, 3, 4]]).all()
    assert torch.equal(scores[[0, 1, 3, 4]], det.score(batch[[0, 1, 3, 4]]))
    out = det.guard()(batch)
    assert torch.isnan(out.output[2]).all() and torch.isfinite(out.output[[0, 1, 3, 4]]).all()
    strict = lnp.ConsistencyDetector(det.net, method="msp", on_nonfinite="raise").calibrate(torch.randn(60, 4))
    with pytest.raises(lnp.NonFiniteError):
        strict.score(batch)


def test_empty_batches_give_empty_results(resnet):
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    net = lnp.LibraryNetwork(resnet, ["block", "head"], thresholds=0.9).fit(x)
    empty = x[:0]
    assert {l: tuple(s.shape) for l, s in net.predict_scores(empty).items()} == {"block": (0, 3), "head": (0, 3)}
    assert net.consistency(empty).shape == (0,)
    det = lnp.ConsistencyDetector(net).calibrate(x[:30])
    assert det.score(empty).shape == (0,) and det.predict(empty).shape == (0,)


def test_module_outputs_that_are_mappings_and_model_outputs_with_logits():
    class Encoder(nn.Module):  # returns a dict like a HuggingFace BaseModelOutput: the hidden states first
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 7)

        def forward(self, x):
            h = self.lin(x)
            return {"last_hidden_state": h, "pooler_output": h.mean(dim=1, keepdim=True)}

    class Classifier(nn.Module):  # returns {"loss": ..., "logits": ...} like a SequenceClassifierOutput
        def __init__(self):
            super().__init__()
            self.encoder, self.head = Encoder(), nn.Linear(7, 3)

        def forward(self, x):
            logits = self.head(self.encoder(x)["last_hidden_state"])
            return {"loss": logits.sum() * 0, "logits": logits}

    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(50, 5)
    r = TorchLayerProbe(model, ["encoder", "head"]).run(x)
    assert torch.equal(r.outputs, model(x)["logits"])
    assert torch.equal(r.haps["encoder"], model.encoder(x)["last_hidden_state"])
    net = lnp.LibraryNetwork(model, ["encoder", "head"], thresholds=0.9).fit(x)
    assert net.n_classes_ == 3
