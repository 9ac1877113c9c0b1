"""The recommended score "library-fusion": library distances plus output features, fused conformally."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import LibraryDistanceScore, LibraryFusionScore


def test_features_are_the_library_distances_then_the_output_features(fitted, mlp_data):
    x, _ = mlp_data
    layers = ["fc2", "out"]
    fusion = LibraryFusionScore(layers=layers, outputs=("confidence", "logit-margin")).fit(fitted)
    distance = LibraryDistanceScore(layers=layers).fit(fitted)
    assert fusion.feature_names() == ["fc2/distance", "out/distance", "output/confidence", "output/logit-margin"]
    r = fitted.probe.run(x[:20])
    f = fusion.features(fitted, r)
    torch.testing.assert_close(f[:, :2], distance.features(fitted, r))
    z = r.outputs.double().numpy()
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(f[:, 2].numpy(), 1 - p.max(axis=1), rtol=1e-9)
    top2 = np.sort(z, axis=1)[:, -2:]
    np.testing.assert_allclose(f[:, 3].numpy(), -(top2[:, 1] - top2[:, 0]), rtol=1e-9)


def test_without_output_features_it_is_library_distance(fitted, mlp_data):
    x, _ = mlp_data
    a = lnp.ConsistencyDetector(fitted, method="library-fusion", settings={"outputs": []}).calibrate(x[:100])
    b = lnp.ConsistencyDetector(fitted, method="library-distance").calibrate(x[:100])
    torch.testing.assert_close(a.score(x[100:140]), b.score(x[100:140]))
    assert a.threshold_ == b.threshold_


def test_confidence_raises_the_score_of_low_confidence_inputs(fitted, mlp_data):
    """At equal library distance p-values, an input the model is unsure of scores higher."""
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-fusion", settings={"layers": ["fc2"]}).calibrate(x[:200])
    feats = det.scorer.features(fitted, fitted.probe.run(x[200:]))
    p = det.scorer.fusion.p_values(feats)
    fused = -torch.log(p).sum(dim=1)
    torch.testing.assert_close(det.score(x[200:]).double(), fused.float().double())
    assert det.differentiable


@pytest.mark.parametrize("outputs", [("nope",), ("confidence", "confidence")])
def test_bad_outputs_are_refused(outputs):
    with pytest.raises(ValueError, match="outputs must be distinct names among"):
        LibraryFusionScore(outputs=outputs)


def test_min_combine_is_minus_log_of_the_smallest_p_value(fitted, mlp_data):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-fusion", settings={"combine": "min"}).calibrate(x[:200])
    p = det.scorer.fusion.p_values(det.scorer.features(fitted, fitted.probe.run(x[200:])))
    torch.testing.assert_close(det.score(x[200:]), (-torch.log(p.amin(dim=1))).float())
    with pytest.raises(ValueError, match="combine must be"):
        LibraryFusionScore(combine="mean")


def test_distance_margin_is_the_answers_distance_minus_the_nearest_other_class(fitted, mlp_data):
    x, _ = mlp_data
    layers = ["fc2", "out"]
    score = LibraryDistanceScore(layers=layers, features=("distance", "distance-margin")).fit(fitted)
    assert score.feature_names() == ["fc2/distance", "fc2/distance-margin", "out/distance", "out/distance-margin"]
    r = fitted.probe.run(x[:40])
    f = score.features(fitted, r)
    answers = r.answers
    for i, l in enumerate(layers):
        d = score.class_distances(fitted.libraries_[l], l, r.haps[l]).numpy()
        a = answers.numpy()
        own = d[np.arange(len(a)), a]
        others = d.copy()
        others[np.arange(len(a)), a] = np.inf
        np.testing.assert_allclose(f[:, 2 * i].numpy(), own, rtol=1e-9)
        np.testing.assert_allclose(f[:, 2 * i + 1].numpy(), own - others.min(axis=1), rtol=1e-9)
        # negative exactly where the answer class is the layer's nearest class
        assert ((f[:, 2 * i + 1] < 0).numpy() == (d.argmin(axis=1) == a)).all()


def test_distance_margin_is_zero_without_another_class():
    d = torch.tensor([[1.0, float("inf")], [3.0, 2.0]], dtype=torch.float64)
    out = LibraryDistanceScore.distance_margin(d, torch.tensor([0, 0]))
    assert out.tolist() == [0.0, 1.0]


def test_correlation_weights_share_one_weight_among_copies():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(400, 1, generator=g), torch.rand(400, 1, generator=g)
    w = LibraryFusionScore.correlation_weights(torch.cat([a, a, a, b], dim=1).clamp(min=1e-3))
    assert w[:3].sum().item() == pytest.approx(1.0, abs=0.05)
    assert w[3].item() == pytest.approx(1.0, abs=0.2)
    torch.testing.assert_close(w[0], w[1])
    # a constant feature is uncorrelated with the rest
    w = LibraryFusionScore.correlation_weights(torch.cat([a, torch.full_like(a, 0.5)], dim=1))
    assert w.tolist() == [1.0, 1.0]


def test_weighted_combine_uses_the_calibration_weights_and_survives_save(fitted, mlp_data, tmp_path):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-fusion", settings={"combine": "weighted"}).calibrate(x[:200])
    scorer = det.scorer
    cal = scorer.features(fitted, fitted.probe.run(x[:200]))
    w = LibraryFusionScore.correlation_weights(scorer.fusion.fit_p_values(cal))
    scorer.set_reference(cal)
    torch.testing.assert_close(scorer.weights_, w)
    assert w.shape == (len(scorer.feature_names()),) and bool((w > 0).all() and (w <= 1).all())
    p = scorer.fusion.p_values(scorer.features(fitted, fitted.probe.run(x[200:])))
    expected = (-torch.log(p) * w).sum(dim=1).float()
    torch.testing.assert_close(det.score(x[200:]), expected)
    # the output features repeat one another: together they weigh less than two independent features
    assert float(w[-2:].sum()) < 2.0
    path = tmp_path / "d.safetensors"
    det.save(path)
    back = lnp.ConsistencyDetector.load(path, fitted.model)
    torch.testing.assert_close(back.score(x[200:]), det.score(x[200:]))
    # the adaptive attacks' gradient is the weighted standardised features'
    xg = x[200:210].clone().requires_grad_(True)
    det.score(xg).sum().backward()
    assert xg.grad is not None and bool(xg.grad.abs().sum() > 0)


def test_weighted_combine_needs_calibration(fitted, mlp_data):
    x, _ = mlp_data
    scorer = LibraryFusionScore(combine="weighted").fit(fitted)
    with pytest.raises(lnp.NotFittedError, match="weights"):
        scorer.combine(torch.full((3, len(scorer.feature_names())), 0.5, dtype=torch.float64))


def test_combine_on_refits_the_weights_on_the_reference_it_is_given(fitted, mlp_data):
    """The held-out FPR check recalibrates on half of the clean data: weighted Fisher takes its weights from
    that half, not from the whole calibration set; Fisher does not depend on the reference."""
    x, _ = mlp_data
    weighted = lnp.ConsistencyDetector(fitted, method="library-fusion",
                                       settings={"combine": "weighted"}).calibrate(x[:200]).scorer
    p = weighted.fusion.p_values(weighted.features(fitted, fitted.probe.run(x[200:])))
    torch.testing.assert_close(weighted.combine_on(p, weighted.fusion.fit_p_values(
        weighted.features(fitted, fitted.probe.run(x[:200])))), weighted.combine(p))
    ref = p[:50]
    expected = -(torch.log(p) * LibraryFusionScore.correlation_weights(ref)).sum(dim=1)
    torch.testing.assert_close(weighted.combine_on(p, ref), expected)
    assert not torch.allclose(weighted.combine_on(p, ref), weighted.combine(p))
    fisher = lnp.ConsistencyDetector(fitted, method="library-fusion").calibrate(x[:200]).scorer
    torch.testing.assert_close(fisher.combine_on(p, ref), fisher.combine(p))


def test_truncated_combine_counts_only_the_p_values_below_tau_and_survives_save(fitted, mlp_data, tmp_path):
    x, _ = mlp_data
    settings = {"combine": "truncated", "truncation": 0.2}
    det = lnp.ConsistencyDetector(fitted, method="library-fusion", settings=settings).calibrate(x[:200])
    f = det.scorer.features(fitted, fitted.probe.run(x[200:]))
    p = det.scorer.fusion.p_values(f)
    expected = torch.where(p < 0.2, torch.log(0.2 / p), torch.zeros_like(p)).sum(dim=1)
    assert bool((expected > 0).any()) and bool((expected == 0).any())  # both cases occur in this batch
    torch.testing.assert_close(det.score(x[200:]).double(), expected.float().double())
    typical = torch.full((2, len(det.scorer.feature_names())), 0.5, dtype=torch.float64)
    assert det.scorer.combine(typical).tolist() == [0.0, 0.0]  # no p-value below tau: nothing counts
    assert det.scorer.config()["truncation"] == 0.2
    path = tmp_path / "d.safetensors"
    det.save(path)
    back = lnp.ConsistencyDetector.load(path, fitted.model)
    assert back.scorer.truncation == 0.2
    torch.testing.assert_close(back.score(x[200:]), det.score(x[200:]))
    xg = x[200:210].clone().requires_grad_(True)  # the adaptive attacks' gradient: the standardised features'
    det.score(xg).sum().backward()
    assert xg.grad is not None and bool(xg.grad.abs().sum() > 0)


def test_truncation_one_is_fishers_sum(fitted, mlp_data):
    x, _ = mlp_data
    a = lnp.ConsistencyDetector(fitted, method="library-fusion",
                                settings={"combine": "truncated", "truncation": 1.0}).calibrate(x[:200])
    b = lnp.ConsistencyDetector(fitted, method="library-fusion").calibrate(x[:200])
    torch.testing.assert_close(a.score(x[200:]), b.score(x[200:]))


@pytest.mark.parametrize("bad", [0, 0.0, 1.5, -0.1, "0.1", True, float("nan")])
def test_bad_truncations_are_refused(bad):
    with pytest.raises(ValueError, match=r"truncation must be a number in \(0, 1\]"):
        LibraryFusionScore(combine="truncated", truncation=bad)
