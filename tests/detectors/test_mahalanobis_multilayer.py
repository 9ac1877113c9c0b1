"""Lee et al.'s multi-layer Mahalanobis ("mahalanobis-multilayer") against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libnet_plugin.detectors import MultiLayerMahalanobisScore


def layer_features(mlp, x) -> dict:
    h1 = mlp.fc1(x)
    h2 = mlp.fc2(torch.relu(h1))
    out = mlp.out(torch.relu(h2))
    return {k: v.detach().double().numpy() for k, v in {"fc1": h1, "fc2": h2, "out": out}.items()}


def np_min_distance(f_train, classes, f, n_classes=4):
    means = np.stack([f_train[classes == c].mean(axis=0) for c in range(n_classes)])
    centred = f_train - means[classes]
    prec = np.linalg.inv(centred.T @ centred / len(f_train))
    d = np.stack([np.einsum("bi,ij,bj->b", f - m, prec, f - m) for m in means], axis=1)
    return d.min(axis=1)


@pytest.mark.parametrize("labels", ["auto", "model"])
def test_layers_combined_by_z_scores_on_the_training_inputs(fitted, mlp, mlp_data, labels):
    x_tr, y_tr = mlp_data
    # fc2 and out: full-rank covariances (fc1's, 10 inputs -> 32 units, is singular, where the pseudo-inverse
    # depends on rounding noise around its cutoff)
    score = MultiLayerMahalanobisScore(layers=["fc2", "out"], labels=labels).fit(fitted, mlp_data)
    f_tr = layer_features(mlp, x_tr)
    classes = y_tr.numpy() if labels == "auto" else f_tr["out"].argmax(axis=1)
    x = torch.randn(11, 10, generator=torch.Generator().manual_seed(9)) * 2
    f = layer_features(mlp, x)
    want = np.zeros(11)
    for layer in ("fc2", "out"):
        d_tr = np_min_distance(f_tr[layer], classes, f_tr[layer])
        want += (np_min_distance(f_tr[layer], classes, f[layer]) - d_tr.mean()) / d_tr.std()
    torch.testing.assert_close(score.score(fitted, fitted.run(x)), torch.tensor(want, dtype=torch.float32),
                               rtol=1e-4, atol=1e-3)


def test_true_labels_are_required_when_asked(fitted, mlp_data):
    with pytest.raises(ValueError, match="labels='true' needs training data with labels"):
        MultiLayerMahalanobisScore(labels="true").fit(fitted, mlp_data[0])
    assert not MultiLayerMahalanobisScore().fuses
