"""How many times ``LibraryNetwork.fit`` runs the model: once when the HAPs fit ``cache_bytes``, and the
same libraries and readouts as the streamed fit either way."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin import fitting
from libnet_plugin.thresholds import choose_thresholds, choose_thresholds_from_haps

N, BATCH = 300, 64


@pytest.fixture(scope="module")
def conv():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 6, 3), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 3 * 3, 5)).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(12, 2, 9, 9, generator=g)
    return centres[torch.randint(0, 12, (N,), generator=g)] + 0.3 * torch.randn(N, 2, 9, 9, generator=g)


class Rows:
    """Counts the inputs that pass through the model (a forward hook): passes over the data = rows / N."""

    def __init__(self, model: nn.Module):
        self.n = 0
        self.handle = model.register_forward_hook(self)

    def __call__(self, module, args, output):
        self.n += int(args[0].shape[0])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _fit(model, x, **kw):
    with Rows(model) as rows:
        net = lnp.LibraryNetwork(model, ["1", "3"], batch_size=BATCH, **kw).fit(x, progress=False)
    return net, rows.n


def _same_fit(a, b):
    assert a.thresholds_ == b.thresholds_
    for l in a.layers:
        la, lb = a.libraries_[l], b.libraries_[l]
        assert torch.equal(la.node_indices, lb.node_indices), l
        torch.testing.assert_close(la.nodes, lb.nodes, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(a.readouts_[l].weight, b.readouts_[l].weight, rtol=1e-5, atol=1e-5)


def test_one_pass_and_two_pass_fits_agree(conv, data):
    one, rows_one = _fit(conv, data, thresholds=0.8)  # the default budget holds these HAPs
    two, rows_two = _fit(conv, data, thresholds=0.8, cache_bytes=0)
    assert (rows_one, rows_two) == (N, 2 * N)
    assert (one.n_forward_passes_, two.n_forward_passes_) == (1, 2)
    assert one.cache_bytes_ > 0 and two.cache_bytes_ == 0
    assert 5 < one.library_sizes_["1"] < N
    _same_fit(one, two)


def test_auto_thresholds_take_their_sample_from_the_one_pass(conv, data):
    auto = {"target": 0.2, "sample_size": 120}
    one, rows_one = _fit(conv, data, thresholds="auto", auto_thresholds=auto)
    assert rows_one == N and one.n_forward_passes_ == 1
    # the one pass's sample is the reservoir sample choose_thresholds draws from the data
    sampled, _ = _fit(conv, data, thresholds=choose_thresholds(
        one.probe, data, one.new_library, layers=one.layers, batch_size=BATCH, **auto)[0])
    _same_fit(one, sampled)


def test_streamed_auto_thresholds_take_their_sample_from_the_first_pass(conv, data, caplog):
    # over the budget: the first pass holds its first batches until they hold the sample (two batches of 64
    # for 120 inputs), chooses theta from them (sizes extrapolated to all 300 inputs), and goes on
    auto = {"target": 0.2, "sample_size": 120}
    with caplog.at_level(logging.INFO, logger="libnet_plugin.network"):
        two, rows = _fit(conv, data, thresholds="auto", auto_thresholds=auto, cache_bytes=0)
    assert rows == 2 * N and two.n_forward_passes_ == 2
    assert "fit: 2 forward passes" in caplog.text and "sample from the first 128 inputs" in caplog.text
    net = lnp.LibraryNetwork(conv, ["1", "3"], batch_size=BATCH)
    first = [net.run(b).haps for b in data[:128].split(BATCH)]
    thetas, report = choose_thresholds_from_haps(first, net.new_library, layers=net.layers,
                                                                batch_size=BATCH, n_total=N, **auto)
    assert report == two.auto_thresholds_report_ and report["1"]["n_train"] == N
    assert two.thresholds_ == thetas
    fixed, _ = _fit(conv, data, thresholds=thetas, cache_bytes=0)  # the libraries of those thetas
    _same_fit(two, fixed)


def test_haps_over_the_budget_stream_after_the_sample(conv, data):
    auto = {"target": 0.2, "sample_size": 120}
    # a Tensor's size is known: the first batch shows that the HAPs will not fit; the sample's two batches
    # are held, the rest streams
    small, rows = _fit(conv, data, thresholds="auto", auto_thresholds=auto, cache_bytes=10_000)
    assert rows == 2 * N and small.n_forward_passes_ == 2
    ref, _ = _fit(conv, data, thresholds=small.thresholds_, cache_bytes=0)
    _same_fit(small, ref)
    # a list of batches is not sized: its batches are held until they exceed the budget (and hold the
    # sample), its size counted without the model; the second pass reads the two batches that fit
    batches = list(data.split(BATCH))
    budget = 2 * BATCH * sum(small.hap_dims_.values()) * 4  # two batches fit, the third does not
    listed, rows = _fit(conv, batches, thresholds="auto", auto_thresholds=auto, cache_bytes=budget)
    assert rows == 2 * N - 2 * BATCH and listed.n_forward_passes_ == 2
    assert listed.auto_thresholds_report_["1"]["sample_size"] == 120
    assert listed.auto_thresholds_report_["1"]["n_train"] == N
    ref, _ = _fit(conv, data, thresholds=listed.thresholds_, cache_bytes=0)
    _same_fit(listed, ref)


def test_forward_passes_in_memory_streamed_and_streamed_with_auto_thresholds(conv, data):
    calls = []
    handle = conv.register_forward_pre_hook(lambda module, args: calls.append(int(args[0].shape[0])))
    try:
        for kw, passes in (({"thresholds": 0.8}, 1), ({"thresholds": 0.8, "cache_bytes": 0}, 2),
                           ({"thresholds": "auto", "auto_thresholds": {"sample_size": 100}, "cache_bytes": 0}, 2)):
            calls.clear()
            net = lnp.LibraryNetwork(conv, ["1", "3"], batch_size=BATCH, **kw).fit(data, progress=False)
            assert len(calls) == passes * len(data.split(BATCH)) and sum(calls) == passes * N, kw
            assert net.n_forward_passes_ == passes
    finally:
        handle.remove()


def test_the_batches_that_fit_are_not_run_again(conv, data, caplog):
    ref, _ = _fit(conv, data, thresholds=0.8, cache_bytes=0)
    budget = 2 * BATCH * sum(ref.hap_dims_.values()) * 4
    with caplog.at_level(logging.INFO, logger="libnet_plugin.network"):
        part, rows = _fit(conv, data, thresholds=0.8, cache_bytes=budget)
    assert rows == 2 * N - 2 * BATCH and part.n_forward_passes_ == 2
    assert "read the first 128 inputs' from memory and ran the model on 172" in caplog.text
    _same_fit(part, ref)


def test_pass_count_is_logged(conv, data, caplog):
    with caplog.at_level(logging.INFO, logger="libnet_plugin.network"):
        _fit(conv, data, thresholds=0.8)
        _fit(conv, data, thresholds=0.8, cache_bytes=0)
    lines = [r.getMessage() for r in caplog.records if r.name == "libnet_plugin.network"]
    assert "fit: 1 forward pass of the model over the 300 training inputs" in lines[0]
    assert "kept" in lines[0] and "of the" in lines[0]  # where the default budget came from
    assert "fit: 2 forward passes" in lines[1] and "streamed" in lines[1]


def test_budget_setting(conv, data, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="cache_bytes"):
        lnp.LibraryNetwork(conv, ["1"], cache_bytes="half")
    with pytest.raises(ValueError, match="cache_bytes"):
        lnp.LibraryNetwork(conv, ["1"], cache_bytes=-1)
    budget, source = fitting.default_cache_bytes("cpu")
    assert budget > 0 and "available" in source
    monkeypatch.setattr(fitting, "_available_host_memory", lambda: None)
    assert fitting.default_cache_bytes("cpu") == (fitting.CACHE_FALLBACK_BYTES,
                                                  "the fixed default (the available memory could not be read)")
    net, _ = _fit(conv, data[:100], thresholds=0.8)
    assert net.cache_bytes == "auto" and net.cache_bytes_ == fitting.CACHE_FALLBACK_BYTES  # not rewritten
    net.save(tmp_path / "net.lnp")
    assert "cache_bytes" not in net.config()
    back = lnp.LibraryNetwork.load(tmp_path / "net.lnp", conv)
    torch.testing.assert_close(back.predict_scores(data[:8])["3"], net.predict_scores(data[:8])["3"])


def test_the_bisection_from_the_gram_matrix_builds_the_same_libraries(conv, data, monkeypatch):
    from libnet_plugin import thresholds

    auto = {"target": 0.2, "sample_size": 120}
    fast, _ = _fit(conv, data, thresholds="auto", auto_thresholds=auto)
    net = lnp.LibraryNetwork(conv, ["1", "3"])
    for l in ("1", "3"):
        h = torch.cat([net.run(b).haps[l] for b in data.split(BATCH)])
        gram = thresholds._sample_gram(net.new_library, l, h)
        assert gram is not None and gram.shape == (N, N)
        for theta in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99):
            lib = net.new_library(l, theta)
            lib.partial_fit(h)
            rule = thresholds.leader_within(gram, theta)
            assert rule.tolist() == lib.node_indices.tolist(), (l, theta)
    monkeypatch.setattr(thresholds, "GRAM_MAX_ROWS", 0)  # a library built per bisection step, as before
    slow, _ = _fit(conv, data, thresholds="auto", auto_thresholds=auto)
    assert slow.auto_thresholds_report_ == fast.auto_thresholds_report_
    _same_fit(slow, fast)


@pytest.mark.parametrize("dtype, tol", [("float16", 2e-3), ("bfloat16", 1e-2)])
def test_haps_kept_in_half_precision(conv, data, dtype, tol):
    ref, _ = _fit(conv, data, thresholds=0.8)
    with Rows(conv) as rows:
        half = lnp.LibraryNetwork(conv, ["1", "3"], batch_size=BATCH, thresholds=0.8).fit(data, cache_dtype=dtype)
    assert rows.n == N and half.n_forward_passes_ == 1
    for l in half.layers:  # pass 1 feeds the libraries the float32 HAPs: the same nodes
        assert torch.equal(half.libraries_[l].node_indices, ref.libraries_[l].node_indices)
        assert torch.equal(half.libraries_[l].nodes, ref.libraries_[l].nodes)
        # pass 2's cosines carry the rounding of the kept HAPs (the error docs/scale.md states)
        w, w0 = half.readouts_[l].weight, ref.readouts_[l].weight
        assert 0 < float((w - w0).abs().max()) <= tol * float(w0.abs().max()), l
    # twice as many batches fit a budget in half precision: four of float16 where two of float32 fit
    budget = 2 * BATCH * sum(ref.hap_dims_.values()) * 4
    with Rows(conv) as rows:
        part = lnp.LibraryNetwork(conv, ["1", "3"], batch_size=BATCH, thresholds=0.8,
                                  cache_bytes=budget).fit(data, cache_dtype=dtype)
    assert rows.n == 2 * N - 4 * BATCH and part.n_forward_passes_ == 2


def test_cache_dtype_checks(conv, data):
    net = lnp.LibraryNetwork(conv, ["1", "3"], batch_size=BATCH, thresholds=0.8)
    with pytest.raises(ValueError, match="cache_dtype must be one of"):
        net.fit(data, cache_dtype="int8")
    with pytest.raises(ValueError, match="layer '1': activations up to .* overflow cache_dtype=float16"):
        net.fit(data * 1e5, cache_dtype="float16")
    assert not net.is_fitted  # all or nothing
    assert fitting.check_cache_dtype(torch.bfloat16) is torch.bfloat16
