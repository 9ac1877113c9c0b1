"""Tests of the advertorch compatibility shim and of libnet_plugin.experiments.attacks, on tiny models."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libnet_plugin.experiments import _advertorch_compat as compat
from libnet_plugin.experiments.attacks import (
    attack_paper_protocol,
    attack_standard_protocol,
    pgd_advertorch,
    pgd_torch,
)
from libnet_plugin.experiments.data import MNIST_MEAN, MNIST_STD
from libnet_plugin.experiments.models import MnistNet


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _tiny_data(n: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 4, generator=g)
    x[: n // 4] = 0.0  # inputs on the lower clip bound, as the MNIST background
    x[n // 4: n // 2] = 1.0  # and on the upper one
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


class _HandMade(nn.Module):
    """Two features in [0, 1]: class 0 iff x0 > x1 (logits x0 - x1 and x1 - x0)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))

    def forward(self, x):
        return self.lin(x)


# ------------------------------------------------------------------------------------------------
# compatibility shim
# ------------------------------------------------------------------------------------------------


def test_ensure_advertorch_restores_zero_gradients_and_imports():
    advertorch = compat.ensure_advertorch()
    assert compat.ensure_advertorch() is advertorch  # idempotent
    gradcheck = importlib.import_module("torch.autograd.gradcheck")
    assert callable(gradcheck.zero_gradients)
    from torch.autograd.gradcheck import zero_gradients

    t = torch.ones(3, requires_grad=True)
    (t * 2).sum().backward()
    zero_gradients([t, [t]])
    assert torch.equal(t.grad, torch.zeros(3))
    attacks = importlib.import_module("advertorch.attacks")
    assert hasattr(attacks, "LinfPGDAttack")
    importlib.import_module("advertorch.attacks.fast_adaptive_boundary")


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor:UserWarning")  # advertorch's own
def test_torchvision_stub_only_when_needed_and_not_left_behind():
    compat.ensure_advertorch()
    try:
        importlib.import_module("torchvision")
        real = True
    except Exception:
        real = False
    assert compat.USED_TORCHVISION_STUB is (not real)
    if real:
        return
    # the stand-in was only visible while advertorch was imported
    assert "torchvision" not in sys.modules
    with pytest.raises(ImportError):
        importlib.import_module("torchvision")
    # ...but advertorch kept its transforms: the JPEG filter works on a smooth image
    from advertorch.defenses import JPEGFilter

    x = torch.full((2, 3, 16, 16), 0.5)
    out = JPEGFilter(quality=90)(x)
    assert out.shape == x.shape and (out - x).abs().max() < 0.02
    gray = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    assert JPEGFilter(quality=95)(gray).shape == gray.shape


def test_stub_modules_are_marked_and_explicit():
    tv, tf = compat.make_torchvision_stub()
    assert tv.__libnet_stub__ and tf.__libnet_stub__ and tv.transforms is tf
    with pytest.raises(AttributeError, match="stand-in"):
        tv.models
    pil = tf.ToPILImage()(torch.tensor([[[0.0, 1.0]]]))
    assert pil.mode == "L" and pil.tobytes() == bytes([0, 255])
    back = tf.ToTensor()(pil)
    assert back.shape == (1, 1, 2) and back.flatten().tolist() == [0.0, 1.0]
    with pytest.raises(TypeError, match="stand-in"):
        tf.ToPILImage()(torch.zeros(2, 2))


# ------------------------------------------------------------------------------------------------
# PGD
# ------------------------------------------------------------------------------------------------


def test_pgd_torch_equals_advertorch_same_seed():
    model = _tiny_model()
    x, y = _tiny_data()
    kwargs = dict(eps=0.2, nb_iter=15, eps_iter=0.02, clip_min=0.0, clip_max=1.0, seed=1,
                  batch_size=10)
    ours = pgd_torch(model, x, y, **kwargs)
    theirs = pgd_advertorch(model, x, y, **kwargs)
    assert (ours - theirs).abs().max().item() <= 1e-5
    assert (ours - x).abs().max().item() > 0.1  # the attack did move the inputs


def test_pgd_torch_equals_advertorch_same_delta_init():
    compat.ensure_advertorch()
    from advertorch.attacks.iterative_projected_gradient import perturb_iterative

    model = _tiny_model(1).eval()
    x, y = _tiny_data(seed=1)
    eps = 0.15
    delta0 = (torch.rand(x.shape, generator=torch.Generator().manual_seed(7)) * 2 - 1) * eps
    delta0 = torch.clamp(x + delta0, 0.0, 1.0) - x
    ours = pgd_torch(model, x, y, eps=eps, nb_iter=12, eps_iter=0.01, delta_init=delta0, seed=None)
    theirs = perturb_iterative(x, y, model, nb_iter=12, eps=eps, eps_iter=0.01,
                               loss_fn=nn.CrossEntropyLoss(reduction="sum"),
                               delta_init=delta0.clone(), clip_min=0.0, clip_max=1.0)
    assert (ours - theirs.detach()).abs().max().item() <= 1e-5


def test_pgd_respects_eps_ball_and_clip_range_and_raises_loss():
    model = _tiny_model(2)
    x, y = _tiny_data(40, seed=2)
    for eps in (0.05, 0.3):
        x_adv = pgd_torch(model, x, y, eps=eps, nb_iter=10, seed=0)
        assert ((x_adv - x).abs() <= eps + 1e-6).all()
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
        with torch.no_grad():
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y)
    # a different clip range is honoured too
    x_adv = pgd_torch(model, x * 2 - 1, y, eps=0.5, clip_min=-1.0, clip_max=1.0, seed=0, nb_iter=5)
    assert x_adv.min() >= -1.0 and x_adv.max() <= 1.0


def test_pgd_leaves_model_as_it_was():
    model = _tiny_model(3).train()
    model[1].weight.requires_grad_(False)  # a user-frozen parameter stays frozen
    x, y = _tiny_data(8, seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pgd_torch(model, x, y, eps=0.1, nb_iter=3, seed=0)
    pgd_advertorch(model, x, y, eps=0.1, nb_iter=3, seed=0)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == [False, True, True, True]
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_pgd_seed_is_deterministic_and_preserves_global_rng():
    model = _tiny_model()
    x, y = _tiny_data()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = pgd_torch(model, x, y, eps=0.1, nb_iter=2, eps_iter=0.05, seed=5)
    b = pgd_advertorch(model, x, y, eps=0.1, nb_iter=2, eps_iter=0.05, seed=5)
    assert torch.equal(torch.rand(3), expected_next)  # neither touched the global generator
    assert torch.equal(a, pgd_torch(model, x, y, eps=0.1, nb_iter=2, eps_iter=0.05, seed=5))
    assert not torch.equal(a, pgd_torch(model, x, y, eps=0.1, nb_iter=2, eps_iter=0.05, seed=6))
    assert (a - b).abs().max() <= 1e-5


def test_pgd_bad_input():
    model = _tiny_model()
    x, y = _tiny_data()
    with pytest.raises(ValueError, match="eps"):
        pgd_torch(model, x, y, eps=-0.1)
    with pytest.raises(ValueError, match="y must be"):
        pgd_torch(model, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="clip_min"):
        pgd_torch(model, x, y, eps=0.1, clip_min=1.0, clip_max=0.0)
    with pytest.raises(ValueError, match="delta_init"):
        pgd_torch(model, x, y, eps=0.1, delta_init=torch.zeros(2))
    with pytest.raises(ValueError, match="loss"):
        pgd_torch(model, x, y, eps=0.1, loss="hinge")


# ------------------------------------------------------------------------------------------------
# protocols
# ------------------------------------------------------------------------------------------------


def test_standard_protocol_keep_mask_semantics():
    model = _HandMade()
    x = torch.tensor([
        [0.90, 0.10],  # correct, margin too large for eps 0.1: attack fails -> drop
        [0.52, 0.48],  # correct, flips within eps 0.1 -> keep
        [0.30, 0.70],  # misclassified already -> drop
        [0.52, 0.48],  # label 1: misclassified already -> drop
        [0.45, 0.55],  # label 1, correct, flips -> keep
    ])
    y = torch.tensor([0, 0, 0, 1, 1])
    for backend in ("torch", "advertorch"):
        x_adv, keep = attack_standard_protocol(model, x, y, eps=0.1, nb_iter=40, seed=0,
                                               backend=backend)
        assert keep.dtype == torch.bool
        assert keep.tolist() == [False, True, False, False, True]
        assert ((x_adv - x).abs() <= 0.1 + 1e-6).all()
        # with 40 steps of 2.5 * eps / 40 the attack reaches the corner of the eps box
        assert torch.allclose(x_adv[1], torch.tensor([0.42, 0.58]), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        attack_standard_protocol(model, x * 3, y, eps=0.1)


def test_paper_protocol_attacks_normalised_tensors_with_01_clipping():
    torch.manual_seed(0)
    net = MnistNet()
    x = torch.zeros(3, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    y = torch.tensor([1, 2, 3])
    adv = attack_paper_protocol(net, x, y, eps=0.1, nb_iter=2, backend="torch")
    x_norm = (x - MNIST_MEAN) / MNIST_STD
    assert adv.shape == x.shape
    assert adv.min() >= 0.0 and adv.max() <= 1.0  # clipped in normalised space, as the seed did
    # the background (normalised about -0.42) is pulled up to 0: far beyond epsilon
    assert (adv - x_norm).abs().max() > 0.4
    same = attack_paper_protocol(net, x, y, eps=0.1, nb_iter=2, backend="advertorch")
    assert (adv - same).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="normalize=False"):
        attack_paper_protocol(MnistNet(normalize=True), x, y, eps=0.1, nb_iter=1)
    with pytest.raises(ValueError, match="mean"):
        attack_paper_protocol(_tiny_model(), torch.rand(2, 1, 4, 4), y[:2], eps=0.1, nb_iter=1)
