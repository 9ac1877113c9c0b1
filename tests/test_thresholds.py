"""thresholds='auto': reservoir sampling, library-size extrapolation, and the per-layer theta chooser."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.thresholds import choose_thresholds, predicted_library_size, reservoir_sample


def _clustered(n: int, d: int = 12, k: int = 30, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    return centres[torch.randint(0, k, (n,), generator=g)] + 0.4 * torch.randn(n, d, generator=g)


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 5)).eval()


# ------------------------------------------------------------------------------------------------
# reservoir sampling
# ------------------------------------------------------------------------------------------------


def test_reservoir_sample_keeps_order_and_content():
    x = torch.arange(1000.0).reshape(1000, 1)
    s, idx, total = reservoir_sample(x, 50, seed=3, batch_size=64)
    assert total == 1000 and s.shape == (50, 1)
    assert bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(s[:, 0], idx.double().float())
    again, idx2, _ = reservoir_sample([x[i:i + 7] for i in range(0, 1000, 7)], 50, seed=3)
    assert torch.equal(idx, idx2)  # the sample does not depend on how the stream is batched


def test_reservoir_sample_is_uniform():
    counts = np.zeros(40)
    for seed in range(400):
        _, idx, _ = reservoir_sample(torch.zeros(40, 1), 10, seed=seed, batch_size=9)
        counts[idx.numpy()] += 1
    # each input is drawn with probability 1/4: 100 times in expectation, sd about 8.7
    assert counts.min() > 65 and counts.max() < 135, counts


def test_reservoir_sample_small_stream_and_bad_input():
    s, idx, total = reservoir_sample(torch.ones(5, 2), 100)
    assert s.shape == (5, 2) and total == 5 and idx.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="empty"):
        reservoir_sample(torch.ones(0, 2), 10)
    with pytest.raises(ValueError, match="sample_size must be a positive integer"):
        reservoir_sample(torch.ones(5, 2), 0)


# ------------------------------------------------------------------------------------------------
# extrapolation of library sizes
# ------------------------------------------------------------------------------------------------


def test_predicted_library_size():
    every_4th = torch.zeros(400, dtype=torch.bool)
    every_4th[::4] = True
    assert predicted_library_size(every_4th, 400) == 100  # whole set: exact
    assert predicted_library_size(every_4th, 800) == pytest.approx(200, rel=0.02)  # linear growth
    saturated = torch.zeros(400, dtype=torch.bool)
    saturated[:20] = True
    assert predicted_library_size(saturated, 4000) == pytest.approx(20)  # no growth: stays
    sqrt_growth = torch.zeros(10_000, dtype=torch.bool)
    sqrt_growth[(torch.arange(1, 101) ** 2) - 1] = True  # M(n) = sqrt(n)
    assert predicted_library_size(sqrt_growth[:2500], 10_000) == pytest.approx(100, rel=0.05)


# ------------------------------------------------------------------------------------------------
# choosing theta
# ------------------------------------------------------------------------------------------------


def test_whole_set_sample_hits_the_target(model):
    x = _clustered(800)
    net = lnp.LibraryNetwork(model, ["0", "2", "4"], thresholds="auto",
                             auto_thresholds={"target": 0.1, "sample_size": 800}).fit(x)
    for layer, size in net.library_sizes_.items():
        assert abs(size - 80) <= 80 * 0.05, (layer, size, net.thresholds_)
    report = net.auto_thresholds_report_
    assert report["0"]["target_size"] == 80 and report["0"]["n_train"] == 800
    assert report["0"]["theta"] == net.thresholds_["0"]


def test_sampled_target_extrapolates_within_a_factor(model):
    x = _clustered(3000, seed=1)
    net = lnp.LibraryNetwork(model, ["0", "2"], thresholds="auto",
                             auto_thresholds={"target": 300, "sample_size": 600}).fit(x)
    for layer, size in net.library_sizes_.items():
        assert 200 <= size <= 450, (layer, size)
        assert net.auto_thresholds_report_[layer]["sample_size"] == 600


def test_bigger_target_means_higher_theta(model):
    x = _clustered(600, seed=2)
    net = lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.5)
    small, _ = choose_thresholds(net.probe, x, net.new_library, layers=net.layers, target=0.05, sample_size=600)
    large, _ = choose_thresholds(net.probe, x, net.new_library, layers=net.layers, target=0.3, sample_size=600)
    per_layer, report = choose_thresholds(net.probe, x, net.new_library, layers=net.layers,
                                          target={"0": 0.05, "2": 0.3}, sample_size=600)
    assert report["2"]["theta"] == per_layer["2"] and report["0"]["sample_size"] == 600
    assert all(large[l] > small[l] for l in ("0", "2"))
    assert per_layer == {"0": small["0"], "2": large["2"]}
    assert all(0.0 < t <= 1.0 for t in large.values())


@pytest.mark.parametrize("target, message", [
    (0.0, "fraction of the training set in \\(0, 1\\)"), (1.0, "fraction"), (1.5, "fraction"), (0, "must be >= 1"),
    ("10%", "fraction"), (True, "fraction"), ({"0": 0.1}, "missing \\['2'\\]"),
    ({"0": 0.1, "2": 0.1, "9": 0.1}, "unknown \\['9'\\]"),
])
def test_bad_targets(model, target, message):
    net = lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.5)
    with pytest.raises(ValueError, match=message):
        choose_thresholds(net.probe, _clustered(50), net.new_library, layers=net.layers, target=target, sample_size=50)


def test_one_shot_iterator_is_refused(model):
    x = _clustered(100)
    net = lnp.LibraryNetwork(model, ["0"], thresholds="auto", auto_thresholds={"sample_size": 30}, cache_bytes=0)
    with pytest.raises(ValueError, match="re-iterable"):  # streamed after the sample's first batch
        net.fit(iter([x[:50], x[50:]]))
    # data no larger than the sample: the first pass holds all of it for the sample, and both passes read it
    whole = lnp.LibraryNetwork(model, ["0"], thresholds="auto", cache_bytes=0).fit(iter([x[:50], x[50:]]))
    assert whole.n_forward_passes_ == 1
    with pytest.raises(ValueError, match="one-shot iterator"):  # its HAPs exceed the budget
        lnp.LibraryNetwork(model, ["0"], thresholds="auto", auto_thresholds={"sample_size": 30},
                           cache_bytes=100).fit(iter([x[:50], x[50:]]))
    # within the budget (the default) the one forward pass is kept: a one-shot iterator is enough
    one = lnp.LibraryNetwork(model, ["0"], thresholds="auto").fit(iter([x[:50], x[50:]]))
    ref = lnp.LibraryNetwork(model, ["0"], thresholds="auto", cache_bytes=0).fit([x[:50], x[50:]])
    # without a budget the 100 inputs are held all the same: the sample of 1,000 wants every one of them
    assert one.n_forward_passes_ == 1 and ref.n_forward_passes_ == 1
    assert one.thresholds_ == ref.thresholds_


def test_auto_thresholds_on_a_conv_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    x = torch.rand(300, 1, 8, 8)
    net = lnp.LibraryNetwork(model, ["0", "3"], thresholds="auto", auto_thresholds={"target": 30}).fit(x)
    assert all(abs(s - 30) <= 3 for s in net.library_sizes_.values()), net.library_sizes_


@pytest.mark.parametrize("given", ["auto", 0.8, {"0": 0.7, "2": 0.9}])
def test_fit_never_rewrites_the_thresholds_hyperparameter(tmp_path, model, given):
    x = _clustered(300, seed=3)
    options = {"auto_thresholds": {"target": 0.2, "sample_size": 300}} if given == "auto" else {}
    net = lnp.LibraryNetwork(model, ["0", "2"], thresholds=given, **options)
    kept = dict(given) if isinstance(given, dict) else given
    net.fit(x)
    assert net.thresholds == kept
    assert sorted(net.thresholds_) == ["0", "2"] and all(0.0 < t <= 1.0 for t in net.thresholds_.values())
    if given != "auto":
        expected = given if isinstance(given, dict) else {"0": given, "2": given}
        assert net.thresholds_ == expected
    net.fit(x)  # a refit starts from the hyperparameter again, not from the first fit's thetas
    assert net.thresholds == kept
    net.save(tmp_path / "net.lnp")
    back = lnp.LibraryNetwork.load(tmp_path / "net.lnp", model)
    assert back.thresholds == kept and back.thresholds_ == net.thresholds_
    with pytest.raises(lnp.NotFittedError):
        lnp.LibraryNetwork(model, ["0", "2"], thresholds=given).thresholds_


def test_a_theta_next_to_one_is_not_rounded_into_keeping_everything():
    """Near-duplicate activations need a theta within 1e-4 of 1: rounding it to 4 decimals would store all of them."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 16, generator=g)
    x = base + 1e-3 * torch.randn(400, 16, generator=g)  # cosines to each other above 0.9999
    model = nn.Sequential(nn.Identity(), nn.Linear(16, 3))
    net = lnp.LibraryNetwork(model, ["0"], thresholds="auto",
                             auto_thresholds={"target": 40, "sample_size": 400}).fit(x)
    assert net.library_sizes_["0"] <= 80, net.library_sizes_
    assert net.thresholds_["0"] < 1.0


def test_a_library_holding_most_of_the_training_set_warns(model):
    x = torch.randn(100, 12, generator=torch.Generator().manual_seed(6))
    with pytest.warns(lnp.errors.LibraryTooLargeWarning, match=r"keeps \d+ of its 100 training inputs \(more than half\)"):
        lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.999).fit(x)
