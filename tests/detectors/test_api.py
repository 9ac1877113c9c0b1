"""The detector hook and contract: every built-in served by name, a third-party plugin's score wrapped, bad settings."""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import (
    DeepKNNScore,
    LibraryDistanceScore,
    LibraryMarginScore,
    MahalanobisScore,
)
from libnet_plugin.errors import LibnetError
from libnet_plugin.plugins import make_detector, registered_detectors


def test_hook_serves_every_detector_and_lists_them():
    pm = lnp.get_plugin_manager(autoload=False)
    from libnet_plugin.builtins import DETECTORS

    kinds = dict(DETECTORS)  # the registry: every built-in, the default library-fusion included
    for name, cls in kinds.items():
        assert isinstance(make_detector(name, {}, pm), cls)
    assert make_detector("cpl", {"top_k": 7}, pm).top_k == 7
    listed = registered_detectors(pm)
    from libnet_plugin.builtins import CANDIDATES
    from libnet_plugin.detectors import MNIST_CANDIDATES

    assert {name for name, _ in listed.values()} >= {"cpl", "library-margin", "library-distance", "msp",
                                                      "mahalanobis", "knn", *(set(kinds) - set(CANDIDATES))}
    # the development candidates are compared by label only
    assert {name for name, _ in MNIST_CANDIDATES.values()} >= set(CANDIDATES)
    assert not {name for name, _ in listed.values()} & set(CANDIDATES)
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
    assert LibraryDistanceScore().layer_features == ("distance",)
    assert LibraryDistanceScore(features=("margin", "distance")).layer_features == ("margin", "distance")
    with pytest.warns(FutureWarning, match="layer_features"):
        assert LibraryDistanceScore().features_ == ("distance",)
