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
* ``"strongest"``: per input, the best of the above at this epsilon and at every smaller one (an image
  attacked within a smaller radius lies within this one too, so the strongest attacker's evasion never
  falls as epsilon grows, even where one attack at a large radius finds less than at a small one).

The strongest attacker's evasion is also judged at the thresholds of other FPRs. The attacked images
are pixels in ``[0, 1]``; for a model that takes another input space (the CIFAR-10 ResNet44 takes
normalised inputs) ``ThreatModels.to_model`` maps them there before every call of the model (see
:mod:`~libnet_plugin.experiments.adaptive`).

The command-line options that size these attacks (``--adaptive-*``, ``--black-box-queries``) are
defined and checked here, once, for ``libnet evaluate-detectors``, ``libnet reproduce mnist`` and ``libnet
reproduce cifar10`` (:func:`add_budget_arguments`, :func:`adaptive_budget` (the one policy: the seed
from ``--seed``), :func:`budget_from_args`, :func:`check_budget_detectors`,
:func:`check_budget_setting`, :func:`sizing_options_given`), and :func:`comparison_evasion_markdown` renders a detector comparison's
evasion section for the reproductions' reports.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from .adaptive import AttackOutcome, FeatureMatching, adaptive_pgd, best_of, evasion_at_fprs, judge, score_search
from .report import ExperimentError

__all__ = ["AdaptiveBudget", "ThreatModels", "clopper_pearson", "evasion_table", "epsilon_label", "evasion_section",
           "comparison_evasion_markdown", "add_budget_arguments", "adaptive_budget", "budget_from_args",
           "check_budget_detectors", "check_budget_setting", "sizing_options_given", "BUDGET_SIZE_OPTIONS",
           "DEFAULT_LAMBDAS", "QUICK_LAMBDAS",
           "TRADE_OFF_FPRS"]

#: FPRs at which the strongest attacker's evasion is also reported (the trade-off curve).
TRADE_OFF_FPRS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3)

#: The default weights of the detector term of the white-box attack: a grid from 0 (the classifier alone,
#: keeping the least suspicious iterate) to 1. The grid matters: against library-fusion (conv1, conv2)
#: the weights 0, 1, 10 reached an evasion of 0.02 at eps 0.3 and this grid 0.80 (a weaker attack, not a
#: more robust detector). Larger weights are left out for time: the detector term then outweighs the
#: classifier's and the attack stops fooling the model.
DEFAULT_LAMBDAS = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0)

#: The weights with ``--quick``.
QUICK_LAMBDAS = (0.0, 0.1, 1.0)


@dataclass(frozen=True)
class AdaptiveBudget:
    """Sizes of the attacks that know the detector (``libnet evaluate-detectors --adaptive-*`` options)."""

    n: int = 48
    steps: int = 100
    restarts: int = 1
    lambdas: tuple[float, ...] = DEFAULT_LAMBDAS
    queries: int = 500
    black_box_epsilons: tuple[float, ...] | None = None  # None: the largest epsilon only
    check_every: int = 10
    seed: int = 0
    detectors: tuple[str, ...] | None = None  # None: every detector of the run
    kappas: tuple[float, ...] = (0.0,)  # margins the classifier term pushes past the boundary; one attack each

    @classmethod
    def quick(cls, **overrides: Any) -> AdaptiveBudget:
        """The budget of ``--quick`` runs: 12 images, 10 steps, 50 queries, :data:`QUICK_LAMBDAS`.

        Example:
            >>> AdaptiveBudget.quick(detectors=("msp",)).describe()["steps"]
            10
        """
        return cls(**{"n": 12, "steps": 10, "queries": 50, "lambdas": QUICK_LAMBDAS, **overrides})

    def validate(self) -> AdaptiveBudget:
        """Return ``self``; raise ``ValueError`` naming the first field out of range.

        Example:
            >>> AdaptiveBudget(n=4, lambdas=(0.0, 1.0)).validate().n
            4
            >>> AdaptiveBudget(steps=0).validate()
            Traceback (most recent call last):
            ...
            ValueError: the adaptive budget's steps must be an integer >= 1, got 0
        """
        for name, low in (("n", 1), ("steps", 1), ("restarts", 1), ("queries", 0), ("check_every", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"the adaptive budget's {name} must be an integer >= {low}, got {v!r}")
        for name in ("lambdas", "kappas"):
            v = getattr(self, name)
            if not v or any(not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0) for x in v):
                raise ValueError(f"the adaptive budget's {name} must be finite numbers >= 0, got {list(v)!r}")
        eps = self.black_box_epsilons
        if eps is not None and any(not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0) for e in eps):
            raise ValueError(f"the adaptive budget's black_box_epsilons must be positive numbers, got {list(eps)!r}")
        if self.detectors is not None and (not self.detectors or not all(isinstance(d, str) for d in self.detectors)):
            raise ValueError(f"the adaptive budget's detectors must be detector labels or None, got {self.detectors!r}")
        return self

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
        to_model: a differentiable map from the images above (pixels, the attack's space: its box, clamp
            and epsilons) to the inputs of the detectors' model, applied before every call of a detector or
            the model (:mod:`~libnet_plugin.experiments.adaptive`); ``None``: the model takes the pixels.
    """

    x: Tensor
    y: Tensor
    non_adaptive: Mapping[float, Tensor]
    reference: Tensor
    budget: AdaptiveBudget = field(default_factory=AdaptiveBudget)
    log: Callable[[str], None] = lambda _msg: None
    to_model: Callable[[Tensor], Tensor] | None = None
    _surrogates: dict[int, FeatureMatching] = field(default_factory=dict, repr=False)

    def surrogate(self, net: Any) -> FeatureMatching:
        """The :class:`FeatureMatching` surrogate of ``net`` on :attr:`reference` (built once per network)."""
        key = id(net)
        if key not in self._surrogates:
            self._surrogates[key] = FeatureMatching(net, self.reference, to_model=self.to_model)
        return self._surrogates[key]

    def summary(self, detectors: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        """``{"budget", "n", "evasion_markdown"}`` of a run's detector entries once they were attacked (the
        ``"adaptive"`` entry of :func:`~libnet_plugin.experiments.comparison.evaluate_detectors`' result)."""
        epsilons = [f"{e:g}" for e in sorted(self.non_adaptive)]
        return {"budget": self.budget.describe(), "n": int(self.x.shape[0]),
                "evasion_markdown": evasion_table(detectors, epsilons)}

    def __call__(self, det: Any, label: str) -> dict[str, Any] | None:
        """The evasion entries of detector ``label`` (``None`` when the budget leaves it out)."""
        b = self.budget
        if b.detectors is not None and label not in b.detectors:
            return None
        wanted = b.black_box_epsilons if b.black_box_epsilons is not None else (max(self.non_adaptive),)
        out: dict[str, Any] = {"white-box method": "score gradient" if det.differentiable else
                               "feature-matching surrogate", "by_epsilon": {}}
        inner: AttackOutcome | None = None  # the strongest outcome at the smaller epsilons: their balls lie inside this one
        for eps, x_plain in sorted(self.non_adaptive.items()):
            plain = judge(det, x_plain, self.y, to_model=self.to_model)
            white = best_of([adaptive_pgd(det, self.x, self.y, eps=eps, steps=b.steps, restarts=b.restarts,
                                          lambdas=b.lambdas, kappa=kappa,
                                          surrogate=None if det.differentiable else self.surrogate(det.net),
                                          check_every=b.check_every, seed=b.seed, to_model=self.to_model)
                             for kappa in b.kappas])
            outcomes = [plain, white]
            entry: dict[str, Any] = {"n": int(self.x.shape[0]), "non-adaptive": plain.summary()["evasion"],
                                     "white-box": white.summary()["evasion"],
                                     "fooled (white-box)": white.summary()["fooled"], "black-box": None}
            if any(math.isclose(eps, e) for e in wanted):
                black = score_search(det, self.x, self.y, eps=eps, queries=b.queries, seed=b.seed,
                                     to_model=self.to_model)
                outcomes.append(black)
                entry["black-box"] = black.summary()["evasion"]
            strongest = best_of(outcomes if inner is None else [*outcomes, inner])
            inner = strongest
            entry["strongest"] = strongest.summary()["evasion"]
            entry["strongest_ci95"] = clopper_pearson(int(strongest.evaded.sum()), int(strongest.evaded.numel()))
            entry["strongest_at_fpr"] = {f"{f:g}": v for f, v in evasion_at_fprs(det, strongest, TRADE_OFF_FPRS).items()}
            out["by_epsilon"][f"{eps:g}"] = entry
            self.log(f"  {label} eps={eps:g}: evasion non-adaptive {entry['non-adaptive']:.2f}, white-box "
                     f"{entry['white-box']:.2f}" + (f", black-box {entry['black-box']:.2f}" if entry["black-box"]
                                                    is not None else "") + f", strongest {entry['strongest']:.2f}")
        return out


def clopper_pearson(k: int, n: int, level: float = 0.95) -> list[float]:
    """The exact (Clopper-Pearson) ``level`` interval ``[low, high]`` of a rate of ``k`` in ``n``.

    Example:
        >>> [round(v, 4) for v in clopper_pearson(1, 48)]   # one image of 48 evades
        [0.0005, 0.1107]
        >>> clopper_pearson(0, 48)[0], clopper_pearson(48, 48)[1]
        (0.0, 1.0)
    """
    from scipy.stats import beta

    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n and n >= 1, got k={k}, n={n}")
    tail = (1.0 - level) / 2
    low = 0.0 if k == 0 else float(beta.ppf(tail, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return [low, high]


def evasion_table(detectors: Mapping[str, Mapping[str, Any]], epsilons: Sequence[str]) -> str:
    """Markdown: per detector and epsilon, evasion ``non-adaptive / white-box / black-box / strongest``, the
    strongest followed by its 95% Clopper-Pearson interval when the entry has one (``strongest_ci95``)."""
    from .report import markdown_table

    def cell(e: Mapping[str, Any] | None) -> str:
        if e is None:
            return "-"
        bb = "-" if e.get("black-box") is None else f"{e['black-box']:.2f}"
        ci = e.get("strongest_ci95")
        interval = "" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]"
        return f"{e['non-adaptive']:.2f} / {e['white-box']:.2f} / {bb} / **{e['strongest']:.2f}**{interval}"

    rows = [[label, d["attacks"]["white-box method"], *(cell(d["attacks"]["by_epsilon"].get(eps)) for eps in epsilons)]
            for label, d in detectors.items() if d.get("attacks")]
    return markdown_table(["detector", "white-box attack", *(f"eps={epsilon_label(e)}" for e in epsilons)], rows)


def epsilon_label(eps: str) -> str:
    """An epsilon as a reader would write it: ``k/255`` when it is one that a short decimal does not show.

    Example:
        >>> epsilon_label(f"{8 / 255:g}"), epsilon_label("0.2"), epsilon_label("0.3")
        ('8/255', '0.2', '0.3')
    """
    value = float(eps)
    k = round(value * 255)
    if len(eps) > 5 and 0 < k < 255 and abs(value * 255 - k) < 1e-3:
        return f"{k}/255"
    return eps


def evasion_section(adaptive: Mapping[str, Any], fpr: float, *, heading: str = "###",
                    figure: str | None = "evasion.png") -> str:
    """Markdown: the evasion table of a run (``adaptive`` as ``{"budget": AdaptiveBudget.describe(), "n",
    "evasion_markdown"}``) under a heading, with what the cells are, the budget and the figure's link."""
    b = adaptive["budget"]
    text = (f"{heading} Evasion: misclassified and not flagged at the calibrated threshold (FPR {fpr:g})\n\n"
            f"Cells: non-adaptive PGD / white-box adaptive / black-box score-only / strongest per input "
            f"[its 95% Clopper-Pearson interval], on "
            f"{adaptive['n']} correctly classified images; white-box PGD {b['steps']} steps, "
            f"{b['restarts']} restart(s), lambdas {b['lambdas']}; black-box {b['queries']} queries.\n\n"
            + adaptive["evasion_markdown"])
    return text + (f"\n\n![evasion against eps and against the FPR]({figure})" if figure else "")


# --------------------------------------------------------------------------------------------------
# Command-line options (shared by `libnet evaluate-detectors`, `libnet reproduce mnist` and `reproduce cifar10`)
# --------------------------------------------------------------------------------------------------


def add_budget_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, *, detectors_help: str) -> None:
    """Add ``--adaptive-detectors``, ``--adaptive-n``, ``--adaptive-steps``, ``--adaptive-restarts``,
    ``--adaptive-lambdas``, ``--adaptive-kappas`` and ``--black-box-queries`` to ``parser`` (or an argument
    group); ``detectors_help`` is the help of ``--adaptive-detectors``, whose meaning differs between the
    commands. :func:`budget_from_args` reads and checks them."""
    parser.add_argument("--adaptive-detectors", nargs="+", metavar="LABEL", help=detectors_help)
    parser.add_argument("--adaptive-n", type=int, metavar="N",
                        help="correctly classified images attacked per detector (default 48; 12 with --quick)")
    parser.add_argument("--adaptive-steps", type=int, metavar="N", help="PGD steps per restart (default 100)")
    parser.add_argument("--adaptive-restarts", type=int, default=1, metavar="N",
                        help="random restarts per lambda (default: %(default)s)")
    parser.add_argument("--adaptive-lambdas", nargs="+", type=float, metavar="L",
                        help="weights of the detector term (default: " + " ".join(f"{v:g}" for v in DEFAULT_LAMBDAS)
                             + "; " + " ".join(f"{v:g}" for v in QUICK_LAMBDAS) + " with --quick)")
    parser.add_argument("--adaptive-kappas", nargs="+", type=float, default=[0.0], metavar="K",
                        help="margins by which the white-box attack pushes the wrong class ahead, one attack each, "
                             "the best per image kept (default: 0; e.g. 0 5 against confidence-based scores)")
    parser.add_argument("--black-box-queries", type=int, metavar="N",
                        help="queries of the score-only search, at the largest epsilon (default 500)")


#: The options of :func:`add_budget_arguments` that only size the attacks (not ``--adaptive-detectors``):
#: ``{option: (attribute of the parsed arguments, its value when the option is not given)}``.
BUDGET_SIZE_OPTIONS: dict[str, tuple[str, Any]] = {
    "--adaptive-n": ("adaptive_n", None), "--adaptive-steps": ("adaptive_steps", None),
    "--adaptive-restarts": ("adaptive_restarts", 1), "--adaptive-lambdas": ("adaptive_lambdas", None),
    "--adaptive-kappas": ("adaptive_kappas", [0.0]), "--black-box-queries": ("black_box_queries", None),
}


def sizing_options_given(args: argparse.Namespace) -> list[str]:
    """The options of :data:`BUDGET_SIZE_OPTIONS` given on the command line (for a command that refuses
    them when no attack that knows the detector will run)."""
    return [opt for opt, (attr, unset) in BUDGET_SIZE_OPTIONS.items() if getattr(args, attr) != unset]


def comparison_evasion_markdown(table: Mapping[str, Any]) -> str | None:
    """The evasion section of a detector comparison (what
    :func:`~libnet_plugin.experiments.comparison.evaluate_detectors` returns, the ``"table"`` of
    :func:`~libnet_plugin.experiments.comparison.detector_comparison`) for ``detectors.md`` and the
    reproductions' reports: the table, the budget and ``evasion.png`` when drawn; the note when no image
    could be attacked; ``None`` when the comparison ran no attack that knows the detector."""
    adaptive = table.get("adaptive")
    if adaptive is None:
        return None
    if "evasion_markdown" not in adaptive:
        return str(adaptive["note"])
    figure = "evasion.png" if table.get("files", {}).get("evasion_png") else None
    return evasion_section(adaptive, table["settings"]["fpr"], figure=figure)


def budget_from_args(args: argparse.Namespace, *, quick: bool, seed: int) -> AdaptiveBudget:
    """The :class:`AdaptiveBudget` of the options of :func:`add_budget_arguments`, checked.

    Defaults: 48 images, 100 steps, 500 queries, :data:`DEFAULT_LAMBDAS`; with ``quick`` 12 images, 10
    steps, 50 queries, :data:`QUICK_LAMBDAS`. ``args.adaptive_detectors`` becomes ``budget.detectors``
    (``None`` when not given).

    Raises:
        ExperimentError: a value out of range; the message names the option(s) and the values.
    """
    base = AdaptiveBudget.quick() if quick else AdaptiveBudget()
    n = args.adaptive_n if args.adaptive_n is not None else base.n
    steps = args.adaptive_steps if args.adaptive_steps is not None else base.steps
    queries = args.black_box_queries if args.black_box_queries is not None else base.queries
    given = args.adaptive_lambdas
    lambdas = tuple(float(v) for v in given) if given is not None else base.lambdas
    only = tuple(args.adaptive_detectors) if args.adaptive_detectors else None
    if n < 1 or steps < 1 or args.adaptive_restarts < 1 or queries < 0:
        raise ExperimentError(f"--adaptive-n, --adaptive-steps and --adaptive-restarts must be >= 1 and "
                              f"--black-box-queries >= 0, got {n}, {steps}, {args.adaptive_restarts}, {queries}")
    if not lambdas or any(not (v >= 0 and v < float("inf")) for v in lambdas):
        raise ExperimentError(f"--adaptive-lambdas must be finite numbers >= 0, got {list(lambdas)}")
    kappas = tuple(float(v) for v in args.adaptive_kappas)
    if not kappas or any(not (v >= 0 and v < float("inf")) for v in kappas):
        raise ExperimentError(f"--adaptive-kappas must be finite numbers >= 0, got {list(kappas)}")
    return AdaptiveBudget(n=n, steps=steps, restarts=args.adaptive_restarts, lambdas=lambdas, queries=queries,
                          seed=seed, detectors=only, kappas=kappas)


def adaptive_budget(args: argparse.Namespace, *, quick: bool, enabled: bool, off: str, refuse: str | None = None,
                    default_detectors: Sequence[str] | None = None) -> AdaptiveBudget | None:
    """The one budget policy of ``libnet evaluate-detectors``, ``reproduce mnist`` and ``reproduce cifar10``.

    The budget's seed is ``args.seed`` (each command's ``--seed``), its sizes those of
    :func:`budget_from_args`, its detectors ``--adaptive-detectors`` or else ``default_detectors``.

    Args:
        args: parsed options of :func:`add_budget_arguments` and ``--seed``.
        quick: the command's ``--quick`` (the smaller default sizes).
        enabled: whether the command runs the attacks that know the detector.
        off: completes the error raised when they do not run but options that size them are given (e.g.
            ``"size the attacks that know the detector, which --no-adaptive skips"``).
        refuse: why the attacks cannot run with the command's other options (``None``: they can); raised
            when they are asked for explicitly.
        default_detectors: the detectors attacked without ``--adaptive-detectors`` (``None``: every one).

    Returns:
        The budget, or ``None`` when the attacks do not run.

    Raises:
        ExperimentError: a value out of range, options that contradict each other (named in the message).
    """
    explicit = sizing_options_given(args) + (["--adaptive-detectors"] if args.adaptive_detectors else [])
    if not enabled:
        if explicit:
            raise ExperimentError(f"{', '.join(explicit)} {off}")
        return None
    budget = budget_from_args(args, quick=quick, seed=args.seed)
    if refuse is not None and explicit:
        raise ExperimentError(refuse)
    if budget.detectors is None and default_detectors is not None:
        budget = AdaptiveBudget(**{**budget.__dict__, "detectors": tuple(default_detectors)})
    return budget


def check_budget_setting(adaptive: Any, labels: Sequence[str] | None = None) -> None:
    """An experiment's ``adaptive`` setting, checked: ``None`` or a valid :class:`AdaptiveBudget` whose
    ``detectors`` are among ``labels`` (when given; :func:`check_budget_detectors`), else
    :class:`~libnet_plugin.experiments.report.ExperimentError` (the message names the ``--adaptive-*``
    options)."""
    if adaptive is None:
        return
    if not isinstance(adaptive, AdaptiveBudget):
        raise ExperimentError(f"adaptive must be an AdaptiveBudget or None, got {type(adaptive).__name__}")
    try:
        adaptive.validate()
    except ValueError as exc:
        raise ExperimentError(f"adaptive (--adaptive-*): {exc}") from None
    if labels is not None:
        check_budget_detectors(adaptive, labels)


def check_budget_detectors(budget: AdaptiveBudget | None, labels: Sequence[str]) -> None:
    """Raise :class:`~libnet_plugin.experiments.report.ExperimentError` when ``budget.detectors`` names a
    label that is not among the run's detector ``labels`` (the message names ``--adaptive-detectors``)."""
    if budget is None or budget.detectors is None:
        return
    unknown = sorted(set(budget.detectors) - set(labels))
    if unknown:
        raise ExperimentError(f"--adaptive-detectors {unknown} are not among the detectors of this run: {sorted(labels)}")
