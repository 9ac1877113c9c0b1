"""The Mahalanobis baseline ("mahalanobis") against numpy, and its pooling."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors import (
    MahalanobisScore,
)


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


def test_cached_whitening_gives_the_plain_formula_pooled_flat_and_folded():
    """Scoring through the factor cached at fit (and rebuilt at load) equals (f - mu)^T S^+ (f - mu), up to
    the float32 rounding of a folded projection."""
    from libnet_plugin.detectors._features import class_distances, whitening_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 40), nn.ReLU(),
                          nn.Linear(40, 5)).eval()
    x = torch.rand(9, 1, 6, 6)  # 9 rows: every covariance has rank <= 8
    net = lnp.LibraryNetwork(model, ["0", "2", "5"], thresholds=0.9).fit(x)
    s = MahalanobisScore(max_dim=32).fit(net, x)  # "0" pooled, "2" projected 48 -> 32 (folded), "5" flat
    assert s._white["2"]["folded"] and not s._white["5"]["folded"]
    r = net.run(torch.rand(9, 1, 6, 6))
    for layer, rtol in (("0", 1e-9), ("2", 1e-4), ("5", 1e-9)):
        f = s._feature(layer, r.haps[layer]).double()
        want = class_distances(f, s.means_[layer], s.precision_[layer], s.class_present_[layer])
        got = s.layer_distances(layer, r.haps[layer])
        fin = want.isfinite()
        # booleans: only absent classes are infinite (masked_fill), whatever the rounding
        assert torch.equal(fin, got.isfinite()), layer
        assert torch.allclose(got[fin], want[fin], rtol=rtol, atol=rtol * want[fin].abs().max().item()), layer
    saved = sum(t.numel() * t.element_size() for t in s.state_dict().values())
    assert whitening_bytes(s._white) > 0 and s.memory_bytes() == saved + whitening_bytes(s._white)
