"""ConsistencyDetector, its guard, and the detector plugins (hand-computed values, bad input, save/load)."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.consistency_detector import DetectorGuard, GuardOutput, ModelChangedError, model_fingerprint
from libnet_plugin.detectors import (
    ConformalFusion,
    DeepKNNScore,
    LibraryDistanceScore,
    LibraryMarginScore,
    MahalanobisScore,
    MaxSoftmaxScore,
    node_classes,
)
from libnet_plugin.errors import LibnetError, NonFiniteError, NotFittedError, SaveFormatError, ShapeMismatchError
from libnet_plugin.plugins import make_detector, registered_detectors

METHODS = ["cpl", "library-margin", "library-distance", "msp", "mahalanobis", "knn"]


@pytest.fixture
def fitted(mlp, mlp_data):
    x, _ = mlp_data
    return lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)


def _detector(net, method, train, **kw):
    det = lnp.ConsistencyDetector(net, method=method, **kw)
    if det.requires_training_data:
        det.fit(train)
    return det


# ------------------------------------------------------------------------------------------------
# plugins through the hook
# ------------------------------------------------------------------------------------------------


def test_hook_serves_every_detector_and_lists_them():
    pm = lnp.get_plugin_manager(autoload=False)
    kinds = {"library-margin": LibraryMarginScore, "library-distance": LibraryDistanceScore, "msp": MaxSoftmaxScore,
             "mahalanobis": MahalanobisScore, "knn": DeepKNNScore}
    for name, cls in kinds.items():
        assert isinstance(make_detector(name, {}, pm), cls)
    assert make_detector("cpl", {"top_k": 7}, pm).top_k == 7
    listed = registered_detectors(pm)
    assert {name for name, _ in listed.values()} >= {"cpl", "library-margin", "library-distance", "msp",
                                                      "mahalanobis", "knn"}
    assert listed["cpl (paper, top_k 20)"] == ("cpl", {"top_k": 20})
    with pytest.raises(LibnetError, match="no registered plugin provides a consistency detector named 'nope'"):
        make_detector("nope", {}, pm)


def test_third_party_detector_plugs_in_the_same_way(mlp, mlp_data):
    class OutputNorm:
        name = "output-norm"

        def fit(self, net, data=None):
            return self

        def score(self, net, result):
            return result.outputs.norm(dim=1)

    class Plugin:
        @lnp.hookimpl
        def libnet_detector_comparison(self):
            return {"output norm": ("output-norm", {})}

        @lnp.hookimpl
        def libnet_consistency_detector(self, name, settings):
            return OutputNorm() if name == "output-norm" else None

    pm = lnp.get_plugin_manager(autoload=False, plugins=[Plugin()])
    x, _ = mlp_data
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9, plugin_manager=pm).fit(x)
    det = lnp.ConsistencyDetector(net, method="output-norm").calibrate(x[:100], fpr=0.1)
    torch.testing.assert_close(det.score(x[:5]), mlp(x[:5]).norm(dim=1))
    assert registered_detectors(pm)["output norm"] == ("output-norm", {})


def test_bad_detector_settings():
    with pytest.raises(ValueError, match="features must be"):
        LibraryMarginScore(features=["margin", "bogus"])
    with pytest.raises(ValueError, match="k must be a positive integer"):
        LibraryMarginScore(k=0)
    with pytest.raises(ValueError, match="labels must be"):
        DeepKNNScore(labels="maybe")
    with pytest.raises(ValueError, match="pool must be"):
        MahalanobisScore(pool="max")
    with pytest.raises(ValueError, match="shrinkage"):
        MahalanobisScore(shrinkage=-1.0)
    with pytest.raises(ValueError, match="pool must be"):
        LibraryDistanceScore(pool="max")
    with pytest.raises(ValueError, match="max_dim must be a positive integer"):
        LibraryDistanceScore(max_dim=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        LibraryDistanceScore(seed="0")
    assert LibraryDistanceScore().features_ == ("distance",)
    assert LibraryDistanceScore(features=("margin", "distance")).features_ == ("margin", "distance")


# ------------------------------------------------------------------------------------------------
# hand-computed scores
# ------------------------------------------------------------------------------------------------


def test_conformal_fusion_hand_computed():
    f = ConformalFusion()
    ref = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 1.0], [3.0, 0.0]])
    loo = f.fit(ref)
    # leave-one-out p-values: feature 0 -> 1, 3/4, 2/4, 1/4; feature 1 (ties count as >=) -> 2/4, 2/4, 3/4, 1
    expected = -np.log([1 * 0.5, 0.75 * 0.5, 0.5 * 0.75, 0.25 * 1.0])
    np.testing.assert_allclose(loo.numpy(), expected, rtol=1e-12)
    p = f.p_values(torch.tensor([[2.0, 6.0], [-1.0, 5.0]]))
    np.testing.assert_allclose(p.numpy(), [[3 / 5, 1 / 5], [5 / 5, 3 / 5]])
    np.testing.assert_allclose(f(torch.tensor([[2.0, 6.0]])).numpy(), [-math.log(3 / 25)])
    with pytest.raises(ShapeMismatchError, match=r"\[B, 2\]"):
        f.p_values(torch.zeros(3, 3))
    with pytest.raises(NotFittedError, match="calibrate"):
        ConformalFusion().p_values(torch.zeros(1, 1))


def _two_node_net(two_layer):
    # HAPs of both layers equal the input; theta 0.5 keeps [1, 0] (answer 0) and [0, 1] (answer 1) as nodes
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1]])
    return lnp.LibraryNetwork(two_layer, ["a", "b"], thresholds=0.5).fit(train)


def test_library_margin_hand_computed(two_layer):
    net = _two_node_net(two_layer)
    assert net.library_sizes_ == {"a": 2, "b": 2}
    assert node_classes(net, "a").tolist() == [0, 1]
    s = LibraryMarginScore(layers=["a"], k=1, span=1, ridge=0.0,
                           features=["margin", "residual", "similarity"]).fit(net)
    assert s.feature_names() == ["a/margin", "a/residual", "a/similarity"]
    r = net.probe.run(torch.tensor([[0.8, 0.6]]))  # answer 0; cosines 0.8 (class 0), 0.6 (class 1)
    np.testing.assert_allclose(s.features(net, r).numpy(), [[0.6 - 0.8, 1 - 0.8**2, -0.8]], atol=1e-6)
    full_span = LibraryMarginScore(layers=["a"], span=2, ridge=0.0, features=["residual"]).fit(net)
    assert float(full_span.features(net, r)) == pytest.approx(0.0, abs=1e-6)  # both nodes span the plane


def test_library_distance_hand_computed(two_layer):
    # theta 0.5 keeps all three as nodes; the answer is argmax(x): classes 0, 1, 1
    net = lnp.LibraryNetwork(two_layer, ["a", "b"], thresholds=0.5).fit(torch.tensor([[1.0, 0.0], [0.0, 1.0],
                                                                                    [-1.0, 0.0]]))
    assert node_classes(net, "a").tolist() == [0, 1, 1]
    s = LibraryDistanceScore(layers=["a"]).fit(net)
    assert s.feature_names() == ["a/distance"]
    # class means [1, 0] and [-.5, .5]; within-class covariance [[1, 1], [1, 1]] / 6, pseudo-inverse
    # [[1.5, 1.5], [1.5, 1.5]]: d = 1.5 (sum of (g - mu))^2 with g the normalised input
    r = net.probe.run(torch.tensor([[0.8, 0.6], [3.0, 4.0]]))  # answers 0 and 1; [3, 4] is normalised first
    np.testing.assert_allclose(s.features(net, r).numpy(), [[1.5 * 0.4**2], [1.5 * 1.4**2]], rtol=1e-6)
    both = LibraryMarginScore(layers=["a"], k=1, features=["margin", "distance"]).fit(net).features(net, r)
    np.testing.assert_allclose(both[:, 1].numpy(), [1.5 * 0.4**2, 1.5 * 1.4**2], rtol=1e-6)


def test_library_distance_is_inf_without_nodes_of_the_answer_class(two_layer):
    net = lnp.LibraryNetwork(two_layer, ["a"], thresholds=0.5).fit(torch.tensor([[1.0, 0.0], [0.9, 0.1]]))
    assert node_classes(net, "a").tolist() == [0]  # one node, of class 0
    s = LibraryDistanceScore().fit(net)
    d = s.features(net, net.probe.run(torch.tensor([[1.0, 0.2], [0.1, 0.9]]))).squeeze(1)
    assert d[0] == pytest.approx(0.0) and math.isinf(d[1])


def test_library_distance_matches_numpy_and_counts_its_memory(fitted, mlp_data):
    x, _ = mlp_data
    layers = ["fc2", "out"]  # full-rank node covariances (fc1 is linear in 10 inputs)
    s = LibraryDistanceScore(layers=layers).fit(fitted)
    r = fitted.probe.run(x[:9])
    feats = s.features(fitted, r).numpy()
    for j, layer in enumerate(layers):
        nodes = fitted.libraries_[layer].nodes.double().numpy()
        cls = node_classes(fitted, layer).numpy()
        mu = np.zeros((fitted.n_classes_, nodes.shape[1]))
        for c in np.unique(cls):
            mu[c] = nodes[cls == c].mean(0)
        centred = nodes - mu[cls]
        prec = np.linalg.pinv(centred.T @ centred / len(nodes), hermitian=True)
        g = r.haps[layer].double().numpy()
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        diff = g - mu[r.answers.numpy()]
        np.testing.assert_allclose(feats[:, j], np.einsum("bi,ij,bj->b", diff, prec, diff), rtol=1e-5, atol=1e-6)
    dims = [fitted.libraries_[l].nodes.shape[1] for l in layers]
    stats = sum((fitted.n_classes_ * d + d * d) * 8 + fitted.n_classes_ for d in dims)  # means, precision, present
    assert s.memory_bytes() == stats  # no clean reference yet
    s.set_reference(s.features(fitted, fitted.probe.run(x[:50])))
    assert s.memory_bytes() == stats + 50 * len(dims) * 8


def test_library_distance_pools_conv_channels_and_projects_wide_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(120, 1, 6, 6)
    net = lnp.LibraryNetwork(model, ["0", "3"], thresholds=0.99).fit(x)
    s = LibraryDistanceScore(max_dim=4).fit(net)
    assert s._gauss["0"]["channels"] == 3 and s._gauss["0"]["means"].shape[1] == 3
    assert s._gauss["3"]["channels"] == 0 and s._gauss["3"]["proj"].shape == (5, 4)
    assert s.features(net, net.probe.run(x[:6])).shape == (6, 2)
    # a projected library stores sketches, not whole activations: no channel averages there
    sketched = lnp.LibraryNetwork(model, ["0"], thresholds=0.99, library="projected",
                                  library_options={"n_components": 12}).fit(x)
    st = LibraryDistanceScore(max_dim=64).fit(sketched)._gauss["0"]
    assert st["channels"] == 0 and st["proj"] is None and st["means"].shape[1] == 12
    with pytest.raises(ShapeMismatchError, match="cannot average 48 features over 5 channels"):
        LibraryDistanceScore(pool={"0": 5}).fit(net)


def test_library_margin_on_the_fly_gram_equals_precomputed(fitted, mlp_data):
    x, _ = mlp_data
    r = fitted.probe.run(x[:40])
    a = LibraryMarginScore(span=5).fit(fitted).features(fitted, r)
    b = LibraryMarginScore(span=5, max_gram_nodes=1).fit(fitted).features(fitted, r)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_deep_knn_hand_computed(two_layer):
    net = _two_node_net(two_layer)
    train = (torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1]))
    s = DeepKNNScore(k=2).fit(net, train)
    r = net.probe.run(torch.tensor([[1.0, 0.05], [0.51, 0.49]]))
    # first: both neighbours say 0 = answer; second (answer 0): neighbours [0.9, 0.1] (0) and [0.1, 0.9] (1),
    # one disagreeing vote in each of the two layers
    assert s.score(net, r).tolist() == [0.0, 2.0]
    with pytest.raises(ValueError, match="labels='true' needs training data with labels"):
        DeepKNNScore(labels="true").fit(net, train[0])


def test_mahalanobis_matches_numpy(fitted, mlp_data):
    x, _ = mlp_data
    s = MahalanobisScore(layers=["fc2", "out"]).fit(fitted, x)  # full-rank features (fc1 is linear in 10 inputs)
    r_train = fitted.probe.run(x)
    r = fitted.probe.run(x[:7])
    ans = r_train.answers.numpy()
    feats = s.features(fitted, r).numpy()
    for j, layer in enumerate(["fc2", "out"]):
        f = r_train.haps[layer].double().numpy()
        classes = np.unique(ans)
        mu = np.stack([f[ans == c].mean(0) for c in classes])
        centred = f - mu[np.searchsorted(classes, ans)]
        prec = np.linalg.pinv(centred.T @ centred / len(f), hermitian=True)
        q = r.haps[layer].double().numpy()
        d = np.stack([np.einsum("bi,ij,bj->b", q - m, prec, q - m) for m in mu], 1).min(1)
        np.testing.assert_allclose(feats[:, j], d, rtol=1e-5, atol=1e-6)


def test_mahalanobis_pools_conv_channels_and_projects_wide_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(120, 1, 6, 6)
    net = lnp.LibraryNetwork(model, ["0", "3"], thresholds=0.9).fit(x)
    s = MahalanobisScore(max_dim=4).fit(net, x)
    assert s.channels_ == {"0": 3, "3": 0}
    assert s.dims_ == {"0": 3, "3": 4}  # conv: 3 channel means; linear: 5 features projected to 4
    s2 = MahalanobisScore(pool=None, max_dim=4).fit(net, x)
    assert s2.dims_ == {"0": 4, "3": 4}


def test_msp_equal_for_logits_and_log_probabilities(mlp, mlp_data):
    x, _ = mlp_data
    logits = mlp(x[:10]).detach()
    a = MaxSoftmaxScore().fit(None).score(None, lnp.ProbeResult(outputs=logits, haps={}))
    b = MaxSoftmaxScore().fit(None).score(None, lnp.ProbeResult(outputs=torch.log_softmax(logits, 1), haps={}))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, 1 - torch.softmax(logits, 1).amax(1))


# ------------------------------------------------------------------------------------------------
# calibration
# ------------------------------------------------------------------------------------------------


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
    det = lnp.ConsistencyDetector(fitted)
    x = mlp_data[0][:5]
    assert det.score(x).shape == (5,)  # CPL needs no reference: scoring works before calibration
    with pytest.raises(NotFittedError, match=r"call det.calibrate\(clean_data, fpr=0.05\)"):
        det.predict(x)
    with pytest.raises(NotFittedError, match="calibrate"):
        det.guard()
    with pytest.raises(NotFittedError, match="calibrate"):
        lnp.ConsistencyDetector(fitted, method="library-margin").score(x)  # fused: reference comes from calibrate


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
    det = lnp.ConsistencyDetector(mlp, layers=["fc1", "out"], train=(x, y), method="knn",
                                  network_options={"auto_thresholds": {"target": 0.2}})
    assert det.net.is_fitted and set(det.net.thresholds_) == {"fc1", "out"} and det.net.thresholds == "auto"
    assert set(det.net.auto_thresholds_report_) == {"fc1", "out"}
    det.calibrate(torch.randn(200, 10, generator=torch.Generator().manual_seed(5)))
    assert det.predict(x[:3]).dtype == torch.bool
    with pytest.raises(ValueError, match="needs layers"):
        lnp.ConsistencyDetector(mlp, train=x)
    with pytest.raises(ValueError, match="needs the training data"):
        lnp.ConsistencyDetector(mlp, layers=["fc1"])
    with pytest.raises(ValueError, match="only used when building from a model"):
        lnp.ConsistencyDetector(det.net, layers=["fc1"])


# ------------------------------------------------------------------------------------------------
# scoring, guard, bad input
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------------


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


def test_streaming_fit_of_training_data_detectors(fitted, mlp_data):
    x, y = mlp_data
    batches = ((x[i:i + 50], y[i:i + 50]) for i in range(0, 300, 50))  # one-shot: streamed once
    det = lnp.ConsistencyDetector(fitted, method="mahalanobis").fit(batches).calibrate(x[:100], fpr=0.1)
    ref = lnp.ConsistencyDetector(fitted, method="mahalanobis").fit(x).calibrate(x[:100], fpr=0.1)
    torch.testing.assert_close(det.score(x[:20]), ref.score(x[:20]))
    mem = lnp.ConsistencyDetector(fitted, method="knn").fit((x, y)).memory_bytes()
    assert mem["detector"] == 300 * (32 + 16 + 4) * 4 + 300 * 8  # kNN keeps every training activation
    assert mem["library"] == sum(t.numel() * t.element_size() for t in fitted.state_tensors().values())


# ------------------------------------------------------------------------------------------------
# README
# ------------------------------------------------------------------------------------------------


def test_readme_detector_example_runs(monkeypatch, tmp_path):
    from readme_blocks import run_readme_block

    monkeypatch.chdir(tmp_path)
    code, ns = run_readme_block("detector")
    assert len([l for l in code.splitlines() if l.strip() and not l.lstrip().startswith("#")]) <= 10
    assert ns["out"].flagged.dtype == torch.bool and ns["out"].output.shape[0] == ns["out"].flagged.shape[0]
    assert ns["det"].is_calibrated


# ------------------------------------------------------------------------------------------------
# the detector comparison (libnet evaluate-detectors)
# ------------------------------------------------------------------------------------------------


def test_evaluate_detectors_format_and_files(tmp_path, fitted, mlp_data):
    from libnet_plugin.experiments.comparison import evaluate_detectors

    x, y = mlp_data
    g = torch.Generator().manual_seed(7)
    clean = torch.randn(200, 10, generator=g)
    attacked = {"shifted": clean[:60] + 3.0}
    ood = {"wide": 6 * torch.randn(50, 10, generator=g)}
    res = evaluate_detectors(fitted, (x, y), clean, attacked, ood, detectors=["cpl", "msp", "knn"], out_dir=tmp_path)
    assert set(res["detectors"]) == {"cpl", "msp", "knn"}
    assert res["settings"]["n_calibration"] == 100 and res["settings"]["n_clean"] == 100
    assert res["sets"] == {"shifted": {"kind": "attack", "n": 60}, "wide": {"kind": "ood", "n": 50}}
    knn = res["detectors"]["knn"]
    assert 0.0 <= knn["auroc"]["shifted"] <= 1.0 and 0.0 <= knn["heldout_fpr"] <= 1.0
    assert knn["memory_bytes"]["kept"] == knn["memory_bytes"]["detector"] > 0
    check = res["detectors"]["msp"]["fpr_check"]
    assert check["n_calibration"] == check["n_heldout"] == 100 and check["n_splits"] == 50
    assert check["min"] <= check["mean"] <= check["max"] and abs(check["mean"] - 0.05) < 0.03
    assert res["detectors"]["cpl"]["library_based"] and res["best_library_based"] == "cpl"
    assert res["detectors"]["cpl"]["memory_bytes"]["kept"] == res["detectors"]["cpl"]["memory_bytes"]["library"]
    assert res["rows"][0]["detector"] == "cpl" and "shifted: AUROC / TPR" in res["rows"][0]
    assert res["table_markdown"].startswith("| detector |")
    for key in ("json", "markdown", "roc_png"):
        assert pathlib.Path(res["files"][key]).is_file()
    labelled = evaluate_detectors(fitted, x, clean, attacked, detectors={"paper": ("cpl", {"top_k": 20})},
                                  calibration=torch.randn(100, 10, generator=g))
    assert list(labelled["detectors"]) == ["paper"] and labelled["settings"]["n_clean"] == 200


def test_evaluate_detectors_bad_input(mlp, fitted, mlp_data):
    from libnet_plugin.experiments.comparison import evaluate_detectors

    x, _ = mlp_data
    with pytest.raises(ValueError, match="needs layers= and thresholds="):
        evaluate_detectors(mlp, x, x[:100], {"a": x[:10]})
    with pytest.raises(ValueError, match="no attacked or out-of-domain set"):
        evaluate_detectors(fitted, x, x[:100], {}, {})
    with pytest.raises(ValueError, match="used twice"):
        evaluate_detectors(fitted, x, x[:100], {"a": x[:10]}, {"a": x[:10]})
    with pytest.raises(ValueError, match="fpr must be"):
        evaluate_detectors(fitted, x, x[:100], {"a": x[:10]}, fpr=1.0)


@pytest.mark.parametrize("method", ["msp", "library-margin"])
def test_calibration_check_averages_to_the_requested_rate(fitted, method):
    from libnet_plugin.experiments.comparison import calibration_check

    clean = torch.randn(1000, 10, generator=torch.Generator().manual_seed(11))
    det = lnp.ConsistencyDetector(fitted, method=method).calibrate(clean[:500], fpr=0.05)
    check = calibration_check(det, clean, 0.05, n_splits=50)
    assert check["n_calibration"] == 500 and check["n_heldout"] == 500
    assert abs(check["mean"] - 0.05) < 0.01 and check["sd"] < 0.02, check  # conformal: slightly below 0.05


def test_threshold_specs_of_the_command():
    from libnet_plugin.experiments.evaluate_detectors import _parse_thresholds
    from libnet_plugin.experiments.report import ExperimentError

    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert _parse_thresholds("S1", layers) == ({"conv1": 0.55, "conv2": 0.70, "fc1": 0.75, "fc2": 0.80}, None)
    assert _parse_thresholds("auto:0.25", layers) == ("auto", {"target": 0.25})
    assert _parse_thresholds("auto:500", layers) == ("auto", {"target": 500})
    assert _parse_thresholds(".6,.7,.8,.9", layers)[0] == {"conv1": 0.6, "conv2": 0.7, "fc1": 0.8, "fc2": 0.9}
    for bad in ("S9", ".6,.7", "auto:lots"):
        with pytest.raises(ExperimentError):
            _parse_thresholds(bad, layers)


def test_evaluate_detectors_command_quick(tmp_path, capsys):
    from libnet_plugin.cli import main

    out = tmp_path / "out"
    rc = main(["evaluate-detectors", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--detectors", "cpl (paper, top_k 20)", "library-margin", "library-distance", "msp", "--no-progress"])
    assert rc == 0
    import json

    res = json.loads((out / "detectors.json").read_text())
    assert set(res["detectors"]) == {"cpl (paper, top_k 20)", "library-margin", "library-margin (conv1, conv2)",
                                     "library-distance", "library-distance (conv1, conv2)", "msp"}
    assert res["detectors"]["library-distance (conv1, conv2)"]["library_based"]
    assert set(res["sets"]) == {"PGD eps=0.1", "PGD eps=0.3", "digits 8x8 upscaled", "uniform noise"}
    assert res["run"]["command"].startswith("libnet evaluate-detectors --quick --detectors")
    assert (out / "roc.png").is_file() and "| detector |" in (out / "detectors.md").read_text()
    assert "best library-based detector" in capsys.readouterr().out


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
