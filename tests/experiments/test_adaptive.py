"""Attacks that know the detector (libnet_plugin.experiments.adaptive) on a small trained image model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.experiments.adaptive import (
    AttackOutcome,
    FeatureMatching,
    adaptive_pgd,
    best_of,
    evasion,
    evasion_at_fprs,
    judge,
    margin_loss,
    score_search,
)


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc1 = nn.Linear(6 * 8 * 8, 24)
        self.out = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)).flatten(1)
        return self.out(torch.relu(self.fc1(h)))


def _images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 8x8 images: a bright top, left or diagonal band on noise, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = 0.25 * torch.rand(n, 1, 8, 8, generator=g)
    x[y == 0, :, :3, :] += 0.6
    x[y == 1, :, :, :3] += 0.6
    eye = torch.eye(8).bool()
    x[(y == 2).nonzero().flatten()[:, None], 0, eye.nonzero()[:, 0], eye.nonzero()[:, 1]] += 0.7
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyConv()
    x, y = _images(600, 0)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x_cal, _ = _images(200, 1)
    x_te, y_te = _images(200, 2)
    with torch.no_grad():
        ok = model(x_te).argmax(1) == y_te
    net = lnp.LibraryNetwork(model, ["conv", "fc1", "out"], thresholds=0.8).fit(x)
    return model, net, x, y, x_cal, x_te[ok][:24], y_te[ok][:24]


def _detector(setup, method, **kw):
    model, net, x, y, x_cal, *_ = setup
    det = lnp.ConsistencyDetector(net, method=method, train=(x, y), **kw)
    if not det.is_calibrated and method not in ("mahalanobis", "knn"):
        det.fit(x)
    return det.calibrate(x_cal, fpr=0.05)


def test_margin_loss_is_positive_while_correct_and_clamped():
    z = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    assert margin_loss(z, torch.tensor([0, 0])).tolist() == [2.0, -0.0]
    assert margin_loss(z, torch.tensor([0, 0]), kappa=1.5).tolist() == [2.0, -1.5]


def test_lambda_zero_attacks_the_classifier_alone(setup):
    """lambda = 0: PGD on the margin loss fools nearly every input at a large radius, few at a tiny one."""
    det = _detector(setup, "msp")
    *_, xa, ya = setup
    big = adaptive_pgd(det, xa, ya, eps=0.5, steps=20, restarts=1, lambdas=(0.0,))
    tiny = adaptive_pgd(det, xa, ya, eps=0.01, steps=20, restarts=1, lambdas=(0.0,))
    assert big.summary()["fooled"] >= 0.9
    assert tiny.summary()["fooled"] <= 0.2
    assert float((big.x_adv - xa).abs().max()) <= 0.5 + 1e-6
    assert float(big.x_adv.min()) >= 0.0 and float(big.x_adv.max()) <= 1.0


def test_outcome_is_judged_at_the_calibrated_threshold(setup):
    det = _detector(setup, "library-distance")
    *_, xa, ya = setup
    o = adaptive_pgd(det, xa, ya, eps=0.2, steps=10, restarts=1, lambdas=(0.0, 1.0))
    again = judge(det, o.x_adv, ya)
    assert torch.equal(again.misclassified, o.misclassified)
    torch.testing.assert_close(again.score, o.score)
    assert torch.equal(o.evaded, o.misclassified & ~det.predict(o.x_adv))
    assert evasion(o) == pytest.approx(float(o.evaded.float().mean()))
    at = evasion_at_fprs(det, o, [det.fpr_, 0.5])
    assert at[det.fpr_] == pytest.approx(evasion(o))
    assert at[0.5] <= at[det.fpr_]  # a lower threshold flags more


def test_detector_term_lowers_the_score_of_the_attacked_inputs(setup):
    """With the score in the loss the attack finds points the detector scores lower than without it."""
    det = _detector(setup, "library-distance")
    *_, xa, ya = setup
    plain = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(0.0,))
    aware = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(0.0, 1.0, 10.0))
    both = plain.misclassified & aware.misclassified
    assert int(both.sum()) >= 10
    assert evasion(aware) >= evasion(plain)
    # the fused score saturates far from the clean data; its surrogate (what the gradient follows) does not
    with torch.no_grad():
        assert float(det.surrogate(aware.x_adv[both]).median()) < float(det.surrogate(plain.x_adv[both]).median())


def test_non_differentiable_detector_needs_a_surrogate(setup):
    det = _detector(setup, "knn")
    *_, xa, ya = setup
    assert not det.differentiable
    with pytest.raises(ValueError, match="no gradient"):
        adaptive_pgd(det, xa, ya, eps=0.1, steps=2)
    net, x = setup[1], setup[2]
    sur = FeatureMatching(net, x)
    o = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(0.0, 1.0), surrogate=sur, check_every=5)
    assert o.summary()["fooled"] >= 0.5
    assert torch.equal(o.evaded, o.misclassified & ~det.predict(o.x_adv))


def test_feature_matching_moves_activations_towards_the_target_class(setup):
    _, net, x, y, *_ , xa, ya = setup
    sur = FeatureMatching(net, x)
    r = net.run(xa)
    t = sur.targets(r.outputs, ya.to(r.outputs.device))
    assert bool((t != ya).all())
    before = sur(r.haps, t)
    det = _detector(setup, "cpl")
    o = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(100.0,), surrogate=sur)
    after = sur(net.run(o.x_adv).haps, t)
    assert float(after.mean()) < float(before.mean())


def test_score_search_uses_queries_and_stays_in_the_box(setup):
    det = _detector(setup, "msp")
    *_, xa, ya = setup
    none = score_search(det, xa, ya, eps=0.3, queries=0)
    some = score_search(det, xa, ya, eps=0.3, queries=150, seed=1)
    assert float((some.x_adv - xa).abs().max()) <= 0.3 + 1e-6
    assert some.summary()["fooled"] >= none.summary()["fooled"]
    assert evasion(some) >= evasion(none)
    assert torch.equal(some.evaded, some.misclassified & ~det.predict(some.x_adv))


def test_best_of_prefers_evasions_then_misclassifications():
    x = torch.zeros(3, 1, 2, 2)
    a = AttackOutcome(x, torch.tensor([True, False, True]), torch.tensor([0.5, 0.1, 3.0]),
                      torch.tensor([True, False, False]), 1.0)
    b = AttackOutcome(x + 1, torch.tensor([True, True, True]), torch.tensor([2.0, 0.2, 0.9]),
                      torch.tensor([False, True, True]), 1.0)
    best = best_of([a, b])
    assert best.evaded.tolist() == [True, True, True]
    assert best.x_adv[:, 0, 0, 0].tolist() == [0.0, 1.0, 1.0]


def test_bad_arguments_get_clear_errors(setup):
    det = _detector(setup, "msp")
    *_, xa, ya = setup
    with pytest.raises(ValueError, match="eps"):
        adaptive_pgd(det, xa, ya, eps=-1)
    with pytest.raises(ValueError, match="lambdas"):
        adaptive_pgd(det, xa, ya, eps=0.1, lambdas=(float("nan"),))
    with pytest.raises(ValueError, match="integer tensor"):
        adaptive_pgd(det, xa, ya.float(), eps=0.1)
    uncal = lnp.ConsistencyDetector(setup[1], method="msp").fit(setup[2])
    with pytest.raises(ValueError, match="calibrated"):
        score_search(uncal, xa, ya, eps=0.1)
