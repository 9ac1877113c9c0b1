"""k-th nearest neighbour on normalised penultimate features ("knn-normalized", Sun et al. 2022) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import KNNNormalizedScore


def penultimate(mlp, x) -> np.ndarray:
    return torch.relu(mlp.fc2(torch.relu(mlp.fc1(x)))).detach().double().numpy()


def unit(a):
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


@pytest.mark.parametrize("k", [None, 1, 7])
def test_knn_normalized_is_the_kth_neighbour_distance(fitted, mlp, mlp_data, k):
    score = KNNNormalizedScore(k=k).fit(fitted, mlp_data)
    assert score.k_ == (1 if k is None else k)  # 300 training inputs: round(300 / 1000) -> at least 1
    x = torch.randn(13, 10, generator=torch.Generator().manual_seed(7))
    tr, q = unit(penultimate(mlp, mlp_data[0])), unit(penultimate(mlp, x))
    d = np.sqrt(((q[:, None, :] - tr[None, :, :]) ** 2).sum(axis=2))
    want = np.sort(d, axis=1)[:, score.k_ - 1]
    torch.testing.assert_close(score.score(fitted, fitted.run(x)), torch.tensor(want, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)


def test_chunks_give_the_same_neighbours(fitted, mlp_data, monkeypatch):
    x = torch.randn(9, 10, generator=torch.Generator().manual_seed(8))
    whole = KNNNormalizedScore(k=25).fit(fitted, mlp_data).score(fitted, fitted.run(x))
    monkeypatch.setattr(KNNNormalizedScore, "chunk", 7)
    chunked = KNNNormalizedScore(k=25).fit(fitted, mlp_data).score(fitted, fitted.run(x))
    torch.testing.assert_close(chunked, whole)


def test_named_layer_and_activation_need_no_classifier(mlp, mlp_data):
    x = mlp_data[0]
    net = lnp.LibraryNetwork(mlp, ["fc1", "fc2"], thresholds=0.9).fit(x)
    score = KNNNormalizedScore(k=3, layer="fc1", activation="none").fit(net, mlp_data)
    assert score.pen_.classifier is None and score.state_dict().keys() == {"train"}
    tr, q = unit(mlp.fc1(x).detach().double().numpy()), unit(mlp.fc1(x[:4]).detach().double().numpy())
    d = np.sqrt(((q[:, None, :] - tr[None, :, :]) ** 2).sum(axis=2).clip(min=0))
    torch.testing.assert_close(score.score(net, net.run(x[:4])),
                               torch.tensor(np.sort(d, axis=1)[:, 2], dtype=torch.float32), rtol=1e-4, atol=1e-3)
