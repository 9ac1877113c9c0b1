"""Tests of libnet_plugin.experiments.minimal_attacks (CW-L2, DeepFool) on a small MLP trained here on
scikit-learn's 8x8 digits (seeded, about a second)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from libnet_plugin.experiments.attacks import pgd_torch
from libnet_plugin.experiments.minimal_attacks import cw_l2, deepfool
from libnet_plugin.experiments.models import predict_labels

N_ATTACK = 120


def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).div(16.0).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


def _train_mlp(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(150):  # full batch
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net.eval()


@pytest.fixture(scope="module")
def trained():
    x, y = _digits()
    net = _train_mlp(x[:1200], y[:1200])
    x_te, y_te = x[1200:1200 + N_ATTACK], y[1200:1200 + N_ATTACK]
    ok = predict_labels(net, x_te) == y_te
    assert float(ok.float().mean()) > 0.9  # the model is a real classifier
    return net, x_te, y_te, ok


@pytest.fixture(scope="module")
def adversarial(trained):
    net, x, y, _ = trained
    return {"cw": cw_l2(net, x, y), "deepfool": deepfool(net, x, y),
            "pgd": pgd_torch(net, x, y, eps=0.3, nb_iter=40, seed=0)}


def _success_and_l2(net, x, y, ok, x_adv):
    fooled = (predict_labels(net, x_adv) != y) & ok
    l2 = (x_adv - x).flatten(1).norm(dim=1)
    return float(fooled.sum()) / float(ok.sum()), l2[fooled]


@pytest.mark.parametrize("name, min_success", [("cw", 0.97), ("deepfool", 0.97), ("pgd", 0.9)])
def test_attacks_fool_the_model(trained, adversarial, name, min_success):
    net, x, y, ok = trained
    success, _ = _success_and_l2(net, x, y, ok, adversarial[name])
    assert success >= min_success  # measured: 1.0 for all three on this model


def test_minimal_attacks_find_smaller_perturbations_than_pgd(trained, adversarial):
    net, x, y, ok = trained
    _, l2_pgd = _success_and_l2(net, x, y, ok, adversarial["pgd"])
    _, l2_cw = _success_and_l2(net, x, y, ok, adversarial["cw"])
    _, l2_df = _success_and_l2(net, x, y, ok, adversarial["deepfool"])
    assert float(l2_df.median()) < 0.5 * float(l2_pgd.median())
    assert float(l2_cw.median()) < 0.5 * float(l2_pgd.median())
    # measured medians: DeepFool 0.36, CW (short default schedule) 0.52, PGD 1.96


@pytest.mark.parametrize("name", ["cw", "deepfool"])
def test_outputs_in_range_with_shape_dtype_device(trained, adversarial, name):
    _, x, _, _ = trained
    x_adv = adversarial[name]
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


@pytest.mark.parametrize("attack", [cw_l2, deepfool])
def test_deterministic_and_batching_independent_for_deepfool(trained, adversarial, attack):
    net, x, y, _ = trained
    key = "cw" if attack is cw_l2 else "deepfool"
    kwargs = {"max_iterations": 20} if attack is cw_l2 else {}
    again = attack(net, x[:40], y[:40], **kwargs)
    assert torch.equal(again, attack(net, x[:40], y[:40], **kwargs))
    if attack is deepfool:  # no batch-level early stopping: the batching does not matter
        assert torch.allclose(attack(net, x, y, batch_size=7), adversarial[key], atol=1e-5)


@pytest.mark.parametrize("attack", [cw_l2, deepfool])
def test_model_mode_and_requires_grad_restored(trained, attack):
    _, x, y, _ = trained
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 10)).train()
    model[1].bias.requires_grad_(False)
    kwargs = {"max_iterations": 10} if attack is cw_l2 else {}
    first = attack(model, x[:10], y[:10], **kwargs)
    assert model.training
    assert torch.equal(first, attack(model, x[:10], y[:10], **kwargs))  # dropout was off during the attack
    assert model[1].weight.requires_grad and not model[1].bias.requires_grad and model[4].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    attack(model, x[:10], y[:10], **kwargs)
    assert not model.training


def test_deepfool_leaves_misclassified_inputs_and_uses_predictions_without_labels(trained):
    net, x, y, ok = trained
    pred = predict_labels(net, x[:30])
    wrong = (pred + 1) % 10  # labels the model does not predict: already "fooled"
    assert torch.equal(deepfool(net, x[:30], wrong), x[:30])
    assert torch.equal(deepfool(net, x[:30], None), deepfool(net, x[:30], pred))
    assert torch.equal(cw_l2(net, x[:30], None, max_iterations=10),
                       cw_l2(net, x[:30], pred, max_iterations=10))


def test_deepfool_overshoot_and_candidate_classes(trained):
    net, x, y, ok = trained
    small = deepfool(net, x, y, overshoot=0.0)
    large = deepfool(net, x, y, overshoot=0.5)
    l2_small = (small - x).flatten(1).norm(dim=1)[ok]
    l2_large = (large - x).flatten(1).norm(dim=1)[ok]
    assert float(l2_large.median()) > float(l2_small.median())
    two = deepfool(net, x, y, num_classes=2)  # only the runner-up class is a candidate
    assert float(((predict_labels(net, two) != y) & ok).sum()) >= 0.9 * float(ok.sum())


def test_progress_bar_and_empty_input(trained, capsys):
    net, x, y, _ = trained
    deepfool(net, x[:5], y[:5], progress=True)
    assert "DeepFool" in capsys.readouterr().err
    empty = x[:0]
    assert deepfool(net, empty, y[:0]).shape == empty.shape
    assert cw_l2(net, empty, y[:0]).shape == empty.shape


@pytest.mark.parametrize("attack", [cw_l2, deepfool])
def test_bad_inputs_give_clear_errors(trained, attack):
    net, x, y, _ = trained
    with pytest.raises(TypeError, match="nn.Module"):
        attack(lambda t: t, x, y)
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        attack(net, x * 255, y)
    with pytest.raises(ValueError, match="floating-point tensor"):
        attack(net, (x * 16).long(), y)
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        attack(net, x, y[:3])
    with pytest.raises(ValueError, match="y must be an integer tensor"):
        attack(net, x, y.float())
    with pytest.raises(ValueError, match=r"labels y must lie in 0\.\.9"):
        attack(net, x[:4], torch.tensor([0, 1, 2, 10]))
    with pytest.raises(ValueError, match="batch_size"):
        attack(net, x, y, batch_size=0)
    with pytest.raises(ValueError, match="finite"):
        bad = x[:4].clone()
        bad[0, 0, 0, 0] = float("nan")
        attack(net, bad, y[:4])


def test_bad_hyper_parameters():
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    x, y = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="confidence"):
        cw_l2(net, x, y, confidence=-1)
    with pytest.raises(ValueError, match="initial_const"):
        cw_l2(net, x, y, initial_const=0)
    with pytest.raises(TypeError, match="learning_rate must be a number"):
        cw_l2(net, x, y, learning_rate="fast")
    with pytest.raises(ValueError, match="binary_search_steps"):
        cw_l2(net, x, y, binary_search_steps=0)
    with pytest.raises(ValueError, match="max_iterations"):
        cw_l2(net, x, y, max_iterations=1.5)
    with pytest.raises(ValueError, match="overshoot"):
        deepfool(net, x, y, overshoot=float("inf"))
    with pytest.raises(ValueError, match="max_iter"):
        deepfool(net, x, y, max_iter=0)
    with pytest.raises(ValueError, match="num_classes=10 exceeds the model's 3 outputs"):
        deepfool(net, x, y)
    with pytest.raises(ValueError, match="num_classes"):
        deepfool(net, x, y, num_classes=1)
    with pytest.raises(ValueError, match=r"\[B, C\] scores"):
        deepfool(nn.Flatten(0), x, y, num_classes=2)
