"""The whole pipeline on models the project did not write: built from configs with random weights, nothing downloaded.

Each model of the zoo goes through fit, evaluate, consistency, ConsistencyDetector calibrate / score / guard
and save / load; the model's mode and buffers are left as they were. HuggingFace models are used when
``transformers`` is installed (the ``hf`` extra), and skipped otherwise. Captum and ONNX parity are checked
on the ResNet with in-place layers, where recording a view would have given other numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin import MultiInput


@dataclass
class Case:
    model: nn.Module
    layers: list[str]
    train: Any  # what fit takes
    test: Any  # what evaluate / consistency / score take
    batch: Any  # one batch, as the model's caller passes it to the guard
    call: Callable[[nn.Module, Any], torch.Tensor]  # the model's logits on `batch`
    n_train: int


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class BasicBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


class ResNetLike(nn.Module):
    """timm/torchvision-style: stem, in-place ReLUs, residual adds, global pooling, dropout, linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(True)
        self.layer1 = nn.Sequential(BasicBlock(8), BasicBlock(8))
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.layer1(self.act1(self.bn1(self.conv1(x))))
        return self.fc(self.drop(x.mean(dim=(2, 3))))


class MaskedMLP(nn.Module):
    """forward(x, mask): a second positional input."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x, mask):
        return self.head(torch.relu(self.enc(x * mask)))


class KeywordModel(nn.Module):
    """forward(*, features, scale): keyword-only inputs, an output object with logits."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(5, 12), nn.Linear(12, 3)

    def forward(self, *, features, scale):
        return {"logits": self.head(torch.tanh(self.enc(features) * scale)), "hidden": None}


def _bn_stats(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3, generator=_gen(7))
                m.running_var.uniform_(0.5, 1.5, generator=_gen(8))


def resnet_case() -> Case:
    torch.manual_seed(0)
    model = ResNetLike()
    _bn_stats(model)
    x = torch.randn(160, 3, 8, 8, generator=_gen(1))
    return Case(model.eval(), ["bn1", "layer1.0.bn2", "layer1.1", "fc"], x[:120], x[120:], x[:5],
                lambda m, b: m(b), 120)


def masked_case() -> Case:
    torch.manual_seed(0)
    x = torch.randn(150, 6, generator=_gen(2))
    mask = (torch.rand(150, 6, generator=_gen(3)) > 0.2).float()
    y = torch.randint(0, 3, (150,), generator=_gen(4))
    return Case(MaskedMLP().eval(), ["enc", "head"], ((x[:100], mask[:100]), y[:100]), (x[100:], mask[100:]),
                (x[:4], mask[:4]), lambda m, b: m(*b), 100)


def keyword_case() -> Case:
    torch.manual_seed(0)
    f = torch.randn(150, 5, generator=_gen(5))
    s = torch.rand(150, 1, generator=_gen(6)) + 0.5
    return Case(KeywordModel().eval(), ["enc", "head"], {"features": f[:100], "scale": s[:100]},
                {"features": f[100:], "scale": s[100:]}, {"features": f[:4], "scale": s[:4]},
                lambda m, b: m(**b)["logits"], 100)


def half_case(dtype: torch.dtype) -> Callable[[], Case]:
    def build() -> Case:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 24), nn.GELU(), nn.LayerNorm(24), nn.Linear(24, 3)).eval().to(dtype)
        x = torch.randn(150, 6, generator=_gen(9))  # float32 inputs: the probe casts them
        return Case(model, ["0", "2", "3"], x[:100], x[100:], x[:4], lambda m, b: m(b.to(dtype)).float(), 100)
    return build


def _tokens(n: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    ids = torch.randint(1, 60, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    mask[: n // 3, length - 3:] = 0  # some padded sequences (fixed length: the HAPs keep one width)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (n,), generator=g)}


def bert_case() -> Case:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    train, test = _tokens(90, 8, 10), _tokens(40, 8, 11)
    batch = {k: v[:4] for k, v in test.items() if k != "labels"}
    return Case(model, ["bert.encoder.layer.0", "bert.pooler", "classifier"], train, test, batch,
                lambda m, b: m(**b).logits, 90)


def vit_case() -> Case:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    model = transformers.ViTForImageClassification(cfg).eval()
    px = torch.randn(120, 3, 16, 16, generator=_gen(12))
    return Case(model, ["vit.layers.0", "vit.layernorm", "classifier"], {"pixel_values": px[:80]},
                {"pixel_values": px[80:]}, px[:4], lambda m, b: m(pixel_values=b).logits, 80)


def albert_case() -> Case:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(vocab_size=60, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                    num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                    num_labels=3)
    model = transformers.AlbertForSequenceClassification(cfg).eval()
    shared = "albert.encoder.albert_layer_groups.0.albert_layers.0"  # one module, run once per hidden layer
    train, test = _tokens(90, 8, 13), _tokens(40, 8, 14)
    batch = {k: v[:4] for k, v in test.items() if k != "labels"}
    return Case(model, [f"{shared}#1", f"{shared}#3", "classifier"], train, test, batch,
                lambda m, b: m(**b).logits, 90)


ZOO: dict[str, Callable[[], Case]] = {
    "resnet (in-place ReLU, residual add, batch-norm, dropout)": resnet_case,
    "forward(x, mask)": masked_case,
    "forward(*, features, scale) -> {'logits': ...}": keyword_case,
    "float16 model": half_case(torch.float16),
    "bfloat16 model": half_case(torch.bfloat16),
    "HuggingFace BERT": bert_case,
    "HuggingFace ViT": vit_case,
    "HuggingFace ALBERT (shared layer, name#k)": albert_case,
}


class SeqFirstLSTM(nn.Module):
    """nn.LSTM with PyTorch's default batch_first=False, inputs [B, T, F] transposed inside."""

    def __init__(self):
        super().__init__()
        self.lstm, self.head = nn.LSTM(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(x.transpose(0, 1))
        return self.head(out[-1])


class SeqFirstEncoder(nn.Module):
    """nn.TransformerEncoder with batch_first=False (PyTorch's default), inputs [B, T, E]."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=False)
        self.enc, self.head = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).mean(dim=0))


class MaskedEncoder(nn.Module):
    """nn.TransformerEncoder, batch-first, with a padding mask: in eval mode its fast path hands NestedTensors on."""

    def __init__(self):
        super().__init__()
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.enc, self.head = nn.TransformerEncoder(layer, 2), nn.Linear(8, 3)

    def forward(self, x, mask=None):
        h = self.enc(x, src_key_padding_mask=mask)
        keep = (~mask).unsqueeze(-1).float() if mask is not None else torch.ones_like(h[..., :1])
        return self.head((h * keep).sum(dim=1) / keep.sum(dim=1))


class OptionalMask(nn.Module):
    """forward(x, mask=None), fed dicts {"x": ..., "mask": ...}: the mask is passed, not dropped."""

    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, x, mask=None):
        return self.head(torch.relu(self.enc(x if mask is None else x * mask)))


def seq_lstm_case() -> Case:
    torch.manual_seed(0)
    x = torch.randn(120, 4, 4, generator=_gen(20))  # guard batch of 4 inputs of 4 steps: batch == sequence length
    return Case(SeqFirstLSTM().eval(), ["lstm", "head"], x[:80], x[80:], x[:4], lambda m, b: m(b), 80)


def seq_encoder_case() -> Case:
    torch.manual_seed(0)
    x = torch.randn(120, 5, 8, generator=_gen(21))
    return Case(SeqFirstEncoder().eval(), ["enc.layers.0", "enc.layers.1.linear1", "enc"], x[:80], x[80:], x[:5],
                lambda m, b: m(b), 80)


def masked_encoder_case() -> Case:
    torch.manual_seed(0)
    x = torch.randn(120, 6, 8, generator=_gen(22))
    mask = torch.zeros(120, 6, dtype=torch.bool)
    mask[::2, 4:] = True  # half the inputs padded at their last two steps
    mask[:, 5] = True  # and every input at its last step: the nested tensors are shorter than the input
    return Case(MaskedEncoder().eval(), ["enc.layers.0", "enc.layers.1.linear2", "enc"], ((x[:80], mask[:80]),),
                (x[80:], mask[80:]), (x[:4], mask[:4]), lambda m, b: m(*b), 80)


def optional_mask_case() -> Case:
    torch.manual_seed(0)
    x = torch.randn(150, 6, generator=_gen(23))
    mask = (torch.rand(150, 6, generator=_gen(24)) > 0.3).float()
    y = torch.randint(0, 3, (150,), generator=_gen(25))
    return Case(OptionalMask().eval(), ["enc", "head"], {"x": x[:100], "mask": mask[:100], "labels": y[:100]},
                {"x": x[100:], "mask": mask[100:]}, {"x": x[:4], "mask": mask[:4]}, lambda m, b: m(**b), 100)


ZOO.update({
    "nn.LSTM sequence-first (batch size == sequence length)": seq_lstm_case,
    "nn.TransformerEncoder sequence-first": seq_encoder_case,
    "nn.TransformerEncoder with a padding mask (eval fast path, NestedTensor)": masked_encoder_case,
    "forward(x, mask=None) fed {'x': ..., 'mask': ...}": optional_mask_case,
})


@pytest.mark.parametrize("name", list(ZOO))
def test_the_whole_pipeline(name, tmp_path):
    case = ZOO[name]()
    model = case.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()  # the user left it in training mode: the library runs it in eval mode and restores that
    net = lnp.LibraryNetwork(model, case.layers, thresholds=0.9).fit(case.train)
    assert net.n_train_ == case.n_train
    assert all(1 <= n <= case.n_train for n in net.library_sizes_.values())
    report = net.evaluate(case.test)
    assert set(report) == set(case.layers)
    assert all(0.0 <= r["top1_agreement"] <= 1.0 for r in report.values())
    cpl = net.consistency(case.test)
    assert cpl.dtype == torch.float32 or cpl.dtype == torch.float64
    assert bool(torch.isfinite(cpl).all())

    det = lnp.ConsistencyDetector(net, method="library-distance").calibrate(case.test, fpr=0.1)
    scores = det.score(case.test)
    assert scores.shape[0] == cpl.shape[0] and bool(torch.isfinite(scores).all())
    guarded = det.guard()
    out = guarded(*case.batch) if isinstance(case.batch, tuple) else (
        guarded(**case.batch) if isinstance(case.batch, dict) else guarded(case.batch))
    model.eval()
    with torch.no_grad():
        logits = case.call(model, case.batch).float()
    model.train()
    torch.testing.assert_close(out.output.float(), logits, rtol=1e-3, atol=1e-3)
    assert out.flagged.shape == (logits.shape[0],)

    det.save(tmp_path / "det.lnp")
    back = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", model)
    assert torch.equal(back.score(case.test), scores)
    assert model.training  # the caller's mode is back
    for k, v in model.state_dict().items():  # batch-norm statistics and weights untouched
        assert torch.equal(v, state[k]), k


def test_captum_attribution_equals_predict_scores_on_in_place_layers():
    pytest.importorskip("captum")
    from libnet_captum import LibraryAttribution

    case = resnet_case()
    attr = LibraryAttribution(case.model, ["bn1", "layer1.0.bn2"]).fit(case.train, thresholds=0.9)
    got = attr.attribute(case.test[:8])
    want = attr.library_network.predict_scores(case.test[:8])
    assert torch.equal(got[0], want["bn1"]) and torch.equal(got[1], want["layer1.0.bn2"])


def test_onnx_export_matches_the_torch_probe_on_in_place_layers(tmp_path):
    pytest.importorskip("onnxruntime")
    from libnet_onnx import OnnxLayerProbe, export_onnx

    case = resnet_case()
    layers = ["bn1", "layer1.0.bn2", "fc"]
    path = export_onnx(case.model, case.test[:2], tmp_path / "resnet.onnx", dynamo=False)
    torch_probe = lnp.TorchLayerProbe(case.model, layers).run(case.test)
    onnx_probe = OnnxLayerProbe(path, layers).run(case.test)
    for layer in layers:
        diff = float((onnx_probe.haps[layer] - torch_probe.haps[layer]).abs().max())
        assert diff <= 1e-5, f"{layer}: max |ONNX - torch| = {diff:.2e}"
    a = lnp.LibraryNetwork(case.model, layers, thresholds=0.9).fit(case.train)
    b = lnp.LibraryNetwork(str(path), layers, thresholds=0.9).fit(case.train)
    assert a.library_sizes_ == b.library_sizes_
    assert float((a.consistency(case.test) - b.consistency(case.test)).abs().max()) <= 1e-5


def test_empty_batches_on_the_onnx_and_captum_paths(tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("captum")
    from libnet_captum import LibraryAttribution
    from libnet_onnx import export_onnx

    case = resnet_case()
    empty = case.test[:0]
    path = export_onnx(case.model, case.test[:2], tmp_path / "resnet.onnx", dynamo=False)
    onnx_net = lnp.LibraryNetwork(str(path), ["bn1", "fc"], thresholds=0.9).fit(case.train)
    assert {l: tuple(s.shape) for l, s in onnx_net.predict_scores(empty).items()} == {"bn1": (0, 4), "fc": (0, 4)}
    attr = LibraryAttribution(case.model, ["bn1", "fc"]).fit(case.train, thresholds=0.9)
    assert [tuple(t.shape) for t in attr.attribute(empty)] == [(0, 4), (0, 4)]


def _sklearn_mlp():
    np = pytest.importorskip("numpy")
    pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: a short training is enough here
        clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=200, random_state=0).fit(x, y)
    return clf, torch.from_numpy(x)


def test_an_sklearn_mlp_through_skl2onnx():
    from skl2onnx import to_onnx

    from libnet_onnx import OnnxModel
    from libnet_onnx.errors import OnnxModelError

    clf, x = _sklearn_mlp()
    plain = to_onnx(clf, x[:1].numpy(), options={"zipmap": False})  # outputs: label (int64 [B]), probabilities
    model = OnnxModel(plain)
    assert model.output == "probabilities"  # the first floating [B, C] output, not the int64 labels
    net = lnp.LibraryNetwork(model, ["next_activations", "out_activations_result"], thresholds=0.9).fit(x[:160])
    expected = torch.from_numpy(clf.predict_proba(x[160:].numpy())).float()
    torch.testing.assert_close(net.run(x[160:]).outputs, expected, rtol=1e-5, atol=1e-5)
    assert net.consistency(x[160:]).shape == (80,)
    det = lnp.ConsistencyDetector(net, method="library-distance").calibrate(x[160:])
    assert det.predict(x[:8]).shape == (8,)
    zipmap = to_onnx(clf, x[:1].numpy())  # the default export: probabilities as a ZipMap (one dict per input)
    with pytest.raises(OnnxModelError, match=r"'output_probability' is a sequence_type \(a ZipMap.*zipmap': False"):
        OnnxModel(zipmap)(x[:4])
    pre = OnnxModel(zipmap, output="out_activations_result")  # or name the tensor before the ZipMap
    torch.testing.assert_close(pre(x[160:]), expected, rtol=1e-5, atol=1e-5)


def test_the_onnx_output_choice_is_saved_with_the_network(tmp_path):
    import onnx
    from skl2onnx import to_onnx

    from libnet_onnx import OnnxModel

    clf, x = _sklearn_mlp()
    path = tmp_path / "zipmap.onnx"
    onnx.save(to_onnx(clf, x[:1].numpy()), str(path))  # a ZipMap: the scores must be named by hand once
    net = lnp.LibraryNetwork(OnnxModel(str(path), output="out_activations_result"), ["next_activations"],
                             thresholds=0.9).fit(x[:160])
    net.save(tmp_path / "net.lnp")
    back = lnp.LibraryNetwork.load(tmp_path / "net.lnp", str(path))  # the plain path: the choice comes back
    assert back.probe.model.output == "out_activations_result"
    assert torch.equal(back.predict_scores(x[160:])["next_activations"], net.predict_scores(x[160:])["next_activations"])
    with pytest.raises(ValueError, match="saved reading its class scores from 'out_activations_result'"):
        lnp.LibraryNetwork.load(tmp_path / "net.lnp", OnnxModel(str(path), output="add_result1"))


def _deployed(form: str, model: nn.Module, example: torch.Tensor) -> nn.Module:
    if form == "torch.compile":
        return torch.compile(model, backend="eager")
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()


@pytest.mark.parametrize("form", ["torch.compile", "torch.export"])
def test_a_detector_fitted_on_the_eager_model_serves_its_deployed_form(form, tmp_path):
    """The serving order: the deployed model answers plain requests first, then the guard; eager results within 1e-5."""
    case = resnet_case()
    det = lnp.ConsistencyDetector.from_model(case.model, case.train, ["bn1", "layer1.0.bn2", "fc"], thresholds=0.9,
                                             method="library-distance").calibrate(case.test, fpr=0.1)
    det.save(tmp_path / "det.lnp")
    deployed = _deployed(form, case.model, case.batch)
    with torch.no_grad():
        served = deployed(case.batch)  # a plain request before the guard (Dynamo caches its graph for this shape)
        eager = case.model(case.batch)
    torch.testing.assert_close(served, eager, rtol=1e-5, atol=1e-5)
    # the eager model's detector loaded onto the deployed form (the export keeps the names; the compiled module's
    # _orig_mod. prefix is mapped on load, the weights compared without it)
    back = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", deployed)
    out = back.guard()(case.batch)
    torch.testing.assert_close(out.output, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.score, det.score(case.batch), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(back.score(case.test), det.score(case.test), rtol=1e-5, atol=1e-5)
    if form == "torch.compile":  # fitted on the compiled module itself (layer names with or without _orig_mod.)
        own = lnp.ConsistencyDetector.from_model(deployed, case.train, ["_orig_mod.bn1", "layer1.0.bn2", "fc"],
                                                 thresholds=0.9, method="library-distance")
        own.calibrate(case.test, fpr=0.1)
        torch.testing.assert_close(own.guard()(case.batch).output, eager, rtol=1e-5, atol=1e-5)


def test_torchscript_is_refused_with_the_forms_that_work():
    case = resnet_case()
    with pytest.raises(TypeError, match=r"TorchScript.*the eager nn.Module.*torch.export.*ONNX"):
        lnp.ConsistencyDetector.from_model(torch.jit.trace(case.model, case.batch), case.train, ["bn1", "fc"])


def test_a_huggingface_model_through_torch_export_keeps_its_layer_names():
    case = bert_case()
    batch = torch.export.Dim("batch")
    inputs = {k: v[:3] for k, v in case.batch.items()}
    exported = torch.export.export(case.model, (), inputs, dynamic_shapes={k: {0: batch} for k in inputs}).module()
    test = {k: v for k, v in case.test.items() if k != "labels"}
    got = lnp.TorchLayerProbe(exported, case.layers).run(MultiInput(test))
    want = lnp.TorchLayerProbe(case.model, case.layers).run(MultiInput(test))
    for layer in case.layers:
        torch.testing.assert_close(got.haps[layer], want.haps[layer], rtol=1e-5, atol=1e-5, msg=layer)
    torch.testing.assert_close(got.outputs, want.outputs, rtol=1e-5, atol=1e-5)
