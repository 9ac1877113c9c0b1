"""Evasion of each detector under three threat models, as ``libnet evaluate-detectors`` measures it.

:class:`ThreatModels` is called once per calibrated detector by
:func:`~libnet_plugin.experiments.comparison.evaluate_detectors` (its ``attack_detector`` argument). For
each epsilon it attacks the same correctly classified clean images and reports the evasion rate
(misclassified and not flagged at the calibrated threshold, docs/method.md section 15) of

* ``"non-adaptive"``: the standard-protocol PGD examples, which do not know the detector;
* ``"white-box"``: :func:`~libnet_plugin.experiments.adaptive.adaptive_pgd` on the detector's own
  gradient, or through a :class:`~libnet_plugin.experiments.adaptive.FeatureMatching` surrogate when the
  score has none (``"white-box method"`` says which);
* ``"black-box"``: :func:`~libnet_plugin.experiments.adaptive.score_search` (score-only), at the
  epsilons of ``black_box_epsilons``;
* ``"strongest"``: per input, the best of the above.

The strongest attacker's evasion is also judged at the thresholds of other FPRs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .adaptive import FeatureMatching, adaptive_pgd, best_of, evasion_at_fprs, judge, score_search

__all__ = ["AdaptiveBudget", "ThreatModels", "evasion_table"]

#: FPRs at which the strongest attacker's evasion is also reported (the trade-off curve).
TRADE_OFF_FPRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)


@dataclass(frozen=True)
class AdaptiveBudget:
    """Sizes of the attacks that know the detector (``libnet evaluate-detectors --adaptive-*`` options)."""

    n: int = 48
    steps: int = 100
    restarts: int = 1
    lambdas: tuple[float, ...] = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)
    queries: int = 500
    black_box_epsilons: tuple[float, ...] | None = None  # None: the largest epsilon only
    check_every: int = 10
    seed: int = 0
    detectors: tuple[str, ...] | None = None  # None: every detector of the run
    kappas: tuple[float, ...] = (0.0,)  # margins the classifier term pushes past the boundary; one attack each

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "steps": self.steps, "restarts": self.restarts, "lambdas": list(self.lambdas),
                "step_size": "2.5 eps / steps", "queries": self.queries,
                "black_box_epsilons": None if self.black_box_epsilons is None else list(self.black_box_epsilons),
                "check_every": self.check_every, "seed": self.seed,
                "detectors": None if self.detectors is None else list(self.detectors), "kappas": list(self.kappas)}


@dataclass
class ThreatModels:
    """The per-detector attack callback (see the module docstring).

    Args:
        x, y: the clean images attacked and their labels (correctly classified by the model).
        non_adaptive: ``{eps: attacked images}`` of the same images by an attack that ignores the detector.
        reference: clean training images for the feature-matching surrogate.
        budget: the attack sizes.
        log: receives progress lines.
    """

    x: Tensor
    y: Tensor
    non_adaptive: Mapping[float, Tensor]
    reference: Tensor
    budget: AdaptiveBudget = field(default_factory=AdaptiveBudget)
    log: Callable[[str], None] = lambda _msg: None
    _surrogates: dict[int, FeatureMatching] = field(default_factory=dict, repr=False)

    def surrogate(self, net: Any) -> FeatureMatching:
        key = id(net)
        if key not in self._surrogates:
            self._surrogates[key] = FeatureMatching(net, self.reference)
        return self._surrogates[key]

    def __call__(self, det: Any, label: str) -> dict[str, Any] | None:
        b = self.budget
        if b.detectors is not None and label not in b.detectors:
            return None
        wanted = b.black_box_epsilons if b.black_box_epsilons is not None else (max(self.non_adaptive),)
        out: dict[str, Any] = {"white-box method": "score gradient" if det.differentiable else
                               "feature-matching surrogate", "by_epsilon": {}}
        for eps, x_plain in sorted(self.non_adaptive.items()):
            plain = judge(det, x_plain, self.y)
            white = best_of([adaptive_pgd(det, self.x, self.y, eps=eps, steps=b.steps, restarts=b.restarts,
                                          lambdas=b.lambdas, kappa=kappa,
                                          surrogate=None if det.differentiable else self.surrogate(det.net),
                                          check_every=b.check_every, seed=b.seed) for kappa in b.kappas])
            outcomes = [plain, white]
            entry: dict[str, Any] = {"n": int(self.x.shape[0]), "non-adaptive": plain.summary()["evasion"],
                                     "white-box": white.summary()["evasion"],
                                     "fooled (white-box)": white.summary()["fooled"], "black-box": None}
            if any(math.isclose(eps, e) for e in wanted):
                black = score_search(det, self.x, self.y, eps=eps, queries=b.queries, seed=b.seed)
                outcomes.append(black)
                entry["black-box"] = black.summary()["evasion"]
            strongest = best_of(outcomes)
            entry["strongest"] = strongest.summary()["evasion"]
            entry["strongest_at_fpr"] = {f"{f:g}": v for f, v in evasion_at_fprs(det, strongest, TRADE_OFF_FPRS).items()}
            out["by_epsilon"][f"{eps:g}"] = entry
            self.log(f"  {label} eps={eps:g}: evasion non-adaptive {entry['non-adaptive']:.2f}, white-box "
                     f"{entry['white-box']:.2f}" + (f", black-box {entry['black-box']:.2f}" if entry["black-box"]
                                                    is not None else "") + f", strongest {entry['strongest']:.2f}")
        return out


def evasion_table(detectors: Mapping[str, Mapping[str, Any]], epsilons: Sequence[str]) -> str:
    """Markdown: per detector and epsilon, evasion ``non-adaptive / white-box / black-box / strongest``."""
    from .report import markdown_table

    def cell(e: Mapping[str, Any] | None) -> str:
        if e is None:
            return "-"
        bb = "-" if e.get("black-box") is None else f"{e['black-box']:.2f}"
        return f"{e['non-adaptive']:.2f} / {e['white-box']:.2f} / {bb} / **{e['strongest']:.2f}**"

    rows = [[label, d["attacks"]["white-box method"], *(cell(d["attacks"]["by_epsilon"].get(eps)) for eps in epsilons)]
            for label, d in detectors.items() if d.get("attacks")]
    return markdown_table(["detector", "white-box attack", *(f"eps={e}" for e in epsilons)], rows)
