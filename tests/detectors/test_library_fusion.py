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
