"""The detector comparison: every listed detector calibrated on the same clean data and scored on the same sets.

:func:`evaluate_detectors` is the engine (AUROC, TPR at the calibrated FPR, the held-out FPR over random
splits, time and memory per detector, ROC curves); :func:`detector_comparison` runs it on an
experiment's data (the successful standard-protocol attacks on correctly classified inputs, plus
out-of-domain sets) and, when asked (``adaptive=``), attacks each calibrated detector with the attacks
that know it (:class:`~libnet_plugin.experiments.threat_models.ThreatModels`), in pixel space also for
a model that takes normalised inputs. The detectors compared are those that the plugins list through the
``libnet_detector_comparison`` hook (:func:`libnet_plugin.plugins.registered_detectors`).

What :func:`evaluate_detectors` returns, a JSON-able dict::

    {
      "settings": {"fpr", "n_train", "n_calibration", "n_clean", "layers", "thresholds",
                   "library_sizes", "batch_size"},
      "sets": {set name: {"kind": "attack" | "ood", "n": int}},
      "forward_ms_per_1000": float,        # the model alone, same batches
      "detectors": {label: {
          "method": str, "settings": dict, "library_based": bool,
          "auroc": {set: float}, "tpr_at_fpr": {set: float},   # TPR at fpr of the clean eval set
          "auroc_ci95": {set: [low, high]},  # 95% percentile bootstrap interval (n_boot resamples)
          "auroc_vs_best_baseline": {set: {"baseline", "difference", "ci95"}},  # library-based ones,
                                           # when the run has a baseline (not library-based)
          "fpr_at_95tpr": {set: float}, "aupr": {set: float},  # attacked / OOD inputs positive
          "tpr_calibrated": {set: float},  # flagged at the calibrated threshold
          "heldout_fpr": float,            # clean evaluation inputs flagged (n = settings.n_clean)
          "fpr_check": {"requested", "mean", "sd", "min", "max", "n_calibration", "n_heldout",
                        "n_splits"},       # held-out FPR over random halves of all clean inputs
          "threshold": float, "fit_s": float, "ms_per_1000": float,
          "time_ratio": float,             # ms_per_1000 / forward_ms_per_1000
          "memory_bytes": {"library": int, "detector": int, "kept": int}}},
      "rows": [ {"detector": label, "<set>": "AUROC / TPR", ..., "held-out FPR", "ms / 1000",
                 "x forward", "memory MB"} ],   # one flat row per detector, for rendering
      "table_markdown": str,              # AUROC / TPR per set, FPR check, time, memory
      "metric_tables": {metric: str},     # one markdown table per metric, detectors x sets, and
                                          # "auroc_vs_best_baseline": difference [95% interval]
      "best_library_based": label or None,  # highest mean AUROC over the attack sets
      "files": {"json", "markdown", "roc_png"} (paths, when out_dir is given),
      "skipped": {label: why},            # only when some were: with ``detectors=None``, the
                                          # post-hoc peers this model cannot serve (PeerNotApplicableError)
    }

``memory_bytes.kept`` is what the detector keeps in memory: the library network plus its own
tensors for library-based detectors, its own tensors only for the baselines.
"""

from __future__ import annotations

import io
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._batches import iter_batches
from ..consistency_detector import ConsistencyDetector
from ..detectors import ConformalFusion, FusedLayerScore, PeerNotApplicableError
from ..detectors.conformal import fisher
from ..errors import ShapeMismatchError
from ..network import LibraryNetwork
from ..plugins import registered_detectors
from ..serialization import atomic_write_bytes
from .protocols import PROTOCOLS, AttackSet, aupr, auroc, auroc_bootstrap, fpr_at_tpr, to_model_space, tpr_at_fpr
from .report import (
    ensure_writable_dir,
    markdown_table,
    write_json_atomic,
    write_text_atomic,
)
from .threat_models import AdaptiveBudget, ThreatModels, check_budget_setting, comparison_evasion_markdown

__all__ = ['ComparisonSettings', 'DetectorComparisonSettings', 'detector_comparison', 'MNIST_CONV_VARIANT',
           'MNIST_DISTANCE_VARIANT', 'MNIST_FUSION_VARIANT', 'MNIST_VARIANTS', 'calibration_check',
           'evaluate_detectors', 'plot_roc_curves']


def _model_answers(net: Any, x: Tensor, batch_size: int) -> Tensor:
    """The answers (argmax of the outputs) of the model behind ``net.probe`` on ``x``, on the CPU."""
    return torch.cat([net.probe.run(xb).outputs.argmax(dim=1).cpu() for xb, _ in iter_batches(x, batch_size)])

@dataclass(frozen=True)
class DetectorComparisonSettings:
    """The settings of :func:`detector_comparison`, checked once when made (``ValueError`` naming the field).

    Attributes:
        space: the model's input space, ``"pixels"`` or ``"normalized"``.
        mean / std: the normalisation relating the two spaces.
        protocol: which protocol's attack sets to use.
        detectors / fpr / fpr_splits / batch_size: :class:`ComparisonSettings`' (passed to
            :func:`evaluate_detectors`).
        adaptive: the sizes of the attacks that know the detector (``None``: none). Each calibrated detector
            (or those of ``adaptive.detectors``) is attacked through ``evaluate_detectors``'
            ``attack_detector`` by a :class:`~libnet_plugin.experiments.threat_models.ThreatModels` on the
            first ``adaptive.n`` test images that every standard-protocol attack set attacked and that the
            model classifies correctly: white-box adaptive PGD and the score-only search at each
            set's epsilon, in pixel space (box, clamp and epsilon), the model reached through the
            pixel-to-``space`` map (``to_model``); the non-adaptive entry per epsilon is that set's PGD
            images of the same inputs; the feature-matching surrogate's reference is the first
            ``n_reference`` training images. Needs ``protocol="standard"``.
        n_reference: training images of the feature-matching reference (with ``adaptive``).

    Example:
        >>> DetectorComparisonSettings(space="pixels", mean=0.0, std=1.0, fpr=0.1).comparison().fpr
        0.1
    """

    space: str
    mean: Any
    std: Any
    protocol: str = "standard"
    detectors: Any = None
    fpr: float = 0.05
    fpr_splits: int = 50
    batch_size: int = 256
    adaptive: AdaptiveBudget | None = None
    n_reference: int = 2000

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.protocol!r}")
        if self.space not in ("pixels", "normalized"):
            raise ValueError(f"space must be 'pixels' or 'normalized', got {self.space!r}")
        self.comparison()  # detectors, fpr, fpr_splits, batch_size
        if self.adaptive is not None:
            check_budget_setting(self.adaptive)
            if self.protocol != "standard":
                raise ValueError(f"adaptive attacks run on the standard protocol's pixel-space PGD sets; got "
                                 f"protocol {self.protocol!r}")
            if isinstance(self.n_reference, bool) or not isinstance(self.n_reference, int) or self.n_reference < 1:
                raise ValueError(f"n_reference must be a positive integer, got {self.n_reference!r}")

    def comparison(self) -> ComparisonSettings:
        """The :class:`ComparisonSettings` that :func:`evaluate_detectors` runs with."""
        return ComparisonSettings(detectors=self.detectors, fpr=self.fpr, fpr_splits=self.fpr_splits,
                                  batch_size=self.batch_size)


def detector_comparison(net: Any, train: tuple[Tensor, Tensor | None], clean_test: tuple[Tensor, Tensor],
                        attack_sets: Sequence[AttackSet], *, ood_sets: Mapping[str, Tensor] | None = None,
                        out_dir: str | os.PathLike | None = None, log: Callable[[str], None] | None = None,
                        settings: DetectorComparisonSettings | None = None, **options: Any) -> dict[str, Any]:
    """The detector comparison of :func:`evaluate_detectors` on an experiment's data.

    Shared by ``libnet reproduce mnist`` and ``libnet reproduce cifar10``. Every input is given in pixel
    space (``[0, 1]``) or, for attack sets, in the space the :class:`AttackSet` records, and is moved to
    the model's input space ``space`` here. :class:`AttackSet` holds *every* attacked input, so the
    selection of the standard protocol is made here from ``net``'s model: an attacked input is kept only
    when the model classifies its clean version correctly and the attacked one wrongly (a successful
    attack on a correctly classified input), the same rule as :func:`evaluate_protocol`.

    Args:
        net: a fitted :class:`~libnet_plugin.LibraryNetwork` (e.g. :meth:`LibrarySweep.to_network` at one
            threshold set); its model gives the answers used for the selection.
        train: ``(x_train, y_train)`` in pixels; ``y_train`` may be ``None`` (then detectors that need
            labels fit on the inputs alone, as :func:`evaluate_detectors` allows).
        clean_test: ``(x_test, y_test)`` in pixels. Its second half calibrates the detectors and its first
            half is the clean evaluation set. The protocols attack the first test inputs, so the attacked
            inputs are clean evaluation inputs, never calibration ones: an attack on an input of the
            second half is left out (the log says how many).
        attack_sets: attack sets of an experiment; those of ``protocol`` are used, one attacked set
            ``"PGD eps=<epsilon>"`` per epsilon, their ``indices`` pointing into ``clean_test``.
        ood_sets: ``{name: inputs in pixels}`` of out-of-domain inputs.
        out_dir: folder receiving ``detectors.json``, ``detectors.md`` and ``roc.png``.
        log: a function receiving progress lines (default: silent).
        settings: the :class:`DetectorComparisonSettings` (the model's input ``space``, ``mean`` / ``std``,
            the ``protocol``, the detectors and ``fpr``, the ``adaptive`` attacks); ``options`` are its
            fields given as keywords instead (``space``, ``mean`` and ``std`` at least), or replace some of
            ``settings``'.

    Returns:
        ``{"available": True, "protocol": protocol, "attacks": {set name: {"epsilon", "attacked",
        "successful"}}, "table": <what evaluate_detectors returns>}`` (its ``"table_markdown"`` renders
        the table), or ``{"available": False, "note": why}`` when there are no attack sets of
        ``protocol``, too few test images to calibrate at ``fpr``,
        or no attack succeeded. With ``adaptive``, each attacked detector's entry of ``table["detectors"]``
        has ``"attacks"`` (:class:`~libnet_plugin.experiments.threat_models.ThreatModels`' evasion rates
        per epsilon), and ``table["adaptive"]`` is ``{"budget": adaptive.describe(), "n": images attacked,
        "evasion_markdown": the evasion table}`` (with ``"note"`` in place of the table when no attacked
        image is classified correctly); with ``out_dir``, ``detectors.md`` also holds the evasion table and
        ``evasion.png`` (``table["files"]["evasion_png"]``) the figure.

    Raises:
        ValueError: an unknown protocol or space, ``clean_test`` without labels, or ``adaptive`` with
            another protocol than ``"standard"`` or naming a detector that is not compared.
        ShapeMismatchError: an attack set's indices point outside ``clean_test``.

    Example:
        >>> res = detector_comparison(net, (x_tr, y_tr), (x_te, y_te), sets, space="normalized",
        ...                           mean=MNIST_MEAN, std=MNIST_STD, out_dir="runs/q")  # doctest: +SKIP
        >>> print(res["table"]["table_markdown"])  # doctest: +SKIP
    """
    s = DetectorComparisonSettings(**options) if settings is None else replace(settings, **options)
    x_test, y_test = clean_test
    if y_test is None:
        raise ValueError("detector_comparison needs the test labels to select the successful attacks")
    _check_adaptive_detectors(s, net)
    sets = [a for a in attack_sets if a.protocol == s.protocol]
    if not sets:
        return {"available": False,
                "note": f"No {s.protocol}-protocol attacks in this run, so no detector table"}
    need = math.ceil(1.0 / s.fpr) - 1  # calibrating at fpr takes at least this many clean inputs
    if x_test.shape[0] // 2 < need:
        return {"available": False,
                "note": f"The detector comparison calibrates on half of the test images and needs at least {need} "
                        f"for FPR {s.fpr:g}; this run has {x_test.shape[0]} test images, so no detector table"}
    say = log or (lambda _msg: None)
    x_test_m = to_model_space(x_test, "pixels", s.space, s.mean, s.std)
    y_test = y_test.long().cpu()
    half = x_test.shape[0] // 2  # [:half] clean evaluation and attacked inputs, [half:] calibration
    attacked, info, clean_answers = _successful_attacks(net, sets, x_test_m, y_test, half, s, say)
    if not attacked:
        return {"available": False, "attacks": info,
                "note": f"No {s.protocol}-protocol attack succeeded on a correctly classified input, so no "
                        "detector table"}
    x_train, y_train = train
    x_train_m = to_model_space(x_train, "pixels", s.space, s.mean, s.std)
    ood = {name: to_model_space(x, "pixels", s.space, s.mean, s.std) for name, x in (ood_sets or {}).items()}
    threats, no_attack = None, None
    if s.adaptive is not None and not isinstance(net.model, torch.nn.Module):
        no_attack = ("No attack that knows the detector: they follow the torch model's gradients, and an ONNX "
                     "model gives none (only a torch model is attacked this way)")
    elif s.adaptive is not None:
        threats = _threat_models(s.adaptive, sets, (x_test, y_test), x_train[:s.n_reference], clean_answers,
                                 space=s.space, mean=s.mean, std=s.std, log=say, limit=half)
        if threats is None:
            no_attack = ("No attacked test image is classified correctly by the model, so no attack that knows the "
                         "detector")
    table = evaluate_detectors(net, x_train_m if y_train is None else (x_train_m, y_train), x_test_m[:half], attacked,
                               ood, out_dir=out_dir, calibration=x_test_m[half:], settings=s.comparison(), log=log,
                               attack_detector=threats)
    if s.adaptive is not None and no_attack is not None:
        say(f"adaptive attacks: {no_attack}")
        table["adaptive"] = {"budget": s.adaptive.describe(), "n": 0, "note": no_attack}
    return {"available": True, "protocol": s.protocol, "attacks": info, "table": table}


def _check_adaptive_detectors(s: DetectorComparisonSettings, net: Any) -> None:
    """``ValueError`` when ``s.adaptive.detectors`` names a detector that the comparison does not hold."""
    if s.adaptive is None or s.adaptive.detectors is None:
        return
    labels = list(_resolve_detectors(s.detectors, net.plugin_manager))
    unknown = sorted(set(s.adaptive.detectors) - set(labels))
    if unknown:
        raise ValueError(f"adaptive.detectors {unknown} are not among the detectors compared: {sorted(labels)}")


def _successful_attacks(net: Any, sets: Sequence[AttackSet], x_test_m: Tensor, y_test: Tensor, half: int,
                        s: DetectorComparisonSettings, say: Callable[[str], None]
                        ) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], dict[tuple[int, ...], Tensor]]:
    """The standard protocol's selection of :func:`detector_comparison`: per set, the attacked inputs (in the
    model's space) whose clean version the model classifies correctly and the attacked one wrongly, among the
    clean evaluation inputs (test positions below ``half``). Returns ``(attacked, info, clean answers by the
    sets' indices)``."""
    attacked: dict[str, Tensor] = {}
    info: dict[str, dict[str, Any]] = {}
    clean_answers: dict[tuple[int, ...], Tensor] = {}
    n_test = x_test_m.shape[0]
    for a in sets:
        idx = a.indices.long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_test):
            raise ShapeMismatchError(f"{a.protocol} attacks at epsilon {a.epsilon:g} point to test positions up to "
                                     f"{int(idx.max())}, but the test set has {n_test} inputs")
        key = tuple(idx.tolist())
        if key not in clean_answers:  # the sets of one protocol usually attack the same inputs
            clean_answers[key] = _model_answers(net, x_test_m[idx], s.batch_size)
        x_adv = to_model_space(a.x_adv, a.space, s.space, s.mean, s.std)
        keep = (clean_answers[key] == y_test[idx]) & (_model_answers(net, x_adv, s.batch_size) != y_test[idx])
        evaluable = idx < half
        keep &= evaluable
        name = f"PGD eps={a.epsilon:g}"
        info[name] = {"epsilon": a.epsilon, "attacked": int(evaluable.sum()), "successful": int(keep.sum())}
        left_out = int((~evaluable).sum())
        say(f"{name}: {int(keep.sum())} successful attacks on correctly classified inputs of {int(evaluable.sum())}"
            + (f" ({left_out} attacked inputs of the calibration half left out)" if left_out else ""))
        if bool(keep.any()):
            attacked[name] = x_adv[keep.to(x_adv.device)]
    return attacked, info, clean_answers


def _threat_models(budget: AdaptiveBudget, sets: Sequence[AttackSet], clean_test: tuple[Tensor, Tensor],
                   reference: Tensor, clean_answers: Mapping[tuple[int, ...], Tensor], *, space: str, mean: Any,
                   std: Any, log: Callable[[str], None], limit: int) -> ThreatModels | None:
    """The :class:`ThreatModels` of :func:`detector_comparison`'s ``adaptive=`` (``None``: no image to attack).

    The attacked images are the test inputs that every set of ``sets`` attacked (in the first set's order)
    and that the model classifies correctly (``clean_answers``, keyed by each set's indices) among the clean
    evaluation inputs (test positions below ``limit``), the first ``budget.n`` of them, in pixels; the
    non-adaptive entry of epsilon ``e`` is the set's attacked version of the same inputs, moved to pixels.
    ``to_model`` maps pixels to ``space``.
    """
    x_test, y_test = clean_test
    first = sets[0].indices.long().cpu()
    positions = [{int(t): p for p, t in enumerate(s.indices.long().cpu().tolist())} for s in sets]
    common = [p for p, t in enumerate(first.tolist()) if all(t in pos for pos in positions[1:])]
    answers = clean_answers[tuple(first.tolist())]
    ok = [p for p in common if int(first[p]) < limit and int(answers[p]) == int(y_test[first[p]])][:budget.n]
    if not ok:
        return None
    idx = first[ok]
    non_adaptive = {}
    for s, pos in zip(sets, positions):
        rows = torch.tensor([pos[int(t)] for t in idx.tolist()], dtype=torch.long)
        non_adaptive[float(s.epsilon)] = to_model_space(s.x_adv[rows.to(s.x_adv.device)], s.space, "pixels",
                                                        mean, std).cpu()
    to_model = None if space == "pixels" else partial(to_model_space, space="pixels", model_space=space, mean=mean,
                                                      std=std)
    log(f"adaptive attacks: {len(ok)} correctly classified test images, epsilons "
        + ", ".join(f"{e:g}" for e in sorted(non_adaptive)) + " (pixels)")
    return ThreatModels(x_test[idx].cpu(), y_test[idx].long().cpu(), non_adaptive, reference.cpu(), budget, log,
                        to_model=to_model)


#: The library-based score restricted to the MNIST net's convolution layers (added by the MNIST run).
MNIST_CONV_VARIANT = "library-margin (conv1, conv2)"


#: The library Mahalanobis distance on the MNIST net's convolution layers (added by the MNIST run); the
#: layers were chosen on dev splits (other seeds), not on the reported sets.
MNIST_DISTANCE_VARIANT = "library-distance (conv1, conv2)"


#: The recommended score on the MNIST net's convolution layers (added by the MNIST run).
MNIST_FUSION_VARIANT = "library-fusion (conv1, conv2)"


#: Detectors the MNIST run adds to the registered ones: ``{label: (name, settings)}``.
MNIST_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    MNIST_CONV_VARIANT: ("library-margin", {"layers": ["conv1", "conv2"]}),
    MNIST_DISTANCE_VARIANT: ("library-distance", {"layers": ["conv1", "conv2"]}),
    MNIST_FUSION_VARIANT: ("library-fusion", {"layers": ["conv1", "conv2"]}),
}



def _as_tensor(data: Any, batch_size: int) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, Tensor):
        return data, None
    xs, ys = [], []
    for x, y in iter_batches(data, batch_size):
        xs.append(x)
        if y is not None:
            ys.append(y)
    if not xs:
        raise ValueError("received an empty data set")
    return torch.cat(xs), (torch.cat(ys) if len(ys) == len(xs) else None)

def _resolve_detectors(detectors: Any, pm: Any) -> dict[str, tuple[str, dict[str, Any]]]:
    if detectors is None:
        out = registered_detectors(pm)
        if not out:
            raise ValueError("no registered plugin lists a detector (LIBNET_DETECTORS); pass detectors=...")
        return out
    if isinstance(detectors, Mapping):
        out = {}
        for label, spec in detectors.items():
            if isinstance(spec, str):
                out[str(label)] = (spec, {})
            else:
                name, settings = spec
                out[str(label)] = (str(name), dict(settings))
        return out
    if isinstance(detectors, str):
        detectors = [detectors]
    return {str(name): (str(name), {}) for name in detectors}

def _time_scores(fn: Callable[[Tensor], Any], x: Tensor, batch_size: int) -> tuple[float, Any]:
    """Milliseconds per 1,000 inputs of ``fn`` over ``x`` in batches (after one warm-up batch), and the outputs."""
    fn(x[: min(batch_size, x.shape[0])])
    outs = []
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        outs.append(fn(x[i:i + batch_size]))
    elapsed = time.perf_counter() - t0
    return elapsed / x.shape[0] * 1e6, outs

def calibration_check(det: ConsistencyDetector, x_clean: Any, fpr: float, n_splits: int = 50,
                      seed: int = 0) -> dict[str, Any]:
    """Held-out false-positive rate of ``det``'s calibration over random halves of clean data.

    The clean inputs are scored once (per-layer features for fused scores); each split calibrates on one
    random half exactly as :meth:`ConsistencyDetector.calibrate` does (the conformal quantile; for fused
    scores the clean reference of the p-values too) and counts the flagged inputs of the other half.

    Returns:
        ``{"requested", "mean", "sd", "min", "max", "n_calibration", "n_heldout", "n_splits"}``.
    """
    return _split_fpr(det.calibration_features(x_clean), _combination(det), fpr, n_splits, seed)


def _combination(det: ConsistencyDetector) -> Callable[[Tensor, Tensor], Tensor] | None:
    """How ``det``'s score fuses p-values given the clean reference's p-values (None: a plain score);
    Fisher's for fused plugins of their own."""
    if not det.scorer.fuses:
        return None
    if isinstance(det.scorer, FusedLayerScore):
        return det.scorer.combine_on
    return lambda p_values, _reference: fisher(p_values)


def _split_fpr(data: Tensor, combine: Callable[[Tensor, Tensor], Tensor] | None, fpr: float, n_splits: int,
               seed: int) -> dict[str, Any]:
    """:func:`calibration_check` on what :meth:`ConsistencyDetector.calibration_features` returned for clean inputs;
    ``combine(p_values, reference_p_values)`` fuses the per-feature p-values of fused scores, fitted anew on
    each split's calibration half (None for plain scores)."""

    data = data.detach().double().cpu()
    n = data.shape[0]
    n_cal = n // 2
    rank = math.ceil((n_cal + 1) * (1.0 - fpr))
    if rank > n_cal:
        raise ValueError(f"calibration_check needs at least {2 * (math.ceil(1 / fpr) - 1)} clean inputs, got {n}")
    g = torch.Generator().manual_seed(seed)
    rates = []
    for _ in range(int(n_splits)):
        perm = torch.randperm(n, generator=g)
        cal, held = data[perm[:n_cal]], data[perm[n_cal:]]
        if combine is not None:
            fusion = ConformalFusion()
            cal_p = fusion.fit_p_values(cal)
            cal_scores, held_scores = combine(cal_p, cal_p), combine(fusion.p_values(held), cal_p)
        else:
            cal_scores, held_scores = cal, held
        threshold = cal_scores.sort().values[rank - 1]
        rates.append(float((held_scores > threshold).double().mean()))
    r = np.asarray(rates)
    return {"requested": fpr, "mean": float(r.mean()), "sd": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
            "min": float(r.min()), "max": float(r.max()), "n_calibration": n_cal, "n_heldout": n - n_cal,
            "n_splits": int(n_splits)}

@dataclass(frozen=True)
class ComparisonSettings:
    """The settings of :func:`evaluate_detectors`, checked once when made (``ValueError`` naming the field).

    Attributes:
        detectors: ``None`` (every detector the registered plugins list), a list of detector names, or
            ``{label: name | (name, settings)}``.
        fpr: the false-positive rate each detector is calibrated to.
        batch_size: scoring batch size (timings are per 1,000 inputs at this batch size).
        fpr_splits: random halves of the calibration + clean evaluation inputs over which the held-out
            false-positive rate of the calibration is measured (:func:`calibration_check`).
        n_boot: bootstrap resamples of the clean and attacked / OOD inputs behind the AUROC intervals
            (:func:`~libnet_plugin.experiments.protocols.auroc_bootstrap`; the same resamples for every
            detector, so the intervals of AUROC differences are paired).
        layers / thresholds: used only when :func:`evaluate_detectors` is given a model (it builds the
            library network from them).
        plugin_manager: where detectors are looked up (default: the network's).

    Example:
        >>> ComparisonSettings(fpr=0.1, n_boot=50).fpr_splits
        50
        >>> ComparisonSettings(fpr=1.0)
        Traceback (most recent call last):
        ...
        ValueError: fpr must be a number in (0, 1), got 1.0
    """

    detectors: Any = None
    fpr: float = 0.05
    batch_size: int = 256
    fpr_splits: int = 50
    n_boot: int = 1000
    layers: Sequence[str] | None = None
    thresholds: Any = None
    plugin_manager: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.fpr, bool) or not (isinstance(self.fpr, (int, float)) and 0.0 < self.fpr < 1.0):
            raise ValueError(f"fpr must be a number in (0, 1), got {self.fpr!r}")
        for name in ("batch_size", "fpr_splits", "n_boot"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")


@dataclass
class _Run:
    """What every detector of one :func:`evaluate_detectors` call is evaluated on."""

    net: LibraryNetwork
    pm: Any
    train: Any
    x_cal: Tensor
    x_clean: Tensor
    sets: dict[str, Tensor]
    settings: ComparisonSettings
    forward_ms: float


def evaluate_detectors(net_or_model: Any, train: Any, clean_test: Any, attacked_sets: Mapping[str, Tensor],
                       ood_sets: Mapping[str, Tensor] | None = None, detectors: Any = None,
                       out_dir: str | os.PathLike | None = None, *, calibration: Any = None,
                       settings: ComparisonSettings | None = None, log: Callable[[str], None] | None = None,
                       attack_detector: Callable[[ConsistencyDetector, str], dict[str, Any] | None] | None = None,
                       **options: Any) -> dict[str, Any]:
    """Calibrate every detector on the same clean data and score it on the same attacked / OOD sets.

    Args:
        net_or_model: a fitted :class:`~libnet_plugin.LibraryNetwork`; an unfitted one (fitted here on
            ``train``); or a model, with ``layers`` and ``thresholds``.
        train: the training data (anything ``LibraryNetwork.fit`` accepts; labels are used by ``"knn"``).
        clean_test: clean test inputs (Tensor or data). Without ``calibration``, its first half calibrates
            and its second half is the clean evaluation set.
        attacked_sets: ``{name: Tensor}`` of attacked inputs (only successful attacks, in the model's input
            space).
        ood_sets: ``{name: Tensor}`` of out-of-domain inputs.
        detectors: :class:`ComparisonSettings`' ``detectors`` (``None``: every detector the registered
            plugins list).
        out_dir: if given, write ``detectors.json``, ``detectors.md`` and ``roc.png`` there.
        calibration: clean calibration inputs (default: the first half of ``clean_test``).
        settings: the :class:`ComparisonSettings` (``fpr``, ``batch_size``, ``fpr_splits``, ``n_boot``,
            ``layers`` / ``thresholds``, ``plugin_manager``); ``options`` are its fields given as keywords
            instead, or replace some of ``settings``'.
        log: a function receiving progress lines (default: silent).
        attack_detector: called as ``attack_detector(det, label)`` with each calibrated detector; what it
            returns (JSON-able, e.g. the evasion rates of attacks that know the detector) is kept in the
            detector's ``"attacks"`` entry (``None``: not attacked, no entry). When it is a
            :class:`~libnet_plugin.experiments.threat_models.ThreatModels`, the result also has
            ``"adaptive"`` (:meth:`ThreatModels.summary`: budget, images attacked, evasion table); with
            ``out_dir``, ``detectors.md`` then ends with the evasion table and ``evasion.png`` draws it
            (``files["evasion_png"]``).

    Returns:
        A JSON-able dict, laid out in the module docstring ("What evaluate_detectors returns").

    Example:
        >>> res = evaluate_detectors(net, (x_tr, y_tr), x_te, {"PGD eps=0.3": x_adv}, {"noise": noise})  # doctest: +SKIP
        >>> print(res["table_markdown"])  # doctest: +SKIP
    """
    if detectors is not None:
        options["detectors"] = detectors
    s = ComparisonSettings(**options) if settings is None else replace(settings, **options)
    say = log or (lambda _msg: None)
    net = _network(net_or_model, s)
    if not net.is_fitted:
        say("fitting the library network")
        net.fit(train)
    pm = s.plugin_manager if s.plugin_manager is not None else net.plugin_manager
    specs = _resolve_detectors(s.detectors, pm)
    x_cal, x_clean = _split_clean(clean_test, calibration, s.batch_size)
    sets, kinds = _collect_sets(attacked_sets, ood_sets)
    run = _Run(net, pm, train, x_cal, x_clean, sets, s, _forward_ms(net, x_clean, s.batch_size))
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}  # default-list peers that cannot read this model: {label: why}
    boots: dict[str, dict[str, np.ndarray]] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in sets}
    for label, (method, det_settings) in specs.items():
        say(f"detector {label!r} ({method})")
        try:
            det, entry, boots[label], det_curves = _evaluate_detector(run, method, det_settings)
        except PeerNotApplicableError as e:
            if s.detectors is not None:  # asked for by name: say so
                raise
            say(f"detector {label!r} left out: {e}")  # a post-hoc peer this model cannot serve (e.g. ONNX)
            skipped[label] = str(e)
            continue
        for name, curve in det_curves.items():
            curves[name][label] = curve
        if attack_detector is not None:
            attacks = attack_detector(det, label)
            if attacks is not None:
                entry["attacks"] = attacks
        results[label] = entry
    _margins_to_baselines(results, boots, list(sets))
    out = _comparison_result(run, results, kinds)
    if skipped:
        out["skipped"] = skipped
    if isinstance(attack_detector, ThreatModels):
        out["adaptive"] = attack_detector.summary(results)
    if out_dir is not None:
        _write_comparison(out, curves, out_dir)
    return out


def _network(net_or_model: Any, s: ComparisonSettings) -> LibraryNetwork:
    """The library network of :func:`evaluate_detectors`: the one given, or one built from a model with
    ``s.layers`` and ``s.thresholds``."""
    if isinstance(net_or_model, LibraryNetwork):
        if s.layers is not None or s.thresholds is not None:
            raise ValueError("layers and thresholds are only used when evaluate_detectors builds the library network")
        return net_or_model
    if s.layers is None or s.thresholds is None:
        raise ValueError("evaluate_detectors needs layers= and thresholds= to build a LibraryNetwork from a model")
    return LibraryNetwork(net_or_model, s.layers, thresholds=s.thresholds, plugin_manager=s.plugin_manager)


def _split_clean(clean_test: Any, calibration: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """``(calibration inputs, clean evaluation inputs)``: ``calibration`` and ``clean_test``, or the two halves
    of ``clean_test`` without ``calibration``."""
    x_clean, _ = _as_tensor(clean_test, batch_size)
    if calibration is not None:
        return _as_tensor(calibration, batch_size)[0], x_clean
    half = x_clean.shape[0] // 2
    if half < 2:
        raise ValueError(f"clean_test has {x_clean.shape[0]} inputs; at least 4 are needed to split it")
    return x_clean[:half], x_clean[half:]


def _collect_sets(attacked_sets: Mapping[str, Tensor],
                  ood_sets: Mapping[str, Tensor] | None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``({name: inputs}, {name: "attack" | "ood"})`` of the attacked and out-of-domain sets, checked."""
    sets: dict[str, Tensor] = {}
    kinds: dict[str, str] = {}
    for kind, group in (("attack", attacked_sets), ("ood", ood_sets or {})):
        for name, x in group.items():
            if name in sets:
                raise ValueError(f"set name {name!r} is used twice")
            if not isinstance(x, Tensor):
                raise TypeError(f"set {name!r} must be a Tensor of inputs, got {type(x).__name__}")
            sets[str(name)] = x
            kinds[str(name)] = kind
    if not sets:
        raise ValueError("no attacked or out-of-domain set to evaluate")
    return sets, kinds


def _forward_ms(net: LibraryNetwork, x: Tensor, batch_size: int) -> float:
    """Milliseconds per 1,000 inputs of the model alone (NaN for a model that is not a torch module)."""
    model = net.model
    if not isinstance(model, torch.nn.Module):
        return float("nan")

    def forward(xb: Tensor) -> Tensor:
        with torch.no_grad():
            return model(xb.to(net.device))

    return _time_scores(forward, x, batch_size)[0]


def _evaluate_detector(run: _Run, method: str, det_settings: dict[str, Any]) -> tuple[
        ConsistencyDetector, dict[str, Any], dict[str, np.ndarray], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """One detector of :func:`evaluate_detectors`, fitted, calibrated and scored on every set: ``(detector,
    its entry, its bootstrap AUROCs per set, its ROC curve per set)``."""
    s, forward_ms = run.settings, run.forward_ms
    t0 = time.perf_counter()
    det = ConsistencyDetector(run.net, method=method, settings=det_settings, plugin_manager=run.pm)
    if det.requires_training_data:
        det.fit(run.train)
    cal_data = det.calibration_features(run.x_cal)  # kept for the FPR check below: no second pass over x_cal
    det.calibrate(features=cal_data, fpr=s.fpr)
    fit_s = time.perf_counter() - t0
    ms, parts = _time_scores(det.score, run.x_clean, s.batch_size)
    clean_scores = torch.cat(parts).cpu()
    # the FPR check needs the clean inputs as calibration sees them: plain scores are the ones just timed
    clean_data = det.calibration_features(run.x_clean) if det.scorer.fuses else clean_scores
    entry: dict[str, Any] = {
        "method": method, "settings": det_settings,
        "library_based": det.scorer.uses_library,
        "auroc": {}, "auroc_ci95": {}, "tpr_at_fpr": {}, "tpr_calibrated": {}, "fpr_at_95tpr": {}, "aupr": {},
        "heldout_fpr": float((clean_scores > det.threshold_).float().mean()),
        "threshold": det.threshold_, "fit_s": fit_s, "ms_per_1000": ms,
        "time_ratio": ms / forward_ms if forward_ms and math.isfinite(forward_ms) else float("nan"),
    }
    entry["fpr_check"] = _split_fpr(torch.cat([cal_data.cpu(), clean_data.cpu()]), _combination(det), s.fpr,
                                    n_splits=s.fpr_splits, seed=0)
    mem = det.memory_bytes()
    mem["kept"] = mem["detector"] + (mem["library"] if entry["library_based"] else 0)
    entry["memory_bytes"] = mem
    boots: dict[str, np.ndarray] = {}
    curves: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for k, (name, x) in enumerate(run.sets.items()):
        scores = det.score(x).cpu()
        entry["auroc"][name] = auroc(clean_scores, scores)
        # the same resamples for every detector (seed k): paired intervals of AUROC differences
        boots[name] = auroc_bootstrap(clean_scores, scores, n_boot=s.n_boot, seed=k)
        entry["auroc_ci95"][name] = _interval(boots[name])
        entry["tpr_at_fpr"][name] = tpr_at_fpr(clean_scores, scores, s.fpr)
        entry["tpr_calibrated"][name] = float((scores > det.threshold_).float().mean())
        entry["fpr_at_95tpr"][name] = fpr_at_tpr(clean_scores, scores, 0.95)
        entry["aupr"][name] = aupr(clean_scores, scores)
        curves[name] = _roc(clean_scores, scores)
    return det, entry, boots, curves


def _comparison_result(run: _Run, results: dict[str, dict[str, Any]], kinds: Mapping[str, str]) -> dict[str, Any]:
    """What :func:`evaluate_detectors` returns (before ``skipped``, ``adaptive`` and ``files``): settings, sets,
    the entries, the flat rows and the tables."""
    sets, net, s = run.sets, run.net, run.settings
    attack_names = [n for n in sets if kinds[n] == "attack"]
    lib = [l for l, e in results.items() if e["library_based"]]
    best = (max(lib, key=lambda l: float(np.mean([results[l]["auroc"][n] for n in attack_names])))
            if lib and attack_names else None)
    rows = [_row(label, e, sets) for label, e in results.items()]
    headers = list(rows[0])
    metric_tables = {
        metric: markdown_table(["detector", *sets], [[label, *(f"{e[metric][n]:.3f}" for n in sets)]
                                                     for label, e in results.items()])
        for metric in ("auroc", "tpr_at_fpr", "fpr_at_95tpr", "aupr")}
    margins = {label: e["auroc_vs_best_baseline"] for label, e in results.items() if "auroc_vs_best_baseline" in e}
    if margins:
        metric_tables["auroc_vs_best_baseline"] = markdown_table(
            ["detector", *sets], [[label, *(_margin_cell(m[n]) for n in sets)] for label, m in margins.items()])
    return {
        "settings": {"fpr": s.fpr, "n_train": net.n_train_, "n_calibration": int(run.x_cal.shape[0]),
                     "n_clean": int(run.x_clean.shape[0]), "layers": list(net.layers), "thresholds": net.thresholds_,
                     "library_sizes": net.library_sizes_, "batch_size": s.batch_size},
        "sets": {name: {"kind": kinds[name], "n": int(x.shape[0])} for name, x in sets.items()},
        "forward_ms_per_1000": run.forward_ms, "detectors": results, "rows": rows,
        "table_markdown": markdown_table(headers, [[r[h] for h in headers] for r in rows]),
        "metric_tables": metric_tables, "best_library_based": best, "files": {},
    }


def _row(label: str, e: Mapping[str, Any], sets: Mapping[str, Tensor]) -> dict[str, Any]:
    """A detector's flat row of the comparison table."""
    row: dict[str, Any] = {"detector": label}
    for name in sets:
        row[f"{name}: AUROC / TPR"] = f"{e['auroc'][name]:.3f} / {e['tpr_at_fpr'][name]:.2f}"
    row["held-out FPR"] = e["heldout_fpr"]
    row[f"FPR over {e['fpr_check']['n_splits']} splits"] = f"{e['fpr_check']['mean']:.3f} ± {e['fpr_check']['sd']:.3f}"
    row["ms / 1000"] = round(e["ms_per_1000"], 1)
    row["x forward"] = round(e["time_ratio"], 2) if math.isfinite(e["time_ratio"]) else None
    row["memory MB"] = round(e["memory_bytes"]["kept"] / 2**20, 2)
    return row


def _write_comparison(out: dict[str, Any], curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                      out_dir: str | os.PathLike) -> None:
    """``detectors.json``, ``detectors.md``, ``roc.png`` (and ``evasion.png`` after adaptive attacks) into
    ``out_dir``; their paths go to ``out["files"]``."""
    d = ensure_writable_dir(out_dir)
    out["files"] = {"json": str(d / "detectors.json"), "markdown": str(d / "detectors.md"),
                    "roc_png": str(plot_roc_curves(curves, d / "roc.png"))}
    markdown = out["table_markdown"]
    if "adaptive" in out and any("attacks" in e for e in out["detectors"].values()):
        from .plots import plot_evasion

        out["files"]["evasion_png"] = str(plot_evasion(out["detectors"], d / "evasion.png", fpr=out["settings"]["fpr"]))
        markdown += "\n\n" + str(comparison_evasion_markdown(out))
    write_text_atomic(d / "detectors.md", markdown + "\n")
    write_json_atomic(d / "detectors.json", out)

def _interval(boot: np.ndarray) -> list[float]:
    """The 95% percentile interval of bootstrap values (``[nan, nan]`` when they are not finite)."""
    if not np.isfinite(boot).all():
        return [float("nan"), float("nan")]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return [float(lo), float(hi)]


def _margins_to_baselines(results: dict[str, dict[str, Any]], boots: Mapping[str, Mapping[str, np.ndarray]],
                          sets: Sequence[str]) -> None:
    """Give every library-based detector ``"auroc_vs_best_baseline"``: per set, the baseline (a detector that is
    not library-based) with the highest AUROC, the difference of the AUROCs and its paired 95% bootstrap
    interval (both bootstrapped on the same resamples). Nothing when the run has no baseline."""
    baselines = [l for l, e in results.items() if not e["library_based"]]
    if not baselines:
        return
    for label, e in results.items():
        if not e["library_based"]:
            continue
        e["auroc_vs_best_baseline"] = {}
        for name in sets:
            best = max(baselines, key=lambda b: results[b]["auroc"][name])
            e["auroc_vs_best_baseline"][name] = {
                "baseline": best, "difference": e["auroc"][name] - results[best]["auroc"][name],
                "ci95": _interval(boots[label][name] - boots[best][name])}


def _margin_cell(m: Mapping[str, Any]) -> str:
    """``difference [interval] vs <the best baseline>`` (the baselines include the post-hoc peers)."""
    lo, hi = m["ci95"]
    return f"{m['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] vs {m['baseline']}"


def _roc(clean: Tensor, attacked: Tensor) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    c, a = clean.double().numpy(), attacked.double().numpy()
    y = np.r_[np.zeros(len(c)), np.ones(len(a))]
    s = np.nan_to_num(np.r_[c, a], posinf=np.finfo(np.float64).max)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr

def plot_roc_curves(curves: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], path: str | os.PathLike) -> Path:
    """One ROC panel per set, one line per detector; written as a PNG atomically.

    Args:
        curves: ``{set: {detector: (fpr array, tpr array)}}``.
        path: the PNG file.

    Returns:
        The path written.
    """

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        raise ValueError("no ROC curves to plot")
    n = len(curves)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.8 * rows))
    FigureCanvasAgg(fig)
    for i, (name, per_detector) in enumerate(curves.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, (f, t) in per_detector.items():
            ax.plot(f, t, label=label, linewidth=1.2)
        ax.plot([0, 1], [0, 1], color="0.7", linewidth=0.8, linestyle=":")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("false-positive rate (clean)")
        ax.set_ylabel("true-positive rate")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        if i == 0:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return atomic_write_bytes(path, buf.getvalue())
