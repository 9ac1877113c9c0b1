"""The torch probe records each module's output as the module returned it, and runs the model in eval mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin import MultiInput
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
    det = lnp.ConsistencyDetector.from_model(resnet, x, layers=["block", "head"], thresholds=0.9).calibrate(x[:40])
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
    det = lnp.ConsistencyDetector.from_model(model, x, layers=["0", "2"], thresholds=0.9,
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


# ---------------------------------------------------------------------------------------------------------------
# one row per input: sequence-first modules, PackedSequence, NestedTensor, and layers that are not batch-first
# ---------------------------------------------------------------------------------------------------------------


class RecurrentClassifier(nn.Module):
    """An LSTM read at its last step; sequence-first (PyTorch's default) or batch-first, inputs [B, T, F] either way."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.lstm, self.head = nn.LSTM(4, 6, batch_first=batch_first), nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.lstm(x if self.batch_first else x.transpose(0, 1))
        return self.head(out[:, -1] if self.batch_first else out[-1])


def test_a_sequence_first_lstm_gives_one_row_per_input_also_when_batch_size_equals_sequence_length():
    torch.manual_seed(0)
    seq_first = RecurrentClassifier(batch_first=False).eval()
    batch_first = RecurrentClassifier(batch_first=True).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    x = torch.randn(5, 5, 4, generator=torch.Generator().manual_seed(1))  # batch size 5 == sequence length 5
    got = TorchLayerProbe(seq_first, ["lstm", "head"]).run(x).haps["lstm"]
    want = TorchLayerProbe(batch_first, ["lstm", "head"]).run(x).haps["lstm"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # row i is input i's whole sequence, not time step i of every input
        alone = seq_first.lstm(x[2:3].transpose(0, 1))[0].transpose(0, 1).flatten(1)
    torch.testing.assert_close(got[2:3], alone, rtol=1e-5, atol=1e-6)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder over inputs [B, T, E], mean-pooled; sequence-first or batch-first inside."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x, mask=None):
        h = self.enc(x if self.batch_first else x.transpose(0, 1), src_key_padding_mask=mask)
        return self.head((h if self.batch_first else h.transpose(0, 1)).mean(dim=1))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
def test_a_sequence_first_transformer_encoder_and_its_submodules_read_batch_first():
    torch.manual_seed(0)
    seq_first = EncoderClassifier(batch_first=False).eval()
    batch_first = EncoderClassifier(batch_first=True).eval()
    batch_first.load_state_dict(seq_first.state_dict())
    x = torch.randn(6, 6, 8, generator=torch.Generator().manual_seed(2))  # batch size == sequence length
    layers = ["enc", "enc.layers.0", "enc.layers.0.linear1", "enc.layers.1.self_attn"]
    got, want = TorchLayerProbe(seq_first, layers).run(x), TorchLayerProbe(batch_first, layers).run(x)
    for name in layers:
        torch.testing.assert_close(got.haps[name], want.haps[name], rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_nested_tensors_of_the_encoder_fast_path_are_padded_to_the_input_length():
    torch.manual_seed(0)
    model = EncoderClassifier(batch_first=True).eval()
    x = torch.randn(4, 6, 8, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, 4:] = True  # every sequence padded at its last two steps: the nested tensors are 4 steps long
    mask[0, 2:] = True
    layers = ["enc.layers.0", "enc.layers.1.linear1", "enc"]
    r = TorchLayerProbe(model, layers).run(MultiInput((x, mask)))
    with torch.no_grad():
        torch.testing.assert_close(r.outputs, model(x, mask), rtol=0, atol=0)  # the model ran its own fast path
    assert {n: tuple(h.shape) for n, h in r.haps.items()} == {
        "enc.layers.0": (4, 48), "enc.layers.1.linear1": (4, 96), "enc": (4, 48)}
    steps = r.haps["enc.layers.0"].view(4, 6, 8)
    assert not bool(steps[:, 4:].any()) and not bool(steps[0, 2:].any())  # zero where padded, as the encoder's output
    assert bool(steps[1, :4].abs().sum(dim=1).gt(0).all())
    slow = TorchLayerProbe(model, layers).run(MultiInput((x, mask)), grad=True)  # under grad: no fast path
    for name in layers:  # the same HAPs: zero where the mask pads, whichever path the encoder took
        torch.testing.assert_close(slow.haps[name].detach(), r.haps[name], rtol=1e-5, atol=1e-5, msg=name)


def test_a_packed_sequence_is_unpacked_batch_first():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm, self.head = nn.LSTM(4, 6, batch_first=True), nn.Linear(6, 3)

        def forward(self, x, lengths):
            _, (h, _) = self.lstm(pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False))
            return self.head(h[-1])

    torch.manual_seed(0)
    model = Packed().eval()
    x, lengths = torch.randn(4, 5, 4, generator=torch.Generator().manual_seed(4)), torch.tensor([5, 3, 5, 2])
    hap = TorchLayerProbe(model, ["lstm"]).run(MultiInput((x, lengths))).haps["lstm"].view(4, 5, 6)
    with torch.no_grad():
        alone = model.lstm(x[1:2, :3])[0][0]  # input 1 alone, its 3 steps
    torch.testing.assert_close(hap[1, :3], alone, rtol=1e-5, atol=1e-6)
    assert not bool(hap[1, 3:].any()) and not bool(hap[3, 2:].any())


class TimeMajor(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.proj(x.transpose(0, 1)).mean(dim=0))  # proj sees [T, B, F]: no flag to read


def test_a_layer_whose_output_is_not_batch_first_is_refused_with_its_shape_and_the_fix():
    x = torch.randn(3, 5, 4)
    with pytest.raises(lnp.ShapeMismatchError, match=r"layer 'proj' returned an output of shape \[5, 3, 6\] for a "
                                                     r"batch of 3 inputs.*batch_first=True.*batch_dims=\{layer: dim\}"):
        TorchLayerProbe(TimeMajor(), ["proj"]).run(x)


def test_batch_dims_names_where_a_layer_keeps_the_batch_and_is_saved(tmp_path):
    torch.manual_seed(0)
    model = TimeMajor().eval()
    x = torch.randn(80, 5, 4, generator=torch.Generator().manual_seed(10))
    det = lnp.ConsistencyDetector.from_model(model, x[:60], ["proj", "head"], thresholds=0.9, method="library-distance",
                                             network_options={"batch_dims": {"proj": 1}}).calibrate(x[60:])
    hap = det.net.run(x[:5]).haps["proj"]
    with torch.no_grad():
        torch.testing.assert_close(hap[2], model.proj(x[2]).flatten(), rtol=0, atol=0)  # row 2 is input 2
    det.save(tmp_path / "det.lnp")
    back = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", model)
    assert back.net.probe.batch_dims == {"proj": 1}
    assert torch.equal(back.score(x[60:]), det.score(x[60:]))
    with pytest.raises(ValueError, match=r"batch_dims names the layer 'head2', which is not probed"):
        lnp.LibraryNetwork(model, ["proj"], batch_dims={"head2": 1})


def test_model_outputs_that_are_not_class_scores_are_refused():
    model = nn.Conv1d(4, 3, 1)  # [B, 3, T]: not one score per class
    with pytest.raises(ValueError, match=r"returned a Tensor of shape \[2, 3, 7\], not class scores.*Wrap the model"):
        TorchLayerProbe(nn.Sequential(model), ["0"]).run(torch.randn(2, 4, 7))
    squeezed = nn.Sequential(nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(1))  # [B, 3, 1, 1] is [B, 3]
    assert tuple(TorchLayerProbe(squeezed, ["0"]).run(torch.randn(2, 2, 4, 4)).outputs.shape) == (2, 3)


# ---------------------------------------------------------------------------------------------------------------
# inputs and layers read silently wrong
# ---------------------------------------------------------------------------------------------------------------


class MaskedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x, mask=None):
        return self.head(torch.relu(self.enc(x if mask is None else x * mask)))


def test_a_dict_with_an_input_key_and_other_tensors_passes_them_all_by_keyword():
    from libnet_plugin import as_inputs

    torch.manual_seed(0)
    model = MaskedNet().eval()
    x = torch.randn(5, 6)
    mask = (torch.arange(6) < 3).float().expand(5, 6)
    batch = as_inputs({"x": x, "mask": mask, "labels": torch.zeros(5, dtype=torch.long)})
    assert isinstance(batch, MultiInput) and set(batch.parts) == {"x", "mask"}
    r = TorchLayerProbe(model, ["enc"]).run(batch)
    with torch.no_grad():
        torch.testing.assert_close(r.outputs, model(x, mask), rtol=0, atol=0)
        assert not torch.allclose(r.outputs, model(x))  # the mask was not dropped
    assert isinstance(as_inputs({"x": x, "labels": torch.zeros(5, dtype=torch.long)}), torch.Tensor)
    with pytest.raises(TypeError, match=r"passed to MaskedNet.forward by keyword, but it takes no \['weights'\]"):
        TorchLayerProbe(model, ["enc"]).run(as_inputs({"x": x, "weights": mask}))


def test_a_constant_layer_and_layers_carrying_one_tensor_are_warned_about():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 6), nn.Identity(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # a dead ReLU: layer '1' is all zero
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(5))
    with pytest.warns(UserWarning) as record:
        lnp.LibraryNetwork(model, ["1", "4"], thresholds="auto").fit(x)
    messages = [str(w.message) for w in record]
    assert any("layer '1' is constant: its activations are all zero" in m for m in messages), messages
    assert not any("use thresholds='auto'" in m for m in messages), messages
    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3), nn.Identity()).eval()
    with pytest.warns(UserWarning, match=r"carry the very same activations.*CPL is vacuous"):
        lnp.LibraryNetwork(live, ["2", "3"], thresholds=0.9).fit(x)


# ---------------------------------------------------------------------------------------------------------------
# deployed forms: TorchScript (refused), torch.export, torch.compile
# ---------------------------------------------------------------------------------------------------------------


def test_torchscript_and_exported_programs_are_refused_with_the_forms_that_work(resnet):
    x = torch.randn(2, 1, 8, 8)
    for scripted in (torch.jit.trace(resnet, x), torch.jit.script(nn.Sequential(nn.Linear(2, 2)))):
        with pytest.raises(TypeError, match=r"TorchScript.*eager nn.Module.*torch.export.*ONNX"):
            lnp.LibraryNetwork(scripted, ["0"])
    ep = torch.export.export(resnet, (x,))
    with pytest.raises(TypeError, match=r"ep\.module\(\)"):
        lnp.LibraryNetwork(ep, ["stem"])
    with pytest.raises(lnp.ShapeMismatchError, match=r"exported for batches of exactly 2 inputs.*dynamic_shapes"):
        TorchLayerProbe(ep.module(), ["stem"]).run(torch.randn(3, 1, 8, 8))


def test_an_exported_module_is_probed_through_its_graph_with_the_eager_names(resnet, tmp_path):
    x = torch.randn(40, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    batch = torch.export.Dim("batch")
    exported = torch.export.export(resnet, (x[:4],), dynamic_shapes=({0: batch},)).module()
    layers = ["stem", "block.bn1", "block.bn2", "block", "head"]  # bn1 and bn2 are overwritten in place later
    got, want = TorchLayerProbe(exported, layers).run(x), TorchLayerProbe(resnet, layers).run(x)
    for name in layers:
        torch.testing.assert_close(got.haps[name], want.haps[name], rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-5, atol=1e-5)
    with pytest.raises(lnp.LayerNotFoundError, match=r"'block.bn3' does not exist in the exported graph.*block.bn1"):
        TorchLayerProbe(exported, ["block.bn3"])
    det = lnp.ConsistencyDetector.from_model(resnet, x, ["block.bn1", "block", "head"], thresholds=0.9,
                                             method="library-distance").calibrate(x[:20])
    det.save(tmp_path / "det.lnp")
    back = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", exported)  # fitted on the eager model
    torch.testing.assert_close(back.score(x[20:]), det.score(x[20:]), rtol=1e-5, atol=1e-5)
    out = back.guard()(x[:5])
    torch.testing.assert_close(out.output, want.outputs[:5], rtol=1e-5, atol=1e-5)


def test_the_guard_on_a_compiled_model_gives_the_eager_output_whatever_it_served_before(resnet):
    import warnings

    x = torch.randn(50, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    compiled = torch.compile(resnet, backend="eager")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        det = lnp.ConsistencyDetector.from_model(compiled, x[:30], ["_orig_mod.block.bn2", "head"], thresholds=0.9,
                                                 method="library-distance").calibrate(x[30:])
        with torch.no_grad():
            served = compiled(x[:4])  # a plain request first: Dynamo caches a graph for this shape, without hooks
        out = det.guard()(x[:4])
        again = det.guard()(x[:4])
    assert not [str(w.message) for w in record if "get_ident" in str(w.message) or "dynamo" in str(w.message).lower()
                or "could not be compiled" in str(w.message)]
    assert det.net.probe._dynamo_ctx is not None  # the probed forward ran compiled, not the eager fallback
    eager = lnp.ConsistencyDetector.from_model(resnet, x[:30], ["block.bn2", "head"], thresholds=0.9,
                                               method="library-distance").calibrate(x[30:])
    with torch.no_grad():
        want = resnet(x[:4])
    torch.testing.assert_close(served, want, rtol=1e-5, atol=1e-5)
    for o in (out, again):
        torch.testing.assert_close(o.output, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(o.score, eager.score(x[:4]), rtol=1e-5, atol=1e-5)
    bare = TorchLayerProbe(compiled, ["block.bn2"]).run(x[:4]).haps["block.bn2"]  # the name without the prefix
    torch.testing.assert_close(bare, TorchLayerProbe(resnet, ["block.bn2"]).run(x[:4]).haps["block.bn2"])


def test_inputs_of_different_lengths_say_what_to_do():
    text, offsets = torch.randint(0, 20, (17,)), torch.tensor([0, 5, 11])  # the EmbeddingBag tutorial's batch
    with pytest.raises(ValueError, match=r"got \[17, 3\].*nn.EmbeddingBag.*ids \[B, T\]"):
        MultiInput((text, offsets))


def test_sequences_padded_per_batch_get_the_padding_fix():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(30, 4), nn.Linear(4, 3)

        def forward(self, input_ids):
            return self.head(self.emb(input_ids).mean(dim=1))

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (40, 6), generator=torch.Generator().manual_seed(9))
    net = lnp.LibraryNetwork(Tokens().eval(), ["emb", "head"], thresholds=0.9).fit({"input_ids": ids})
    longer = {"input_ids": torch.randint(0, 30, (4, 8))}  # a batch padded to its own longest sequence
    with pytest.raises(lnp.ShapeMismatchError, match=r"layer 'emb': activations have 32 features.*padding='max_length'"):
        net.predict_scores(longer)
