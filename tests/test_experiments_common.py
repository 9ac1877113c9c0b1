"""Tests of libnet_plugin.experiments.sweep: sweeps equal per-theta LibraryNetworks, evidence-derived numbers
equal the network's own, protocol selection, attack-set files, atomic report writing."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.errors import SaveFormatError
from libnet_plugin.experiments.protocols import (
    ProtocolSettings,
    check_pgd_backends,
    detection_metrics,
    evaluate_protocol,
    generate_attack_sets,
    load_attack_sets,
    save_attack_sets,
    to_model_space,
)
from libnet_plugin.experiments.report import (
    StageTimer,
    ensure_writable_dir,
    markdown_table,
    write_json_atomic,
)
from libnet_plugin.experiments.sweep import (
    Evidence,
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


def test_detection_metrics_extremes():
    clean, attacked = torch.tensor([0.9, 0.8, 0.95, 0.85]), torch.tensor([0.1, 0.2])
    m = detection_metrics(clean, attacked)
    assert m["auroc"] == 1.0 and m["tpr_at_fpr"] == 1.0 and (m["n_clean"], m["n_attacked"]) == (4, 2)
    assert detection_metrics(attacked, clean)["auroc"] == 0.0
    assert math.isnan(detection_metrics(clean, torch.tensor([]))["auroc"])


def _evidence(answers, labels, scores):
    n = len(answers)
    outputs = torch.nn.functional.one_hot(torch.tensor(answers), 3).float()
    return Evidence(outputs=outputs, labels=torch.tensor(labels),
                      scores={(l, 0.5, 20): torch.tensor(v, dtype=torch.float32).reshape(n, 3)
                              for l, v in scores.items()})


def test_evaluate_protocol_selects_per_protocol():
    # 4 inputs, labels 0 1 2 0; the model gets input 3 wrong on clean data.
    agree = [[9, 0, 0], [0, 9, 0], [0, 0, 9], [0, 9, 0]]
    clean = _evidence([0, 1, 2, 1], [0, 1, 2, 0], {"a": agree, "b": agree})
    # attacked: input 0 fooled (answer 2), input 1 not fooled, input 2 fooled, input 3 (wrong on clean) stays wrong
    disagree = [[0, 0, 9], [0, 9, 0], [9, 0, 0], [0, 9, 0]]
    adv = _evidence([2, 1, 0, 1], [0, 1, 2, 0], {"a": agree, "b": disagree})
    sets = {"S": {"a": 0.5, "b": 0.5}}
    std = evaluate_protocol("standard", clean, {0.1: adv}, sets)
    paper = evaluate_protocol("paper", clean, {0.1: adv}, sets)
    assert std["epsilons"][0]["n_selected"] == 2  # inputs 0 and 2: correct on clean and fooled
    assert paper["epsilons"][0]["n_selected"] == 4
    assert std["epsilons"][0]["answers_changed"] == 0.5
    row = std["results"]["S"][0]
    assert (row["n_clean"], row["n_attacked"]) == (2, 2) and row["auroc"] == 1.0
    assert std["cpl_clean_selected"]["S"][0.1].shape == (2,)
    assert paper["results"]["S"][0]["auroc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="protocol"):
        evaluate_protocol("other", clean, {0.1: adv}, sets)


def test_to_model_space_round_trip():
    x = torch.rand(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    n = to_model_space(x, "pixels", "normalized", mean, std)
    torch.testing.assert_close(n[:, 1], (x[:, 1] - 0.5) / 0.25)
    torch.testing.assert_close(to_model_space(n, "normalized", "pixels", mean, std), x)
    assert to_model_space(x, "pixels", "pixels", mean, std) is x
    with pytest.raises(ValueError, match="space"):
        to_model_space(x, "pixel", "normalized", mean, std)


def test_protocol_settings_checks():
    p = ProtocolSettings("standard", [0.3], 10)
    assert p.step(0.3) == pytest.approx(2.5 * 0.3 / 40) and p.space == "pixels"
    assert ProtocolSettings("paper", [0.3], 10).step(0.3) == 0.01
    with pytest.raises(ValueError, match="protocol"):
        ProtocolSettings("fgsm", [0.3], 10)
    with pytest.raises(ValueError, match="epsilons"):
        ProtocolSettings("paper", [], 10)


def test_attack_sets_generate_save_and_load(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 24 * 24, 10)).eval()
    x, y = torch.rand(6, 1, 28, 28), torch.randint(0, 10, (6,))
    sets = []
    for proto in (ProtocolSettings("paper", [0.2, 0.5], 4, nb_iter=3),
                  ProtocolSettings("standard", [0.1], 5, nb_iter=3, backend="torch")):
        sets += generate_attack_sets(proto, net, x, y, mean=0.1307, std=0.3081, progress=False)
    assert [(s.protocol, s.epsilon, s.x_adv.shape[0]) for s in sets] == [("paper", 0.2, 4), ("paper", 0.5, 4),
                                                                          ("standard", 0.1, 5)]
    assert float(sets[0].x_adv.min()) >= 0.0 and float(sets[0].x_adv.max()) <= 1.0
    assert float((sets[2].x_adv - x[:5]).abs().max()) <= 0.1 + 1e-6
    path = save_attack_sets(tmp_path / "a.safetensors", sets, {"seed": 3})
    loaded, meta = load_attack_sets(path)
    assert meta == {"seed": 3}
    for a, b in zip(sets, loaded):
        assert (a.protocol, a.epsilon, a.space) == (b.protocol, b.epsilon, b.space)
        assert torch.equal(a.x_adv, b.x_adv) and torch.equal(a.indices, b.indices)
    with pytest.raises(ValueError, match="two attack sets"):
        save_attack_sets(tmp_path / "b.safetensors", [sets[0], sets[0]], {})
    other = tmp_path / "net.lnp"
    lnp.LibraryNetwork(nn.Sequential(nn.Linear(3, 2)), ["0"], 0.9).fit(torch.randn(8, 3)).save(other)
    with pytest.raises(SaveFormatError, match="AttackSets"):
        load_attack_sets(other)


def test_pgd_backends_agree():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10)).eval()
    got = check_pgd_backends(net, torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,)), eps=0.3,
                               mean=0.1307, std=0.3081, nb_iter=3)
    assert got["advertorch_available"] and got["max_abs_diff"] < 1e-6 and got["answers_equal"]


def test_writable_dir_checks(tmp_path):
    assert ensure_writable_dir(tmp_path / "a" / "b").is_dir()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        ensure_writable_dir(f)
    with pytest.raises(PermissionError, match="not writable"):
        ensure_writable_dir(f / "sub")


def test_json_report_is_atomic_and_nan_free(tmp_path):
    path = tmp_path / "report.json"
    write_json_atomic(path, {"a": torch.tensor([1.0, float("nan")]), 0.25: (1, float("inf"))})
    assert json.loads(path.read_text()) == {"a": [1.0, None], "0.25": [1, None]}
    with pytest.raises(TypeError, match="JSON"):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text())["a"] == [1.0, None]  # the earlier report is intact
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temp file left behind


def test_markdown_table_and_timer():
    assert markdown_table(["x", "y"], [[0.12345, None]]).splitlines()[-1] == "| 0.123 | n/a |"
    with pytest.raises(ValueError, match="cells"):
        markdown_table(["x"], [[1, 2]])
    msgs = []
    timer = StageTimer(log=msgs.append)
    with timer.stage("a"):
        pass
    with pytest.raises(RuntimeError):
        with timer.stage("b"):
            raise RuntimeError("boom")
    assert set(timer.as_dict()) == {"a", "b", "total"} and len(msgs) == 4
