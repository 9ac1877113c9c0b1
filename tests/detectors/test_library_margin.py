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
    c = fitted.n_classes_
    stats = sum((c * d + d * d) * 8 + c for d in dims)  # means, precision, present
    # the whitening factor W [d, r] of each precision (full rank here: r = d), means @ W [C, r], ||means @ W||^2 [C]
    stats += sum((d * d + c * d + c) * 8 for d in dims)
    assert s.memory_bytes() == stats  # no clean reference yet
    s.set_reference(s.features(fitted, fitted.probe.run(x[:50])))
    assert s.memory_bytes() == stats + 50 * len(dims) * 8


def test_library_distance_pools_conv_channels_and_projects_wide_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(120, 1, 6, 6)
    net = lnp.LibraryNetwork(model, ["0", "3"], thresholds=0.99).fit(x)
    s = LibraryDistanceScore(max_dim=4).fit(net)
    assert s.gaussians_["0"]["channels"] == 3 and s.gaussians_["0"]["means"].shape[1] == 3
    assert s.gaussians_["3"]["channels"] == 0 and s.gaussians_["3"]["proj"].shape == (5, 4)
    assert s.features(net, net.probe.run(x[:6])).shape == (6, 2)
    # a projected library stores sketches, not whole activations: no channel averages there
    sketched = lnp.LibraryNetwork(model, ["0"], thresholds=0.99, library="projected",
                                  library_options={"n_components": 12}).fit(x)
    st = LibraryDistanceScore(max_dim=64).fit(sketched).gaussians_["0"]
    assert st["channels"] == 0 and st["proj"] is None and st["means"].shape[1] == 12
    with pytest.raises(ShapeMismatchError, match="cannot average 48 features over 5 channels"):
        LibraryDistanceScore(pool={"0": 5}).fit(net)


def test_the_pooled_channels_come_from_the_saved_file_at_load():
    """A loaded detector keeps the channels averaged at fit (a network that cannot tell them, such as an ONNX
    Runtime model's, gets them from the file); a file without them (older) reads them from the modules."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()
    x = torch.rand(120, 1, 6, 6)
    net = lnp.LibraryNetwork(model, ["0", "3"], thresholds=0.99).fit(x)
    s = LibraryDistanceScore().fit(net)
    s.set_reference(s.features(net, net.probe.run(x[:60])))
    config, state, r = s.config(), s.state_dict(), net.probe.run(x[60:70])
    assert config["channels_"] == {"0": 3, "3": 0}
    for saved in (config, {k: v for k, v in config.items() if k != "channels_"}):
        back = LibraryDistanceScore()
        back.load_state_dict(state, net, saved)
        assert back.gaussians_["0"]["channels"] == 3
        torch.testing.assert_close(back.score(net, r), s.score(net, r))
    told = LibraryDistanceScore()  # the saved channels win over what the modules say
    told.load_state_dict(state, net, {**config, "channels_": {"0": 0, "3": 0}})
    assert told.gaussians_["0"]["channels"] == 0 and told.gaussians_["0"]["means"].shape[1] == 48
    for bad in ({"0": "3"}, {"0": -1}, [3, 0], {"0": True}):
        with pytest.raises(lnp.SaveFormatError, match="saved channels_"):
            LibraryDistanceScore().load_state_dict(state, net, {**config, "channels_": bad})


def test_library_margin_on_the_fly_gram_equals_precomputed(fitted, mlp_data):
    x, _ = mlp_data
    r = fitted.probe.run(x[:40])
    a = LibraryMarginScore(span=5).fit(fitted).features(fitted, r)
    b = LibraryMarginScore(span=5, max_gram_nodes=1).fit(fitted).features(fitted, r)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_subspace_is_the_residual_from_the_nodes_principal_subspace(fitted, mlp_data):
    """numpy's SVD of the centred nodes gives the same residual; the rank is clipped to what the nodes span."""
    x, _ = mlp_data
    layers = ["fc2", "out"]
    s = LibraryDistanceScore(layers=layers, features=("distance", "subspace"), rank=3).fit(fitted)
    assert s.feature_names() == ["fc2/distance", "fc2/subspace", "out/distance", "out/subspace"]
    r = fitted.probe.run(x[:40])
    f = s.features(fitted, r)
    for i, l in enumerate(layers):
        lib = fitted.libraries_[l]
        nodes = lib.nodes.double().numpy()
        mean = nodes.mean(axis=0)
        u = np.linalg.svd(nodes - mean, full_matrices=False)[2][:3].T
        g = lib.transform(r.haps[l]).double().numpy() - mean
        np.testing.assert_allclose(f[:, 2 * i + 1].numpy(), ((g - g @ u @ u.T) ** 2).sum(axis=1), rtol=1e-7, atol=1e-10)
    # the nodes themselves lie in the subspace of every direction they span: residual 0
    lib = fitted.libraries_["fc2"]
    full = LibraryDistanceScore(layers=["fc2"], features=("subspace",), rank=10_000).fit(fitted)
    assert full.subspaces_["fc2"][1].shape[1] <= min(lib.size - 1, lib.nodes.shape[1])
    res = full.subspace_residual(lib, "fc2", lib.nodes)
    assert float(res.max()) < 1e-9
    # and the rank is part of the settings a saved detector carries
    assert full.config()["rank"] == 10_000


def test_subspace_uses_the_whole_conv_activation_and_is_differentiable():
    """On a conv layer the feature sees positions: a mirrored image has other residuals, same channel means."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 3)).eval()
    x = torch.rand(200, 1, 6, 6)
    x[:, :, :, :3] *= 0.1  # the training images are dark on the left
    net = lnp.LibraryNetwork(model, ["0"], thresholds=0.99).fit(x)
    s = LibraryDistanceScore(features=("subspace",), rank=5).fit(net)
    clean = s.features(net, net.probe.run(x[:50]))[:, 0]
    flipped = s.features(net, net.probe.run(x[:50].flip(-1)))[:, 0]
    assert float(flipped.median()) > 3 * float(clean.median())
    xg = x[:4].clone().requires_grad_(True)
    out = s.features(net, net.probe.run(xg, grad=True)).sum()
    (grad,) = torch.autograd.grad(out, xg)
    assert bool(grad.abs().sum() > 0)


def test_subspace_survives_save_and_load(fitted, mlp_data, tmp_path):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-fusion",
                                  settings={"features": ["distance", "subspace"], "rank": 4}).calibrate(x[:200])
    path = tmp_path / "d.safetensors"
    det.save(path)
    back = lnp.ConsistencyDetector.load(path, fitted.model)
    torch.testing.assert_close(back.score(x[200:]), det.score(x[200:]))
    assert back.scorer.rank == 4 and "fc1/subspace" in back.scorer.feature_names()


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="rank"):
        LibraryMarginScore(features=("subspace",), rank=0)


def test_residual_is_stable_under_float32_rounding_of_the_activations():
    """The residual of inputs that their nodes span sits near ``ridge``; it must follow the activation, not the
    rounding: activations moved by a few float32 ulps (what another batch size or CPU kernel gives) move it by
    less than 1e-6. The scores then stay within 1e-3 and no flag flips, except where a feature lies within
    rounding of a clean reference value: a conformal rank is a step function, so such an input moves by one
    rank (measured: 1 of 2,000 inputs, through the margin feature; the float32 residual moved 1,898 of 4,000)."""
    from libnet_plugin.probe import ProbeResult

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    g = torch.Generator().manual_seed(1)
    # theta 0.8 on 6-dimensional inputs: the libraries hold more nodes than the layers have units (full span)
    net = lnp.LibraryNetwork(model, ["0", "2", "4"], thresholds=0.8).fit(torch.randn(240, 6, generator=g))
    assert all(net.libraries_[l].size > net.libraries_[l].nodes.shape[1] for l in ("0", "2"))
    det = lnp.ConsistencyDetector(net, method="library-margin").calibrate(torch.randn(200, 6, generator=g), fpr=0.1)
    x = torch.cat([torch.randn(750, 6, generator=g), 6.0 * torch.randn(250, 6, generator=g)])
    r = net.run(x)
    ulps = {l: 1.0 + 4 * torch.finfo(torch.float32).eps * torch.randn(h.shape, generator=g) for l, h in r.haps.items()}
    moved = ProbeResult(r.outputs, {l: h * ulps[l] for l, h in r.haps.items()})
    s = det.scorer
    f, f_moved = s.features(net, r), s.features(net, moved)
    residual = [i for i, name in enumerate(s.feature_names()) if name.endswith("/residual")]
    assert float(f[:, residual].median()) < 1e-2  # the regime where float32 rounding used to decide the value
    assert float((f - f_moved)[:, residual].abs().max()) < 1e-6
    score, score_moved = s.score(net, r), s.score(net, moved)
    assert float(((score - score_moved).abs() > 1e-3).float().mean()) <= 0.003
    assert torch.equal(score > det.threshold_, score_moved > det.threshold_)
    # and an input scored alone gets the score it gets in a batch
    alone, batch = torch.cat([det.score(x[i:i + 1]) for i in range(0, 200)]), det.score(x[:200])
    assert float(((alone - batch).abs() > 1e-3).float().mean()) <= 0.005
    assert torch.equal(alone > det.threshold_, batch > det.threshold_)


def test_residual_is_the_same_from_one_product_with_every_node_and_from_gathered_nodes():
    """With its Gram matrix kept, a small library's residual reads every node's float64 dot product from one
    product; without it, from each input's gathered nodes: the same values up to float64 rounding."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(12, 40), nn.ReLU(), nn.Linear(40, 3)).eval()
    x = torch.randn(300, 12)
    net = lnp.LibraryNetwork(model, ["1"], thresholds=0.7).fit(x)
    assert 8 < net.library_sizes_["1"] <= 20 * 8  # the one-product path at span 8
    dense = LibraryMarginScore(layers=["1"], span=8, features=["residual"]).fit(net)
    gathered = LibraryMarginScore(layers=["1"], span=8, features=["residual"], max_gram_nodes=1).fit(net)
    r = net.run(torch.randn(25, 12))
    a, b = dense.features(net, r), gathered.features(net, r)
    assert a.dtype == torch.float64 and float(a.abs().max()) > 1e-3
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
