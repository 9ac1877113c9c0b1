"""Library sweeps (experiments.sweep) equal one LibraryNetwork per threshold; evidence-derived numbers equal the network's own."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.experiments.sweep import (
    agreement,
    agreement_table,
    compute_evidence,
    confusion_indices,
    cpl_from_evidence,
    fit_library_sweep,
    theta_grid,
    theta_key,
)
from libnet_plugin.plugins import make_probe

LAYERS = ["0", "2", "4"]


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x_train, x_test = torch.randn(200, 12), torch.randn(80, 12)
    y_test = torch.randint(0, 4, (80,))
    thresholds = {"0": [0.5, 0.7, 0.85], "2": [0.6, 0.8], "4": [0.9, 0.95]}
    probe = make_probe(model, LAYERS, "cpu")
    sweep = fit_library_sweep(probe, x_train, thresholds, batch_size=64, progress=False)
    return model, x_train, x_test, y_test, thresholds, probe, sweep


def _network(model, x_train, thr, top_k=3):
    return lnp.LibraryNetwork(model, LAYERS, thresholds=thr, top_k=top_k, batch_size=64).fit(x_train, progress=False)


def test_theta_grid_and_key():
    assert theta_grid(0.5, 0.9, 0.05) == [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9]
    assert theta_key(0.1 + 0.2) == theta_key(0.3) == 0.3
    with pytest.raises(ValueError, match="whole number of steps"):
        theta_grid(0.5, 0.9, 0.3)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        theta_key(1.5)


def test_sweep_equals_one_network_per_threshold(setup):
    model, x_train, _, _, thresholds, _, sweep = setup
    for t0, t2, t4 in [(0.5, 0.6, 0.9), (0.85, 0.8, 0.95)]:
        net = _network(model, x_train, {"0": t0, "2": t2, "4": t4})
        for layer, t in zip(LAYERS, (t0, t2, t4)):
            assert sweep.library(layer, t).size == net.library_sizes_[layer]
            assert torch.equal(sweep.library(layer, t).node_indices, net.libraries_[layer].node_indices)
            torch.testing.assert_close(sweep.readout(layer, t).weight, net.readouts_[layer].weight)
    sizes = sweep.sizes()
    assert sizes["0"][0.5] <= sizes["0"][0.7] <= sizes["0"][0.85]
    assert sweep.n_train == 200 and sweep.n_classes == 4 and sweep.train_answers.shape == (200,)


def test_sweep_second_pass_without_cache_gives_the_same_readouts(setup):
    model, x_train, _, _, thresholds, probe, sweep = setup
    streamed = fit_library_sweep(probe, x_train, thresholds, batch_size=64, cache_bytes=0, progress=False)
    for layer in LAYERS:
        for t in thresholds[layer]:
            torch.testing.assert_close(streamed.readout(layer, t).weight, sweep.readout(layer, t).weight)


def test_evidence_numbers_equal_the_networks_own(setup):
    model, x_train, x_test, y_test, _, probe, sweep = setup
    thr = {"0": 0.7, "2": 0.8, "4": 0.95}
    net = _network(model, x_train, thr)
    req = [(l, t, k) for l, t in thr.items() for k in (3, 20)]
    ev = compute_evidence(sweep, probe, (x_test, y_test), req, batch_size=32, progress=False)
    assert torch.equal(ev.labels, y_test)
    for l in LAYERS:
        torch.testing.assert_close(ev.get(l, thr[l], 3), net.predict_scores(x_test, top_k=3)[l])
    report = net.evaluate((x_test, y_test))
    table = agreement_table(sweep, ev, top_k=3, thresholds={l: [t] for l, t in thr.items()})
    for l in LAYERS:
        row = next(r for r in table[l] if r["theta"] == thr[l])
        assert row["size"] == net.library_sizes_[l]
        for key in ("top1_agreement", "top3_agreement", "accuracy"):
            assert row[key] == pytest.approx(report[l][key])
    net_ci = net.confusion_index((x_test, y_test))
    for l in LAYERS:
        got = confusion_indices(ev, [l], thr[l], top_k=3)[l]
        torch.testing.assert_close(got, net_ci[l], equal_nan=True)
    torch.testing.assert_close(cpl_from_evidence(ev, thr, top_k=20), net.consistency(x_test, top_k=20))


def test_to_network_reuses_the_sweep(setup):
    model, x_train, x_test, _, _, _, sweep = setup
    thr = {"0": 0.85, "2": 0.6, "4": 0.9}
    built = sweep.to_network(model, thr, top_k=3)
    fitted = _network(model, x_train, thr)
    assert built.library_sizes_ == fitted.library_sizes_
    for l in LAYERS:
        torch.testing.assert_close(built.predict_scores(x_test)[l], fitted.predict_scores(x_test)[l])
    with pytest.raises(KeyError, match="fitted"):
        sweep.to_network(model, {"0": 0.55, "2": 0.6, "4": 0.9})


def test_unknown_threshold_and_layer_are_named(setup):
    _, _, x_test, _, _, probe, sweep = setup
    with pytest.raises(KeyError, match=r"0\.33.*fitted: \[0\.5, 0\.7, 0\.85\]"):
        sweep.library("0", 0.33)
    with pytest.raises(KeyError, match="not part of this sweep"):
        sweep.library("9", 0.5)
    with pytest.raises(ValueError, match="does not probe"):
        fit_library_sweep(probe, x_test, {"nope": [0.5]})
    with pytest.raises(ValueError, match="at least one threshold"):
        fit_library_sweep(probe, x_test, {"0": [0.5]})


def test_exemplars_point_at_training_inputs_behind_the_nodes(setup):
    _, x_train, _, _, _, probe, sweep = setup
    haps = probe.run(x_train[:5]).haps
    idx, cos = sweep.exemplars(haps, "0", 0.85, k=2)
    assert idx.shape == cos.shape == (5, 2)
    # an input stored as a node is its own best exemplar, at cosine 1
    stored = sweep.library("0", 0.85).node_indices[:5]
    own = sweep.exemplars(probe.run(x_train[stored]).haps, "0", 0.85, k=1)
    assert torch.equal(own[0][:, 0], stored)
    torch.testing.assert_close(own[1][:, 0], torch.ones(5), atol=1e-5, rtol=0)
    assert bool((cos[:, 0] >= cos[:, 1]).all())


def test_agreement_by_hand():
    p = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 0.0]])
    got = agreement(p, answers=torch.tensor([0, 1, 0]), labels=torch.tensor([0, 3, 2]))
    assert got == {"top1_agreement": pytest.approx(1 / 3), "top3_agreement": 1.0,
                   "accuracy": pytest.approx(2 / 3), "n": 3}
    assert math.isnan(agreement(p, torch.tensor([0, 1, 0]))["accuracy"])
