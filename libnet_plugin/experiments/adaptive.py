"""Attacks that know the detector: white-box adaptive PGD, a feature-matching surrogate, score-only search.

A detector is only as good as the strongest attack against it (Carlini & Wagner 2017; Tramer et al. 2020:
the attack's loss must target the detector). The attacks here know the fitted
:class:`~libnet_plugin.ConsistencyDetector` and its calibrated threshold, and count an attack as an
**evasion** when the attacked input is misclassified *and* not flagged (docs/method.md section 15):

* :func:`adaptive_pgd`: L-inf PGD on ``margin(x) + lambda * s(x) / sd`` with ``margin`` the classifier's
  margin loss (true class logit minus the best other one, clamped at ``-kappa``) and ``s`` a differentiable
  score of the detector: :meth:`ConsistencyDetector.score` for a :attr:`differentiable
  <libnet_plugin.ConsistencyDetector.differentiable>` detector (the value is exact, the gradient is the
  score's surrogate's), else a :class:`FeatureMatching` surrogate (the cosine distance of the probed
  layers' activations to the clean activations of a target class). ``lambda`` runs over a list with
  random restarts, all in one batch; per input the best outcome is kept (an evasion with the lowest
  score, else a misclassification with the lowest score, else the lowest margin).
* :func:`score_search`: a black-box attacker that sees only the model's answer and the detector's
  score: a random search over the corners of the L-inf box (square patches of +-eps, as in Andriushchenko
  et al.'s Square Attack), keeping a change when it lowers ``max(margin, 0) + max(score - threshold, 0) / sd``.
* :func:`evasion`, :func:`evasion_at_fprs`: the share of attacked inputs that evade, at the calibrated
  threshold and at the thresholds of other FPRs read from the detector's calibration scores.

Every attack returns an :class:`AttackOutcome`; inputs are pixel-space tensors in ``[0, 1]`` and the
detector's model is what is attacked. By default the model takes those pixels itself (normalisation
inside the model, as the MNIST net). For a model that takes another input space (the CIFAR-10 ResNet44
takes normalised inputs), pass ``to_model``: a differentiable map from the attacked pixels to the
model's inputs, applied before every call of the detector, its probe or the model. The L-inf box, the
clamp to ``[0, 1]`` and ``eps`` stay in pixel space, and the outcome's ``x_adv`` is in pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from .._validate import check_int

__all__ = ["AttackOutcome", "AdaptivePGDSettings", "FeatureMatching", "margin_loss", "adaptive_pgd", "score_search",
           "evasion",
           "evasion_at_fprs", "best_of", "judge"]

#: A differentiable map from the attacked inputs (pixels) to the inputs of the detector's model.
InputMap = Callable[[Tensor], Tensor]


def _mapped(x: Tensor, to_model: InputMap | None) -> Tensor:
    """``x`` as the detector's model takes it: ``to_model(x)``, or ``x`` itself when there is no map."""
    return x if to_model is None else to_model(x)


@dataclass
class AttackOutcome:
    """What an attack on a detector produced, per attacked input.

    Attributes:
        x_adv: the attacked inputs ``[N, ...]``.
        misclassified: ``BoolTensor[N]``, the model's answer differs from the label.
        score: the detector's exact score ``[N]`` of ``x_adv``.
        evaded: ``BoolTensor[N]``, misclassified and ``score <= threshold``.
        threshold: the detector threshold the outcome was judged at.
    """

    x_adv: Tensor
    misclassified: Tensor
    score: Tensor
    evaded: Tensor
    threshold: float

    def summary(self) -> dict[str, Any]:
        """``{"n", "fooled", "evasion"}``: counts and the two rates."""
        n = int(self.misclassified.numel())
        return {"n": n, "fooled": float(self.misclassified.float().mean()) if n else float("nan"),
                "evasion": float(self.evaded.float().mean()) if n else float("nan")}


def margin_loss(logits: Tensor, y: Tensor, kappa: float = 0.0) -> Tensor:
    """``max(z_y - max_{j != y} z_j, -kappa)`` per row: positive while the model answers ``y``.

    Example:
        >>> margin_loss(torch.tensor([[2., 0., 1.], [0., 3., 1.]]), torch.tensor([0, 0])).tolist()
        [1.0, -0.0]
    """
    true = logits.gather(1, y[:, None])[:, 0]
    other = logits.masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf")).amax(dim=1)
    return (true - other).clamp(min=-float(kappa))


class FeatureMatching:
    """A differentiable stand-in for a detector without a gradient: look like another class's clean inputs.

    For each probed layer ``l`` of the library network, ``mu[l, c]`` is the mean normalised activation
    of the clean reference inputs the model assigns to class ``c``. The surrogate of an input ``x`` with
    target ``t`` is ``sum_l (1 - cos(f_l(x), mu[l, t]))``: driving it down moves every layer towards the
    target class at once, which is what votes over layers (CPL) and nearest neighbours (k-NN) look at.

    Args:
        net: the fitted library network of the detector (its probe runs the model).
        reference: clean inputs ``[N, ...]`` (e.g. training images).
        layers: layers to match (default: every probed layer).
        batch_size: inputs per forward pass while computing the means.
        to_model: maps ``reference`` (in the attack's space, e.g. pixels) to the model's inputs before the
            model runs (see the module docstring); ``None``: ``reference`` is already what the model takes.
    """

    def __init__(self, net: Any, reference: Tensor, layers: Sequence[str] | None = None, batch_size: int = 256,
                 to_model: InputMap | None = None):
        self.net = net
        self.layers = list(net.layers if layers is None else layers)
        sums: dict[str, Tensor] = {}
        counts = torch.zeros(net.n_classes_, dtype=torch.float64)
        for i in range(0, reference.shape[0], batch_size):
            r = net.run(_mapped(reference[i:i + batch_size], to_model))
            onehot = torch.nn.functional.one_hot(r.answers.cpu(), net.n_classes_).double()
            counts += onehot.sum(dim=0)
            for l in self.layers:
                f = torch.nn.functional.normalize(r.haps[l].detach().cpu().double().flatten(1), dim=1)
                sums[l] = sums.get(l, 0) + onehot.T @ f
        self.present = counts > 0
        self.means = {l: torch.nn.functional.normalize(s, dim=1).float() for l, s in sums.items()}

    def targets(self, logits: Tensor, y: Tensor) -> Tensor:
        """The target class per input: the model's best answer other than ``y`` among classes it has seen."""
        masked = logits.detach().masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), float("-inf"))
        masked = masked.masked_fill(~self.present.to(masked.device)[None, :], float("-inf"))
        return masked.argmax(dim=1)

    def __call__(self, haps: Mapping[str, Tensor], target: Tensor) -> Tensor:
        terms = []
        for l in self.layers:
            f = torch.nn.functional.normalize(haps[l].flatten(1).float(), dim=1)
            mu = self.means[l].to(f.device)[target]
            terms.append(1.0 - (f * mu).sum(dim=1))
        return torch.stack(terms).sum(dim=0)


def _check_attack(det: Any, x: Tensor, y: Tensor, eps: float) -> float:
    if not det.is_calibrated:
        raise ValueError("the detector must be calibrated: the attack is judged at its threshold")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"x must be a floating tensor [N, ...], got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(f"y must be an integer tensor of shape [{x.shape[0]}], got "
                         f"{getattr(y, 'dtype', '?')} {list(getattr(y, 'shape', []))}")
    eps = float(eps)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    return eps


def judge(det: Any, x_adv: Tensor, y: Tensor, batch_size: int = 256,
          to_model: InputMap | None = None) -> AttackOutcome:
    """The exact score, the model's answer and the evasion flag of attacked inputs, at ``det.threshold_``.

    ``to_model`` maps ``x_adv`` to the model's inputs first (see the module docstring); the outcome keeps
    ``x_adv`` as given.
    """
    scores, wrong = [], []
    with torch.no_grad():
        for i in range(0, x_adv.shape[0], batch_size):
            out = det.score_and_output(_mapped(x_adv[i:i + batch_size], to_model))
            scores.append(out.score.cpu())
            wrong.append(out.output.argmax(dim=1).cpu() != y[i:i + batch_size].cpu())
    score = torch.cat(scores) if scores else torch.empty(0)
    mis = torch.cat(wrong) if wrong else torch.empty(0, dtype=torch.bool)
    return AttackOutcome(x_adv, mis, score, mis & (score <= det.threshold_), float(det.threshold_))


Key = tuple[Tensor, ...]


def _key(misclassified: Tensor, score: Tensor, secondary: Tensor, threshold: float) -> Key:
    """A lexicographic key per input, lower = a better attack: evaded < misclassified < correct, then the
    exact score, then ``secondary`` (the attacked term, which still moves where the exact score saturates)."""
    evaded = misclassified & (score <= threshold)
    tier = torch.where(evaded, 0, torch.where(misclassified, 1, 2))
    clean = lambda t: torch.nan_to_num(t.double(), nan=float("inf"))  # noqa: E731
    return tier, clean(score), clean(secondary)


def _less(a: Key, b: Key) -> Tensor:
    """Elementwise ``a < b`` in lexicographic order."""
    out = torch.zeros_like(a[0], dtype=torch.bool)
    tied = torch.ones_like(out)
    for x, y in zip(a, b):
        out |= tied & (x < y)
        tied &= x == y
    return out


def best_of(outcomes: Sequence[AttackOutcome]) -> AttackOutcome:
    """Per input, the best of several attacks' outcomes on the same inputs (the strongest attacker)."""
    if not outcomes:
        raise ValueError("best_of needs at least one outcome")
    thr = outcomes[0].threshold
    best = outcomes[0]
    for o in outcomes[1:]:
        zero = torch.zeros_like(o.score)
        better = _less(_key(o.misclassified, o.score, zero, thr), _key(best.misclassified, best.score, zero, thr))
        best = AttackOutcome(_where(better, o.x_adv, best.x_adv), _where(better, o.misclassified, best.misclassified),
                             _where(better, o.score, best.score), _where(better, o.evaded, best.evaded), thr)
    return best


def _where(rows: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` where ``rows`` is True, else ``old``, row by row."""
    return torch.where(rows.reshape(-1, *[1] * (new.ndim - 1)), new, old)


def _project(x0: Tensor, x: Tensor, eps: float) -> Tensor:
    return torch.min(torch.max(x, x0 - eps), x0 + eps).clamp(0.0, 1.0)


@dataclass(frozen=True)
class AdaptivePGDSettings:
    """The sizes of :func:`adaptive_pgd`, checked once when made (``ValueError`` naming the field).

    Attributes:
        eps: L-inf radius (pixels). steps: PGD steps per restart (step ``2.5 eps / steps`` unless
            ``step_size``). restarts: random starts per lambda. lambdas: weights of the detector term.
        kappa: the margin loss stops pushing once the wrong class leads by ``kappa``.
        check_every: with a surrogate, the exact score (no gradient) is checked every this many steps and
            at the end; with a differentiable score it is known at every step.
        seed: seed of the random starts. batch_size: clean inputs per batch (each runs
            ``len(lambdas) * restarts`` copies). progress: a tqdm bar over the batches.

    Example:
        >>> AdaptivePGDSettings(eps=0.3, lambdas=[0, 1]).lambdas
        (0.0, 1.0)
    """

    eps: float
    steps: int = 100
    restarts: int = 2
    lambdas: Sequence[float] = (0.0, 0.1, 1.0, 10.0)
    step_size: float | None = None
    kappa: float = 0.0
    check_every: int = 10
    seed: int = 0
    batch_size: int = 64
    progress: bool = False

    def __post_init__(self) -> None:
        eps = float(self.eps)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be a finite number >= 0, got {self.eps!r}")
        for name in ("steps", "restarts", "check_every", "batch_size"):
            check_int(getattr(self, name), name)
        lams = tuple(float(v) for v in self.lambdas)
        if not lams or any(not math.isfinite(v) or v < 0 for v in lams):
            raise ValueError(f"lambdas must be finite numbers >= 0, got {list(self.lambdas)!r}")
        object.__setattr__(self, "eps", eps)
        object.__setattr__(self, "lambdas", lams)

    @property
    def alpha(self) -> float:
        """The step: ``step_size``, else ``2.5 eps / steps``."""
        return 2.5 * self.eps / self.steps if self.step_size is None else float(self.step_size)


def adaptive_pgd(det: Any, x: Tensor, y: Tensor, settings: AdaptivePGDSettings | None = None, *,
                 surrogate: FeatureMatching | None = None, to_model: InputMap | None = None,
                 **options: Any) -> AttackOutcome:
    """White-box L-inf PGD against the classifier and the detector together (see the module docstring).

    Args:
        det: a calibrated :class:`~libnet_plugin.ConsistencyDetector` with the torch probe.
        x: clean inputs ``[N, ...]`` in ``[0, 1]``; ``y``: their labels ``[N]``.
        settings: the attack's sizes (:class:`AdaptivePGDSettings`); ``options`` are its fields given as
            keywords instead (``eps=`` at least), or replace some of ``settings``'.
        surrogate: a :class:`FeatureMatching` used in place of the score's gradient; required when the
            detector is not :attr:`differentiable <libnet_plugin.ConsistencyDetector.differentiable>`.
        to_model: a differentiable map from the attacked pixels to the model's inputs, applied before every
            call of the detector, its probe or the model (the gradient flows through it); the box, the clamp
            and ``eps`` stay in pixel space. ``None``: the model takes the pixels (normalisation inside it).
            A ``surrogate`` built from pixel references needs the same map (:class:`FeatureMatching`'s
            ``to_model``).

    Returns:
        An :class:`AttackOutcome`, the best per input over lambdas, restarts and checked steps (``x_adv``
        in pixels).
    """
    if settings is not None and not isinstance(settings, AdaptivePGDSettings):
        raise TypeError(f"adaptive_pgd's fourth argument is an AdaptivePGDSettings, got {type(settings).__name__}")
    s = AdaptivePGDSettings(**options) if settings is None else replace(settings, **options)
    _check_attack(det, x, y, s.eps)
    if not det.differentiable and surrogate is None:
        raise ValueError(f"the {det.method!r} score has no gradient: pass surrogate=FeatureMatching(det.net, x_train)")
    gen = torch.Generator().manual_seed(int(s.seed))
    from tqdm.auto import tqdm

    parts = [_pgd_batch(det, x[i:i + s.batch_size].detach(), y[i:i + s.batch_size], s, gen, surrogate, to_model)
             for i in tqdm(range(0, x.shape[0], s.batch_size), disable=not s.progress, desc=f"adaptive eps={s.eps:g}")]
    return _concat(parts, float(det.threshold_))


def _pgd_batch(det: Any, xb: Tensor, yb: Tensor, s: AdaptivePGDSettings, gen: torch.Generator,
               surrogate: FeatureMatching | None, to_model: InputMap | None) -> AttackOutcome:
    """:func:`adaptive_pgd` on one batch: every lambda and restart as a copy, the best copy per input."""
    thr, eps, alpha, lams = float(det.threshold_), s.eps, s.alpha, list(s.lambdas)
    b, copies = xb.shape[0], len(lams) * s.restarts
    x0 = xb.repeat(copies, *([1] * (xb.ndim - 1)))
    yy = yb.repeat(copies).to(det.net.device)
    lam = torch.tensor(lams, dtype=torch.float32).repeat_interleave(b).repeat(s.restarts)
    noise = (torch.rand(x0.shape, generator=gen) * 2 - 1) * eps
    xa = _project(x0, x0 + noise.to(x0.dtype), eps)
    scale = _score_scale(det, _mapped(xb, to_model), surrogate)
    target = None
    best: Key | None = None
    best_x = xa.clone()
    best_mis = torch.zeros(x0.shape[0], dtype=torch.bool)
    best_score = torch.full((x0.shape[0],), float("inf"))
    for step in range(s.steps + 1):
        xa.requires_grad_(True)
        with torch.enable_grad():
            if surrogate is None:
                out = det.score_and_output(_mapped(xa, to_model))
                logits, score, exact = out.output, out.score, out.score.detach().cpu()
            else:
                r = det.net.probe.run(_mapped(xa, to_model), grad=True)
                logits = r.outputs
                if target is None:
                    target = surrogate.targets(logits, yy)
                score = surrogate(r.haps, target)
                exact = None
            margin = margin_loss(logits.float(), yy, s.kappa)
            term = score.float() / scale
            loss = margin + lam.to(margin.device) * term
            grad, = torch.autograd.grad(loss.sum(), xa)
        xa = xa.detach()
        mis = (logits.detach().argmax(dim=1) != yy).cpu()
        if exact is None and (step % s.check_every == 0 or step == s.steps):
            exact = det.score(_mapped(xa, to_model)).detach().cpu()
        if exact is not None:
            secondary = torch.where(mis, term.detach().cpu(), margin.detach().cpu())
            key = _key(mis, exact, secondary, thr)
            better = torch.ones_like(mis) if best is None else _less(key, best)
            best = key if best is None else tuple(torch.where(better, k, o) for k, o in zip(key, best))
            best_x[better] = xa[better]
            best_mis[better], best_score[better] = mis[better], exact[better].float()
        if step == s.steps:
            break
        xa = _project(x0, xa - alpha * grad.sign(), eps)
    # the best copy per clean input (over lambdas and restarts)
    assert best is not None
    pick = torch.arange(b)
    for c in range(1, copies):
        cand = torch.arange(b) + c * b
        better = _less(tuple(k[cand] for k in best), tuple(k[pick] for k in best))
        pick = torch.where(better, cand, pick)
    mis_b, score_b = best_mis[pick], best_score[pick]
    return AttackOutcome(best_x[pick], mis_b, score_b, mis_b & (score_b <= thr), thr)


def _spread(values: Tensor) -> float:
    """The standard deviation of the finite ``values``; 1 when it is undefined or zero."""
    v = values[torch.isfinite(values)]
    sd = float(v.std()) if v.numel() > 1 else 1.0
    return sd if math.isfinite(sd) and sd > 0 else 1.0


def _score_scale(det: Any, x: Tensor, surrogate: FeatureMatching | None) -> float:
    """The spread of the attacked term on the clean inputs, so that lambda weighs it in margin units."""
    if surrogate is not None:
        return 1.0
    if not det.scorer.fuses:
        return _spread(det.calibration_scores_)
    with torch.no_grad():  # the gradient of a fused score is its surrogate's: scale it by its own spread
        return _spread(det.surrogate(x))


def _concat(parts: Sequence[AttackOutcome], thr: float) -> AttackOutcome:
    return AttackOutcome(torch.cat([p.x_adv for p in parts]), torch.cat([p.misclassified for p in parts]),
                         torch.cat([p.score for p in parts]), torch.cat([p.evaded for p in parts]), thr)


def score_search(det: Any, x: Tensor, y: Tensor, *, eps: float, queries: int = 500, p_init: float = 0.1,
                 seed: int = 0, batch_size: int = 256, progress: bool = False,
                 to_model: InputMap | None = None) -> AttackOutcome:
    """A black-box random search that sees only the model's answer and the detector's score.

    Starts from vertical stripes of ``+-eps`` and, for ``queries`` rounds, sets a random square patch
    (side ``sqrt(p) * width``, ``p`` shrinking from ``p_init`` as in the Square Attack's schedule) of
    every channel to a random ``+-eps``; a change is kept for an input when it lowers
    ``max(margin, 0) + max(score - threshold, 0) / sd`` (``sd`` of the clean calibration scores). An
    input stops once it evades. One query = one call of the guarded model on the batch. ``to_model`` maps
    the candidate pixels to the model's inputs before each query (see :func:`adaptive_pgd`); the search
    itself stays in pixel space.

    Returns:
        An :class:`AttackOutcome` at ``det.threshold_`` (``x_adv`` in pixels).
    """
    eps = _check_attack(det, x, y, eps)
    queries = check_int(queries, "queries", minimum=0)
    if x.ndim != 4:
        raise ValueError(f"score_search attacks images [N, C, H, W], got shape {list(x.shape)}")
    gen = torch.Generator().manual_seed(int(seed))
    thr = float(det.threshold_)
    sd = _spread(det.calibration_scores_)
    from tqdm.auto import tqdm

    def objective(xq: Tensor, yq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        with torch.no_grad():
            out = det.score_and_output(_mapped(xq, to_model))
        logits, score = out.output.float().cpu(), out.score.float().cpu()
        m = margin_loss(logits, yq).clamp(min=0.0)
        over = torch.where(torch.isfinite(score), (score - thr).clamp(min=0.0) / sd, torch.full_like(score, 1e9))
        return m + over, logits.argmax(dim=1) != yq, score

    parts: list[AttackOutcome] = []
    for i in tqdm(range(0, x.shape[0], batch_size), disable=not progress, desc=f"score search eps={eps:g}"):
        xb, yb = x[i:i + batch_size].detach().cpu(), y[i:i + batch_size].cpu()
        n, c, h, w = xb.shape
        stripes = (torch.randint(0, 2, (n, c, 1, w), generator=gen).float() * 2 - 1) * eps
        xa = (xb + stripes).clamp(0.0, 1.0)
        obj, mis, score = objective(xa, yb)
        for q in range(queries):
            active = ~(mis & (score <= thr))
            if not bool(active.any()):
                break
            p = p_init * _square_schedule(q, queries)
            side = max(1, min(h, int(round(math.sqrt(p * h * w)))))
            cand = xa.clone()
            idx = active.nonzero().flatten()
            tops = torch.randint(0, h - side + 1, (idx.numel(),), generator=gen)
            lefts = torch.randint(0, w - side + 1, (idx.numel(),), generator=gen)
            signs = (torch.randint(0, 2, (idx.numel(), c), generator=gen).float() * 2 - 1) * eps
            for j, k in enumerate(idx.tolist()):
                t, le = int(tops[j]), int(lefts[j])
                patch = xb[k, :, t:t + side, le:le + side] + signs[j][:, None, None]
                cand[k, :, t:t + side, le:le + side] = patch.clamp(0.0, 1.0)
            c_obj, c_mis, c_score = objective(cand[idx], yb[idx])
            keep = c_obj < obj[idx]
            kept = idx[keep]
            xa[kept], obj[kept], mis[kept], score[kept] = cand[kept], c_obj[keep], c_mis[keep], c_score[keep]
        parts.append(AttackOutcome(xa, mis, score, mis & (score <= thr), thr))
    return _concat(parts, thr)


def _square_schedule(q: int, total: int) -> float:
    """The Square Attack's step-size schedule, rescaled to ``total`` queries (halving at fixed fractions)."""
    frac = q / max(total, 1)
    for edge, factor in ((0.001, 1.0), (0.005, 0.5), (0.02, 0.25), (0.05, 0.125), (0.1, 1 / 16),
                         (0.2, 1 / 32), (0.4, 1 / 64), (0.6, 1 / 128), (0.8, 1 / 256)):
        if frac <= edge:
            return factor
    return 1 / 512


def evasion(outcome: AttackOutcome) -> float:
    """Share of the attacked inputs that are misclassified and not flagged."""
    return outcome.summary()["evasion"]


def evasion_at_fprs(det: Any, outcome: AttackOutcome, fprs: Sequence[float]) -> dict[float, float]:
    """Evasion of the same attacked inputs judged at the thresholds of other FPRs (from the calibration scores).

    The threshold for FPR ``f`` is the conformal one (:meth:`ConsistencyDetector.calibrate`) over the
    detector's sorted ``calibration_scores_``.
    """
    ref = det.calibration_scores_.double().cpu()
    n = ref.shape[0]
    out = {}
    for f in fprs:
        rank = min(n, max(1, math.ceil((n + 1) * (1.0 - float(f)))))
        thr = float(ref[rank - 1])
        ev = outcome.misclassified & (outcome.score.double() <= thr)
        out[float(f)] = float(ev.float().mean()) if ev.numel() else float("nan")
    return out
