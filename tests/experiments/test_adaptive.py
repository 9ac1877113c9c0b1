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


def _trained(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> nn.Module:
    """``model`` after ``steps`` full-batch Adam steps on ``(x, y)``, in eval mode."""
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    x, y = _images(600, 0)
    model = _trained(TinyConv(), x, y, 150)
    x_cal, _ = _images(200, 1)
    x_te, y_te = _images(200, 2)
    with torch.no_grad():
        ok = model(x_te).argmax(1) == y_te
    net = lnp.LibraryNetwork(model, ["conv", "fc1", "out"], thresholds=0.8).fit(x)
    return model, net, x, y, x_cal, x_te[ok][:24], y_te[ok][:24]


def _detector(setup, method, **kw):
    model, net, x, y, x_cal, *_ = setup
    det = lnp.ConsistencyDetector(net, method=method, **kw).fit((x, y))
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
    """The detector term's gradient lowers the score the attack follows, and adding it never loses evasion.

    Which lambda wins per input, and whether the plain attack's points already score low, depend on the trained
    model, which other torch releases train a little differently (on torch 2.14.1 the aware attack picked the
    plain one's points for every input); so the test checks the mechanism, not a comparison of final picks."""
    det = _detector(setup, "library-distance")
    *_, xa, ya = setup
    plain = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(0.0,))
    aware = adaptive_pgd(det, xa, ya, eps=0.3, steps=20, restarts=1, lambdas=(0.0, 1.0, 10.0))
    assert evasion(aware) >= evasion(plain)  # the aware attack keeps the plain one's points among its choices
    # the fused score saturates far from the clean data; its surrogate (what the gradient follows) does not:
    # one small signed-gradient step against it lowers it on most attacked points
    x = plain.x_adv.clone().requires_grad_(True)
    with torch.enable_grad():
        s = det.surrogate(x)
        grad, = torch.autograd.grad(s.sum(), x)
    with torch.no_grad():
        lowered = det.surrogate((x - 1e-3 * grad.sign()).clamp(0, 1)) < s.detach()
    assert float(lowered.float().mean()) >= 0.8


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


# ------------------------------------------------------------------------------ to_model: an input map

MEAN, STD = [0.3], [0.25]


def _normalize(x: torch.Tensor) -> torch.Tensor:
    from libnet_plugin.experiments.protocols import to_model_space

    return to_model_space(x, "pixels", "normalized", MEAN, STD)


class Normalized(nn.Module):
    """The same model with the normalisation built in: it takes pixels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(_normalize(x))


@pytest.fixture(scope="module")
def twins():
    """One trained model that takes normalised inputs, its libraries and detectors, and the same model with
    the normalisation inside (libraries and detectors fitted on pixels): ``{method: (det_norm, det_pixels)}``."""
    torch.manual_seed(1)
    x, y = _images(600, 0)
    inner = _trained(TinyConv(), _normalize(x), y, 30)
    wrapped = Normalized(inner).eval()
    x_cal, _ = _images(200, 1)
    x_te, y_te = _images(100, 2)
    with torch.no_grad():
        ok = inner(_normalize(x_te)).argmax(1) == y_te
    net_n = lnp.LibraryNetwork(inner, ["conv", "fc1", "out"], thresholds=0.8).fit(_normalize(x))
    net_w = lnp.LibraryNetwork(wrapped, ["inner.conv", "inner.fc1", "inner.out"], thresholds=0.8).fit(x)
    dets = {}
    for method in ("msp", "library-distance", "knn"):
        pair = []
        for net, xs, xc in ((net_n, _normalize(x), _normalize(x_cal)), (net_w, x, x_cal)):
            det = lnp.ConsistencyDetector(net, method=method).fit((xs, y))
            if det.requires_training_data and method != "knn":
                det.fit(xs)
            pair.append(det.calibrate(xc, fpr=0.05))
        dets[method] = tuple(pair)
    return dets, net_n, net_w, x, x_te[ok][:12], y_te[ok][:12]


def _same(a: AttackOutcome, b: AttackOutcome) -> None:
    assert torch.equal(a.x_adv, b.x_adv)
    assert torch.equal(a.misclassified, b.misclassified) and torch.equal(a.evaded, b.evaded)
    torch.testing.assert_close(a.score, b.score, rtol=0, atol=0)
    assert a.threshold == b.threshold


@pytest.mark.parametrize("method", ["msp", "library-distance"])
def test_to_model_equals_the_normalisation_inside_the_model(twins, method):
    """White-box PGD (score gradient), the score-only search and the judging through ``to_model`` give the
    same adversarial images, scores and evasions as on the model with the normalisation built in."""
    dets, *_, xa, ya = twins
    det_n, det_w = dets[method]
    assert det_n.threshold_ == det_w.threshold_
    kw = dict(eps=0.3, steps=6, restarts=1, lambdas=(0.0, 1.0), seed=3)
    white_w = adaptive_pgd(det_w, xa, ya, **kw)
    white_n = adaptive_pgd(det_n, xa, ya, **kw, to_model=_normalize)
    _same(white_n, white_w)
    assert float(white_n.x_adv.min()) >= 0 and float(white_n.x_adv.max()) <= 1  # the box stays in pixels
    assert float((white_n.x_adv - xa).abs().max()) <= 0.3 + 1e-6
    assert white_n.summary()["fooled"] > 0  # the attack did something
    black_w = score_search(det_w, xa, ya, eps=0.3, queries=20, seed=1)
    _same(score_search(det_n, xa, ya, eps=0.3, queries=20, seed=1, to_model=_normalize), black_w)
    _same(judge(det_n, white_w.x_adv, ya, to_model=_normalize), judge(det_w, white_w.x_adv, ya))
    # without the map the normalised model is attacked on pixels: another (wrong) attack, other images (the
    # scores of both may sit at the score's cap on this tiny net, whose class Gaussians are near-singular)
    # (well above float32 rounding: another CPU may round the steps differently, not move them by 0.01)
    assert float((adaptive_pgd(det_n, xa, ya, **kw).x_adv - white_w.x_adv).abs().max()) > 0.01


def test_to_model_with_a_feature_matching_surrogate_and_the_threat_models(twins):
    """A non-differentiable score (k-NN): the surrogate built from pixel references through ``to_model``
    equals the wrapper's, and so do the attacks and ThreatModels' evasion entries."""
    from libnet_plugin.experiments.threat_models import AdaptiveBudget, ThreatModels

    dets, net_n, net_w, x, xa, ya = twins
    det_n, det_w = dets["knn"]
    sur_n, sur_w = FeatureMatching(net_n, x[:300], to_model=_normalize), FeatureMatching(net_w, x[:300])
    assert torch.equal(sur_n.present, sur_w.present)
    for a, b in zip(sur_n.layers, sur_w.layers):
        torch.testing.assert_close(sur_n.means[a], sur_w.means[b], rtol=0, atol=0)
    kw = dict(eps=0.3, steps=6, restarts=1, lambdas=(0.0, 1.0), check_every=3, seed=2)
    _same(adaptive_pgd(det_n, xa, ya, surrogate=sur_n, to_model=_normalize, **kw),
          adaptive_pgd(det_w, xa, ya, surrogate=FeatureMatching(net_w, x[:300]), **kw))
    plain = {0.1: xa.clamp(0.05, 0.95), 0.3: (xa + 0.3 * torch.sign(torch.randn(xa.shape,
                                                   generator=torch.Generator().manual_seed(0)))).clamp(0, 1)}
    budget = AdaptiveBudget(n=len(xa), steps=3, restarts=1, lambdas=(0.0, 1.0), queries=5, check_every=3)
    for method in ("msp", "knn"):
        d_n, d_w = dets[method]
        got = ThreatModels(xa, ya, plain, x[:300], budget, to_model=_normalize)(d_n, method)
        want = ThreatModels(xa, ya, plain, x[:300], budget)(d_w, method)
        assert got == want and set(got["by_epsilon"]) == {"0.1", "0.3"}
        assert got["by_epsilon"]["0.3"]["black-box"] is not None


def test_to_model_none_is_the_default_path(twins):
    """``to_model=None`` is the attack without a map, and an identity map changes nothing."""
    dets, *_, xa, ya = twins
    det = dets["library-distance"][1]
    kw = dict(eps=0.2, steps=4, restarts=2, lambdas=(0.0, 0.3), seed=5)
    base = adaptive_pgd(det, xa, ya, **kw)
    _same(adaptive_pgd(det, xa, ya, to_model=None, **kw), base)
    _same(adaptive_pgd(det, xa, ya, to_model=lambda t: t, **kw), base)
    black = score_search(det, xa, ya, eps=0.2, queries=10)
    _same(score_search(det, xa, ya, eps=0.2, queries=10, to_model=None), black)
    _same(judge(det, base.x_adv, ya, to_model=None), judge(det, base.x_adv, ya))


def _fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def test_detector_comparison_attacks_the_detectors_in_pixels_through_to_model(twins, tmp_path):
    """``detector_comparison(adaptive=...)`` on the model that takes normalised inputs gives the evasion
    entries of the same comparison on the model with the normalisation inside; it attacks the first
    ``n`` correctly classified images that every set attacked, and writes the evasion table and figure."""
    from libnet_plugin.experiments.comparison import detector_comparison
    from libnet_plugin.experiments.protocols import AttackSet
    from libnet_plugin.experiments.threat_models import AdaptiveBudget

    _, net_n, net_w, x, *_ = twins
    y = _images(600, 0)[1]
    x_te, y_te = _images(40, 7)
    model_w = net_w.model
    sets = [AttackSet("standard", 0.1, _fgsm(model_w, x_te[:30], y_te[:30], 0.1), "pixels", torch.arange(30)),
            AttackSet("standard", 0.3, _normalize(_fgsm(model_w, x_te[5:], y_te[5:], 0.3)), "normalized",
                      torch.arange(5, 40))]
    budget = AdaptiveBudget(n=6, steps=3, restarts=1, lambdas=(0.0, 1.0), queries=4, check_every=2,
                            detectors=("msp", "knn"))
    common = dict(protocol="standard", detectors=["msp", "knn", "library-distance"], fpr=0.1, fpr_splits=3,
                  adaptive=budget, n_reference=300)
    res_n = detector_comparison(net_n, (x, y), (x_te, y_te), sets, space="normalized", mean=MEAN, std=STD,
                                out_dir=tmp_path / "n", **common)
    res_w = detector_comparison(net_w, (x, y), (x_te, y_te), sets, space="pixels", mean=MEAN, std=STD,
                                out_dir=tmp_path / "w", **common)
    assert res_n["available"] and res_w["available"]
    table = res_n["table"]
    with torch.no_grad():
        correct = (model_w(x_te[5:20]).argmax(1) == y_te[5:20]).sum()  # both sets attacked, not calibration
    assert table["adaptive"]["n"] == min(6, int(correct)) > 0
    assert table["adaptive"]["budget"]["detectors"] == ["msp", "knn"]
    for label in ("msp", "knn"):
        got, want = table["detectors"][label]["attacks"], res_w["table"]["detectors"][label]["attacks"]
        assert got == want and set(got["by_epsilon"]) == {"0.1", "0.3"}
        for entry in got["by_epsilon"].values():
            assert entry["n"] == table["adaptive"]["n"]
            assert all(0 <= entry[k] <= 1 for k in ("non-adaptive", "white-box", "strongest"))
    assert "attacks" not in table["detectors"]["library-distance"]
    assert table["adaptive"]["evasion_markdown"] == res_w["table"]["adaptive"]["evasion_markdown"]
    md = (tmp_path / "n" / "detectors.md").read_text()
    assert md.startswith(table["table_markdown"]) and "### Evasion" in md and "| msp | score gradient |" in md
    assert (tmp_path / "n" / "evasion.png").read_bytes()[:4] == b"\x89PNG"
    assert table["files"]["evasion_png"] == str(tmp_path / "n" / "evasion.png")
    import json

    assert json.loads((tmp_path / "n" / "detectors.json").read_text())["adaptive"]["n"] == table["adaptive"]["n"]


def test_detector_comparison_calibrates_on_the_second_half_and_attacks_only_the_first(twins):
    """The protocols attack the first test images: those are the clean evaluation half, and an attack on an
    image of the calibration half (the second) is left out, so no calibration image is attacked."""
    from libnet_plugin.experiments.comparison import detector_comparison
    from libnet_plugin.experiments.protocols import AttackSet

    _, net_n, net_w, x, *_ = twins
    x_te, y_te = _images(40, 7)
    x_adv = _fgsm(net_w.model, x_te, y_te, 0.3)
    sets = [AttackSet("standard", 0.3, x_adv, "pixels", torch.arange(40))]
    res = detector_comparison(net_n, (x, None), (x_te, y_te), sets, space="normalized", mean=MEAN, std=STD,
                              detectors=["msp"], fpr=0.1, fpr_splits=3)
    assert res["attacks"]["PGD eps=0.3"]["attacked"] == 20
    with torch.no_grad():
        answers = net_w.model(x_te).argmax(1)
        fooled = (answers == y_te) & (net_w.model(x_adv).argmax(1) != y_te)
    assert res["attacks"]["PGD eps=0.3"]["successful"] == int(fooled[:20].sum()) < int(fooled.sum())
    table = res["table"]
    assert (table["settings"]["n_calibration"], table["settings"]["n_clean"]) == (20, 20)
    want = lnp.ConsistencyDetector(net_n, method="msp").calibrate(_normalize(x_te[20:]), fpr=0.1).threshold_
    assert table["detectors"]["msp"]["threshold"] == pytest.approx(want)


def test_detector_comparison_refuses_a_bad_adaptive_request(twins):
    from libnet_plugin.experiments.comparison import detector_comparison
    from libnet_plugin.experiments.protocols import AttackSet
    from libnet_plugin.experiments.threat_models import AdaptiveBudget

    _, net_n, _, x, *_ = twins
    x_te, y_te = _images(8, 7)
    sets = [AttackSet("paper", 0.1, x_te, "pixels", torch.arange(8))]
    args = (net_n, (x, None), (x_te, y_te), sets)
    kw = dict(space="normalized", mean=MEAN, std=STD, detectors=["msp"])
    with pytest.raises(ValueError, match="standard protocol"):
        detector_comparison(*args, protocol="paper", adaptive=AdaptiveBudget(), **kw)
    with pytest.raises(ValueError, match=r"adaptive.detectors \['nope'\] are not among the detectors compared"):
        detector_comparison(*args, adaptive=AdaptiveBudget(detectors=("nope",)), **kw)
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        detector_comparison(*args, adaptive=AdaptiveBudget(steps=0), **kw)


def test_strongest_attacker_keeps_what_it_found_at_smaller_epsilons(setup, monkeypatch):
    """An image that evades within eps 0.1 lies within eps 0.3 too: a weaker attack at 0.3 does not undo it."""
    from libnet_plugin.experiments import threat_models
    from libnet_plugin.experiments.threat_models import AdaptiveBudget, ThreatModels

    _, net, x, _, _, xa, ya = setup
    det = _detector(setup, "msp")

    def fake_pgd(det, x, y, *, eps, **_kw):
        # evades on every image at the small radius, on none at the large one (a scripted weak attack)
        n = x.shape[0]
        small = eps < 0.2
        score = torch.full((n,), det.threshold_ - 1.0 if small else det.threshold_ + 1.0)
        return AttackOutcome(x, torch.ones(n, dtype=torch.bool), score, torch.full((n,), small), det.threshold_)

    monkeypatch.setattr(threat_models, "adaptive_pgd", fake_pgd)
    plain = {0.1: xa.clone(), 0.3: xa.clone()}  # the non-adaptive "attacks" leave the images as they are
    budget = AdaptiveBudget(n=xa.shape[0], steps=1, lambdas=(0.0,), queries=0)
    out = ThreatModels(xa, ya, plain, x[:100], budget)(det, "msp")["by_epsilon"]
    assert out["0.1"]["white-box"] == 1.0 and out["0.3"]["white-box"] == 0.0
    assert out["0.1"]["strongest"] == 1.0
    assert out["0.3"]["strongest"] == 1.0  # kept from eps 0.1
    assert out["0.3"]["strongest_at_fpr"]["0.05"] == 1.0
    n = xa.shape[0]
    assert out["0.3"]["strongest_ci95"] == threat_models.clopper_pearson(n, n)
    assert out["0.3"]["strongest_ci95"][1] == 1.0 and out["0.3"]["strongest_ci95"][0] < 1.0


def test_clopper_pearson_covers_the_rate_and_narrows_with_n():
    from scipy.stats import binom

    from libnet_plugin.experiments.threat_models import clopper_pearson

    low, high = clopper_pearson(4, 192)
    assert low < 4 / 192 < high
    # the exact interval: at its ends the one-sided tail probabilities are 2.5%
    assert binom.sf(3, 192, low) == pytest.approx(0.025, abs=1e-6)
    assert binom.cdf(4, 192, high) == pytest.approx(0.025, abs=1e-6)
    assert high - low < clopper_pearson(1, 48)[1] - clopper_pearson(1, 48)[0]
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(5, 4)


def test_evasion_table_writes_cifar_epsilons_as_fractions_of_255():
    from libnet_plugin.experiments.threat_models import evasion_table

    entry = {"non-adaptive": 0.0, "white-box": 0.5, "black-box": None, "strongest": 0.5}
    dets = {"msp": {"attacks": {"white-box method": "score gradient", "by_epsilon": {f"{8 / 255:g}": entry}}}}
    table = evasion_table(dets, [f"{8 / 255:g}"])
    assert "| eps=8/255 |" in table and "0.00 / 0.50 / - / **0.50**" in table
    with_ci = {"msp": {"attacks": {"white-box method": "score gradient",
                                   "by_epsilon": {"0.2": {**entry, "strongest_ci95": [0.25, 0.75]}}}}}
    assert "0.00 / 0.50 / - / **0.50** [0.25, 0.75]" in evasion_table(with_ci, ["0.2"])
    mnist = {"msp": {"attacks": {"white-box method": "score gradient", "by_epsilon": {"0.2": entry}}}}
    assert "| eps=0.2 |" in evasion_table(mnist, ["0.2"])
