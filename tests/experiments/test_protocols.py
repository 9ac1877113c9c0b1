"""Attack protocols, attack-set files and detection metrics (experiments.protocols)."""

from __future__ import annotations

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
from libnet_plugin.experiments.sweep import (
    Evidence,
)


def _evidence(answers, labels, scores):
    n = len(answers)
    outputs = torch.nn.functional.one_hot(torch.tensor(answers), 3).float()
    return Evidence(outputs=outputs, labels=torch.tensor(labels),
                      scores={(l, 0.5, 20): torch.tensor(v, dtype=torch.float32).reshape(n, 3)
                              for l, v in scores.items()})


def test_detection_metrics_extremes():
    clean, attacked = torch.tensor([0.9, 0.8, 0.95, 0.85]), torch.tensor([0.1, 0.2])
    m = detection_metrics(clean, attacked)
    assert m["auroc"] == 1.0 and m["tpr_at_fpr"] == 1.0 and (m["n_clean"], m["n_attacked"]) == (4, 2)
    assert detection_metrics(attacked, clean)["auroc"] == 0.0
    assert math.isnan(detection_metrics(clean, torch.tensor([]))["auroc"])


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
