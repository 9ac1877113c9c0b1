"""The library-based scores "library-margin" and "library-distance": hand-computed cases, numpy references, pooling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors import (
    LibraryDistanceScore,
    LibraryMarginScore,
    node_classes,
)
from libnet_plugin.errors import ShapeMismatchError


def test_library_margin_hand_computed(two_node_net):
    net = two_node_net
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
