"""ConsistencyDetector and its guard: calibration, scoring, bad input, save/load, the README example."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.builtins import DETECTORS
from libnet_plugin.consistency_detector import DetectorGuard, GuardOutput, ModelChangedError, model_fingerprint
from libnet_plugin.errors import LayerNotFoundError, NonFiniteError, NotFittedError, SaveFormatError, ShapeMismatchError

#: every detector of the registry (the default library-fusion included)
METHODS = list(DETECTORS)


def _detector(net, method, train, **kw):
    det = lnp.ConsistencyDetector(net, method=method, **kw)
    if det.requires_training_data:
        det.fit(train)
    return det


@pytest.mark.parametrize("method", ["cpl", "library-margin", "msp"])
def test_calibrated_fpr_on_held_out_clean_data(method, mlp):
    g = torch.Generator().manual_seed(3)
    train, cal, held_out = (torch.randn(n, 10, generator=g) for n in (600, 2000, 4000))
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(train)
    det = lnp.ConsistencyDetector(net, method=method).calibrate(cal, fpr=0.05)
    assert det.n_calibration_ == 2000 and det.fpr_ == 0.05
    measured = float(det.predict(held_out).float().mean())  # n = 4,000 held-out clean inputs
    assert abs(measured - 0.05) <= 0.02, measured
    # the threshold is the conformal quantile of the calibration scores
    assert det.threshold_ == pytest.approx(float(det.calibration_scores_[math.ceil(2001 * 0.95) - 1]))


@pytest.mark.parametrize("fpr", [0, 1, -0.1, 1.5, float("nan"), True, "0.05"])
def test_fpr_outside_open_unit_interval(fitted, mlp_data, fpr):
    det = lnp.ConsistencyDetector(fitted)
    with pytest.raises(ValueError, match=r"fpr must be a number in the open interval \(0, 1\)"):
        det.calibrate(mlp_data[0][:100], fpr=fpr)


def test_too_few_calibration_inputs(fitted, mlp_data):
    with pytest.raises(ValueError, match="calibrate needs at least 19 clean inputs for fpr=0.05"):
        lnp.ConsistencyDetector(fitted).calibrate(mlp_data[0][:10], fpr=0.05)


def test_uncalibrated_predict_and_guard_say_calibrate(fitted, mlp_data):
    det = lnp.ConsistencyDetector(fitted, method="cpl")
    x = mlp_data[0][:5]
    assert det.score(x).shape == (5,)  # CPL needs no reference: scoring works before calibration
    with pytest.raises(NotFittedError, match=r"call det.calibrate\(clean_data, fpr=0.05\)"):
        det.predict(x)
    with pytest.raises(NotFittedError, match="calibrate"):
        det.guard()
    with pytest.raises(NotFittedError, match="calibrate"):
        lnp.ConsistencyDetector(fitted, method="library-margin").score(x)  # fused: reference comes from calibrate
    with pytest.raises(NotFittedError, match="calibrate"):
        lnp.ConsistencyDetector(fitted).score(x)  # the default, library-fusion, fuses too


def test_training_data_detectors_ask_for_it(fitted, mlp_data):
    for method in ("knn", "mahalanobis"):
        det = lnp.ConsistencyDetector(fitted, method=method)
        assert det.requires_training_data
        with pytest.raises(NotFittedError, match=r"det.fit\(train\)"):
            det.calibrate(mlp_data[0][:100])


def test_unfitted_network(mlp, mlp_data):
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9)
    with pytest.raises(NotFittedError, match="fit"):
        lnp.ConsistencyDetector(net).calibrate(mlp_data[0][:100])


def test_one_call_from_model_with_auto_thresholds(mlp, mlp_data):
    x, y = mlp_data
    det = lnp.ConsistencyDetector.from_model(mlp, (x, y), layers=["fc1", "out"], method="knn",
                                             network_options={"auto_thresholds": {"target": 0.2}})
    assert det.net.is_fitted and set(det.net.thresholds_) == {"fc1", "out"} and det.net.thresholds == "auto"
    assert set(det.net.auto_thresholds_report_) == {"fc1", "out"}
    det.calibrate(torch.randn(200, 10, generator=torch.Generator().manual_seed(5)))
    assert det.predict(x[:3]).dtype == torch.bool
    auto = lnp.ConsistencyDetector.from_model(mlp, x)  # layers omitted: "auto", block outputs after activation
    assert auto.net.layers and all(l.endswith(":input") for l in auto.net.layers)
    with pytest.raises(ValueError, match="needs the training data"):
        lnp.ConsistencyDetector(mlp, layers=["fc1"])
    with pytest.raises(ValueError, match="only used when building from a model"):
        lnp.ConsistencyDetector(det.net, layers=["fc1"])


def test_the_deprecated_one_call_form_still_fits_and_warns(mlp, mlp_data):
    x, _ = mlp_data
    with pytest.warns(FutureWarning, match="from_model"):
        old = lnp.ConsistencyDetector(mlp, ["fc1", "out"], thresholds=0.9, method="cpl", train=x)
    new = lnp.ConsistencyDetector.from_model(mlp, x, ["fc1", "out"], thresholds=0.9, method="cpl")
    assert old.net.library_sizes_ == new.net.library_sizes_
    torch.testing.assert_close(old.score(x[:20]), new.score(x[:20]), rtol=1e-6, atol=1e-6)
    with pytest.warns(FutureWarning, match="from_model"):
        on_net = lnp.ConsistencyDetector(new.net, method="knn", train=(x, mlp_data[1]))
    assert on_net.requires_training_data and on_net.net is new.net


def test_contradictory_options_raise_naming_both(mlp, fitted):
    with pytest.raises(ValueError, match=r"auto_thresholds=.*thresholds=0\.9"):
        lnp.LibraryNetwork(mlp, ["fc1"], thresholds=0.9, auto_thresholds={"target": 0.2})
    with pytest.raises(ValueError, match="thresholds, device are only used when building from a model"):
        lnp.ConsistencyDetector(fitted, thresholds=0.5, device="cpu")
    with pytest.raises(ValueError, match="both set the thresholds"):
        lnp.ConsistencyDetector.from_model(mlp, torch.randn(30, 10), ["fc1"], thresholds=0.9,
                                           network_options={"thresholds": 0.8})
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['thresold'\]"):
        lnp.LibraryNetwork(mlp, ["fc1"], thresold=0.9)


def test_one_default_for_thresholds():
    import inspect

    network = inspect.signature(lnp.LibraryNetwork).parameters["thresholds"].default
    assert network == lnp.network.DEFAULT_THRESHOLDS == "auto"


def test_calibrate_from_features_matches_calibrate_from_inputs(fitted):
    clean = torch.randn(120, 10, generator=torch.Generator().manual_seed(4))
    direct = lnp.ConsistencyDetector(fitted, method="library-fusion").calibrate(clean, fpr=0.1)
    det = lnp.ConsistencyDetector(fitted, method="library-fusion")
    features = det.calibration_features(clean)
    assert features.shape[0] == 120
    det.calibrate(features=features, fpr=0.1)
    assert det.n_calibration_ == direct.n_calibration_ == 120
    assert det.threshold_ == pytest.approx(direct.threshold_, rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="exactly one of them; got both"):
        det.calibrate(clean, fpr=0.1, features=features)
    with pytest.raises(ValueError, match="got neither"):
        det.calibrate(fpr=0.1)
    with pytest.warns(FutureWarning, match="calibration_features"):
        again = det.calibration_data(clean)
    torch.testing.assert_close(again, features, rtol=1e-6, atol=1e-6)
    with pytest.warns(FutureWarning, match=r"calibrate\(features=data"):
        det.calibrate_on(features, 0.2)
    assert det.fpr_ == 0.2


@pytest.mark.parametrize("method", METHODS)
def test_score_call_predict_and_batches_agree(fitted, mlp_data, method):
    x, y = mlp_data
    det = _detector(fitted, method, (x, y)).calibrate(torch.randn(100, 10), fpr=0.1)
    s = det.score(x[:50])
    assert s.shape == (50,) and s.dtype == torch.float32
    torch.testing.assert_close(det(x[:50]), s)
    torch.testing.assert_close(det.score([x[:20], x[20:50]]), s, rtol=1e-5, atol=1e-5)
    assert torch.equal(det.predict(x[:50]), s > det.threshold_)


def test_guard_is_one_forward_pass_with_the_model_output(fitted, mlp, mlp_data):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-margin").calibrate(x[:200], fpr=0.1)
    guarded = det.guard()
    assert isinstance(guarded, DetectorGuard) and isinstance(guarded, nn.Module)
    calls = []
    handle = mlp.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = guarded(x[200:232])
    finally:
        handle.remove()
    assert len(calls) == 1
    assert isinstance(out, GuardOutput)
    torch.testing.assert_close(out.output, mlp(x[200:232]).detach())
    assert torch.equal(out.flagged, det.predict(x[200:232]))
    torch.testing.assert_close(out.score, det.score(x[200:232]))
    assert "method='library-margin'" in repr(guarded)


def test_nan_inputs_are_flagged_by_default_and_rejected_on_request(fitted, mlp_data):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-margin").calibrate(x[:200], fpr=0.1)
    batch = x[200:206].clone()
    batch[1, 3] = float("nan")
    batch[4, 0] = float("inf")
    s = det.score(batch)
    assert torch.isinf(s[[1, 4]]).all()
    ok = [0, 2, 3, 5]
    torch.testing.assert_close(s[ok], det.score(batch[ok]))
    assert det.predict(batch)[[1, 4]].all()
    out = det.guard()(batch)
    assert torch.isnan(out.output[[1, 4]]).all() and torch.isfinite(out.output[ok]).all()
    all_nan = det.guard()(torch.full((2, 10), float("nan")))
    assert all_nan.flagged.all() and all_nan.output.shape == (2, 4)
    strict = lnp.ConsistencyDetector(fitted, method="msp", on_nonfinite="raise").calibrate(x[:200])
    with pytest.raises(NonFiniteError, match="1 NaN, 1 inf"):
        strict.score(batch)
    with pytest.raises(NonFiniteError, match="calibration"):
        lnp.ConsistencyDetector(fitted).calibrate(torch.cat([x[:100], batch]))
    with pytest.raises(ValueError, match="on_nonfinite must be"):
        lnp.ConsistencyDetector(fitted, on_nonfinite="ignore")


def test_wrong_input_shape(fitted, mlp_data):
    det = lnp.ConsistencyDetector(fitted).calibrate(mlp_data[0][:100], fpr=0.1)
    for bad in (torch.randn(4, 11), torch.randn(4, 2, 5)):
        with pytest.raises(ShapeMismatchError, match=r"fitted on inputs of shape \[B, 10\]"):
            det.predict(bad)
        with pytest.raises(ShapeMismatchError):
            det.guard()(bad)
    with pytest.raises(TypeError, match="expected a Tensor"):
        det.score(np.zeros((2, 10)))


def test_model_changed_since_fitting(mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    det = lnp.ConsistencyDetector(net, method="msp").calibrate(x[:100], fpr=0.1)
    with torch.no_grad():
        mlp.fc1.weight.mul_(1.0)  # touched in place, same values: still fine
    det.predict(x[:3])
    with torch.no_grad():
        mlp.fc1.weight.add_(0.01)
    with pytest.raises(ModelChangedError, match="'fc1.weight' changed"):
        det.predict(x[:3])
    with torch.no_grad():
        mlp.fc1.weight.sub_(0.01)
    det.predict(x[:3])  # back to the fitted weights (within float tolerance)
    mlp.out = nn.Linear(16, 6)
    with pytest.raises(ModelChangedError, match="out.weight"):
        det.score(x[:3])


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(tmp_path, mlp, mlp_data, method):
    x, y = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)
    det = _detector(net, method, (x, y)).calibrate(torch.randn(100, 10), fpr=0.1)
    det.save(tmp_path / "det.lnp")
    det2 = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp)
    assert det2.method == method and det2.threshold_ == det.threshold_ and det2.n_calibration_ == 100
    assert det2.net.library_sizes_ == net.library_sizes_
    torch.testing.assert_close(det2.score(x[:30]), det.score(x[:30]))
    assert torch.equal(det2.predict(x[:30]), det.predict(x[:30]))


def test_load_refuses_a_changed_model_and_other_files(tmp_path, mlp, mlp_data):
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    det = lnp.ConsistencyDetector(net)
    det.save(tmp_path / "uncalibrated.lnp")
    loaded = lnp.ConsistencyDetector.load(tmp_path / "uncalibrated.lnp", mlp)
    with pytest.raises(NotFittedError, match="calibrate"):
        loaded.predict(x[:2])
    other = type(mlp)()
    with pytest.raises(ModelChangedError, match="weights differ"):
        lnp.ConsistencyDetector.load(tmp_path / "uncalibrated.lnp", other)
    lnp.ConsistencyDetector.load(tmp_path / "uncalibrated.lnp", other, check_model=False)
    net.save(tmp_path / "net.lnp")
    with pytest.raises(SaveFormatError, match="expected a 'ConsistencyDetector'"):
        lnp.ConsistencyDetector.load(tmp_path / "net.lnp", mlp)


def test_fingerprint_is_none_for_non_torch_models():
    assert model_fingerprint("model.onnx") is None
    assert model_fingerprint(nn.Linear(2, 3))[0][:2] == ["weight", [3, 2]]


def _quantised(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def test_quantised_model_fingerprint_holds_the_packed_weights(tmp_path, mlp, mlp_data):
    x, _ = mlp_data
    q = _quantised(mlp)
    assert not list(q.parameters()) and not list(q.buffers())  # the weights live in packed-parameter objects
    names = [r[0] for r in model_fingerprint(q)]
    assert "fc2._packed_params._packed_params[0]" in names and "fc2._packed_params._packed_params[1]" in names
    det = lnp.ConsistencyDetector.from_model(q, x, layers=["fc1", "fc2", "out"], thresholds=0.9,
                                             method="cpl").calibrate(x[:100], fpr=0.1)
    det.save(tmp_path / "det.lnp")
    det.score(x[:3])
    lnp.ConsistencyDetector.load(tmp_path / "det.lnp", _quantised(mlp))  # the same weights, quantised again
    fitted_out = q.out
    q.out = torch.ao.nn.quantized.dynamic.Linear(16, 4)  # a quantised layer swapped for another
    with pytest.raises(ModelChangedError, match=r"'out\._packed_params\._packed_params\[0\]' changed"):
        det.score(x[:3])
    q.out = fitted_out
    det.score(x[:3])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = torch.quantize_per_tensor(torch.randn(16, 32, generator=torch.Generator().manual_seed(5)),
                                           0.05, 0, torch.qint8)
    q.fc2.set_weight_bias(weight, q.fc2.bias())  # a probed layer's weights replaced
    with pytest.raises(ModelChangedError, match=r"'fc2\._packed_params\._packed_params\[0\]' changed"):
        det.score(x[:3])
    with pytest.raises(ModelChangedError, match="weights differ"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", q)


class _Holder(nn.Module):
    """Holds a model under another attribute name, as a wrapper of one's own would."""

    def __init__(self, name: str, model: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.name)(x)


def test_detector_moves_between_the_bare_and_the_wrapped_model(tmp_path, mlp, mlp_data):
    x, _ = mlp_data
    q = x[:40]
    bare = lnp.ConsistencyDetector.from_model(mlp, x, layers=["fc1", "out"], thresholds=0.9,
                                              method="library-fusion").calibrate(x[:100], fpr=0.1)
    bare.save(tmp_path / "bare.lnp")
    # fitted on the bare model, loaded onto DataParallel (names "module.*"; runs the model itself on CPU)
    dp = lnp.ConsistencyDetector.load(tmp_path / "bare.lnp", nn.DataParallel(mlp))
    assert dp.net.layers == ["module.fc1", "module.out"] and dp.threshold_ == bare.threshold_
    torch.testing.assert_close(dp.score(q), bare.score(q), rtol=1e-5, atol=1e-6)
    # ... and onto torch.compile's wrapper (names "_orig_mod.*"; loading runs no forward pass)
    compiled = lnp.ConsistencyDetector.load(tmp_path / "bare.lnp", torch.compile(mlp))
    assert compiled.net.layers == ["_orig_mod.fc1", "_orig_mod.out"]
    # the reverse: fitted on the wrapped model, loaded onto the bare one
    dp.save(tmp_path / "dp.lnp")
    back = lnp.ConsistencyDetector.load(tmp_path / "dp.lnp", mlp)
    assert back.net.layers == ["fc1", "out"]
    torch.testing.assert_close(back.score(q), bare.score(q), rtol=1e-5, atol=1e-6)
    holder = _Holder("_orig_mod", mlp)  # saved with "_orig_mod.*" names, as a fit on torch.compile(mlp) is
    on_holder = lnp.ConsistencyDetector.from_model(holder, x, layers=["_orig_mod.fc1", "_orig_mod.out"],
                                                   thresholds=0.9, method="library-fusion")
    on_holder.calibrate(x[:100], fpr=0.1).save(tmp_path / "compiled.lnp")
    from_compiled = lnp.ConsistencyDetector.load(tmp_path / "compiled.lnp", mlp)
    torch.testing.assert_close(from_compiled.score(q), bare.score(q), rtol=1e-5, atol=1e-6)
    # a different model is still refused, wrapped or not
    torch.manual_seed(7)
    other = type(mlp)().eval()
    for model in (other, nn.DataParallel(other), torch.compile(other)):
        for path in ("bare.lnp", "dp.lnp", "compiled.lnp"):
            with pytest.raises(ModelChangedError, match="weights differ"):
                lnp.ConsistencyDetector.load(tmp_path / path, model)
    # another wrapper: prefix_map says where the saved names are now
    wrapped = _Holder("backbone", mlp)
    with pytest.raises(LayerNotFoundError, match=r"'fc1' does not exist.*prefix_map=\{'': 'backbone\.'\}"):
        lnp.ConsistencyDetector.load(tmp_path / "bare.lnp", wrapped)
    mapped = lnp.ConsistencyDetector.load(tmp_path / "bare.lnp", wrapped, prefix_map={"": "backbone."})
    assert mapped.net.layers == ["backbone.fc1", "backbone.out"]
    torch.testing.assert_close(mapped.score(q), bare.score(q), rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelChangedError, match="weights differ"):
        lnp.ConsistencyDetector.load(tmp_path / "bare.lnp", _Holder("backbone", other), prefix_map={"": "backbone."})


def test_streaming_fit_of_training_data_detectors(fitted, mlp_data):
    x, y = mlp_data
    batches = ((x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50))  # one-shot: streamed once
    det = lnp.ConsistencyDetector(fitted, method="mahalanobis").fit(batches).calibrate(x[:100], fpr=0.1)
    ref = lnp.ConsistencyDetector(fitted, method="mahalanobis").fit(x).calibrate(x[:100], fpr=0.1)
    torch.testing.assert_close(det.score(x[:20]), ref.score(x[:20]))
    mem = lnp.ConsistencyDetector(fitted, method="knn").fit((x, y)).memory_bytes()
    assert mem["detector"] == 300 * (32 + 16 + 4) * 4 + 300 * 8  # kNN keeps every training activation
    assert mem["library"] == sum(t.numel() * t.element_size() for t in fitted.state_tensors().values())


def test_readme_detector_example_runs(monkeypatch, tmp_path):
    from readme_blocks import run_readme_block

    monkeypatch.chdir(tmp_path)
    code, ns = run_readme_block("detector")
    assert len([l for l in code.splitlines() if l.strip() and not l.lstrip().startswith("#")]) <= 10
    assert ns["out"].flagged.dtype == torch.bool and ns["out"].output.shape[0] == ns["out"].flagged.shape[0]
    assert ns["det"].is_calibrated


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_cuda_detector_matches_cpu(mlp, mlp_data, method):
    x, y = mlp_data
    cal = torch.randn(100, 10, generator=torch.Generator().manual_seed(9))
    cpu_net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)
    expected = _detector(cpu_net, method, (x, y)).calibrate(cal, fpr=0.1).score(x[:40])
    mlp.cuda()  # the same weights, now on the GPU
    gpu_net = lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9, device="cuda").fit(x)
    assert gpu_net.library_sizes_ == cpu_net.library_sizes_
    gpu = _detector(gpu_net, method, (x, y)).calibrate(cal, fpr=0.1)
    s = gpu.score(x[:40])  # CPU inputs are moved to the model
    assert s.device.type == "cuda"
    diff = (s.cpu() - expected).abs()
    # float differences may swap near-ties: a rank in a p-value or a k-NN vote, so allow rare small jumps
    assert float(diff.median()) < 1e-3 and float(diff.max()) < 1.0, diff
    out = gpu.guard()(x[:8].cuda())
    assert out.output.device.type == "cuda" and out.flagged.shape == (8,)


# ---------------------------------------------------------------- scores with a gradient (adaptive attacks)


def _grad_detector(method: str):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 24), torch.nn.Tanh(), torch.nn.Linear(24, 3)).eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 6, generator=g)
    det = lnp.ConsistencyDetector.from_model(model, x, ["0", "2"], thresholds=0.8, method=method)
    return det.calibrate(torch.randn(100, 6, generator=g)), g


@pytest.mark.parametrize("method", ["msp", "mahalanobis", "library-distance"])
def test_score_gradient_matches_a_finite_difference(method):
    """Under autograd the score's value is exact and its gradient is the surrogate's, which matches a
    central finite difference (float64 inputs are cast to the model's float32, so h is not tiny)."""
    det, g = _grad_detector(method)
    assert det.differentiable
    x = torch.randn(5, 6, generator=g)
    xg = x.clone().requires_grad_(True)
    s = det.score(xg)
    torch.testing.assert_close(s.detach(), det.score(x))  # the value is the exact score
    s.sum().backward()
    h = 1e-2
    for i, j in [(0, 0), (2, 3), (4, 5)]:
        e = torch.zeros_like(x)
        e[i, j] = h
        with torch.no_grad():
            fd = (det.surrogate(x + e)[i] - det.surrogate(x - e)[i]) / (2 * h)
        assert float(xg.grad[i, j]) == pytest.approx(float(fd), rel=0.05, abs=1e-3)
    if method == "msp":  # a score whose own arithmetic is smooth: the surrogate is the score
        torch.testing.assert_close(det.surrogate(x), det.score(x))


def test_a_score_without_gradient_says_so():
    det, g = _grad_detector("cpl")
    assert not det.differentiable
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    assert not det.score(x).requires_grad  # values as usual, no graph
    with pytest.raises(TypeError, match="not differentiable"):
        det.surrogate(x)


def test_guard_output_keeps_the_graph_and_nonfinite_inputs_are_refused():
    det, g = _grad_detector("library-distance")
    x = torch.randn(4, 6, generator=g, requires_grad=True)
    out = det.score_and_output(x)
    assert out.output.requires_grad and out.score.requires_grad and not out.flagged.requires_grad
    (out.output.sum() + out.score.sum()).backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)
    bad = x.detach().clone()
    bad[1, 2] = float("nan")
    with pytest.raises(NonFiniteError):
        det.score(bad.requires_grad_(True))
    assert sum(len(m._forward_hooks) for m in det.net.probe.model.modules()) == 0
