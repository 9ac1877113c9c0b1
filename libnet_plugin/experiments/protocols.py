"""Attack protocols, attack sets and detection metrics (docs/method.md section 9).

:func:`generate_attack_sets` runs both attack protocols through :mod:`libnet_plugin.experiments.attacks`;
:func:`evaluate_protocol` scores them with CPL per threshold set; :func:`save_attack_sets` /
:func:`load_attack_sets` keep attacked inputs in one safetensors file (so a model without autograd, e.g.
ONNX, can be evaluated on them); :func:`auroc`, :func:`tpr_at_fpr` and :func:`detection_metrics` turn
clean and attacked scores into the reported numbers.

Example:
    >>> import torch
    >>> round(auroc(torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.25, 0.9])), 4)
    0.8333
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._batches import progress_bar
from ..errors import SaveFormatError, ShapeMismatchError
from ..serialization import load_checked, save_atomic
from .sweep import (
    Evidence,
    EvidenceKey,
    LibrarySweep,
    compute_evidence,
    cpl_from_evidence,
)

__all__ = ['PROTOCOLS', 'detection_metrics', 'ProtocolSettings', 'AttackSet', 'to_model_space', 'generate_attack_sets', 'check_pgd_backends', 'save_attack_sets', 'load_attack_sets', 'attacked_evidence', 'evaluate_protocol', 'auroc', 'aupr', 'fpr_at_tpr', 'tpr_at_fpr']


#: The two attack protocols of docs/method.md section 9.
PROTOCOLS: tuple[str, str] = ("paper", "standard")

def detection_metrics(clean_cpl: Tensor, attacked_cpl: Tensor, fpr: float = 0.05) -> dict[str, Any]:
    """AUROC and TPR at ``fpr`` of flagging attacked inputs by low CPL (score ``1 - CPL``).

    Returns:
        ``{"auroc", "tpr_at_fpr", "fpr", "n_clean", "n_attacked", "clean_cpl_mean", "attacked_cpl_mean"}``;
        metrics are NaN when either side is empty.

    Example:
        >>> m = detection_metrics(torch.tensor([.9, .8, .95]), torch.tensor([.1, .85]))
        >>> round(m["auroc"], 3), m["n_attacked"]
        (0.833, 2)
    """
    c = 1.0 - torch.as_tensor(clean_cpl).double().cpu()
    a = 1.0 - torch.as_tensor(attacked_cpl).double().cpu()
    mean = lambda t: float(1.0 - t.mean()) if t.numel() else float("nan")  # noqa: E731
    return {"auroc": auroc(c, a), "tpr_at_fpr": tpr_at_fpr(c, a, fpr), "fpr": fpr, "n_clean": int(c.numel()),
            "n_attacked": int(a.numel()), "clean_cpl_mean": mean(c), "attacked_cpl_mean": mean(a)}


@dataclass
class ProtocolSettings:
    """One attack protocol of docs/method.md section 9.

    Attributes:
        name: ``"paper"`` (advertorch PGD on normalised tensors clipped to [0, 1], every attacked input
            used, epsilon in normalised units) or ``"standard"`` (PGD in [0, 1] pixel space with the
            normalisation inside the model, only correctly classified inputs whose attack succeeds).
        epsilons: the L-inf budgets.
        n_images: the first ``n_images`` test images are attacked.
        nb_iter: PGD steps (40 in both protocols).
        seed: seed of the random start (the seed paper used 1).
        backend: ``"advertorch"`` (``LinfPGDAttack`` through the compatibility module), ``"torch"`` (the
            project's own PGD, the same result from the same seed) or ``"auto"``.
    """

    name: str
    epsilons: list[float]
    n_images: int
    nb_iter: int = 40
    seed: int = 1
    backend: str = "advertorch"

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {PROTOCOLS}, got {self.name!r}")
        if not self.epsilons or any(not (e > 0 and math.isfinite(e)) for e in self.epsilons):
            raise ValueError(f"epsilons must be positive numbers, got {self.epsilons!r}")
        if int(self.n_images) < 1 or int(self.nb_iter) < 1:
            raise ValueError(f"n_images and nb_iter must be positive, got {self.n_images}, {self.nb_iter}")
        if self.backend not in ("advertorch", "torch", "auto"):
            raise ValueError(f"backend must be 'advertorch', 'torch' or 'auto', got {self.backend!r}")
        self.epsilons = [round(float(e), 6) for e in self.epsilons]

    def step(self, eps: float) -> float:
        """The PGD step size at ``eps``: 0.01 (paper protocol) or ``2.5 * eps / nb_iter`` (standard)."""
        return 0.01 if self.name == "paper" else 2.5 * eps / self.nb_iter

    @property
    def space(self) -> str:
        """Where the attacked tensors live: ``"normalized"`` (paper) or ``"pixels"`` (standard)."""
        return "normalized" if self.name == "paper" else "pixels"

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict (for reports)."""
        return {"protocol": self.name, "epsilons": self.epsilons, "n_images": self.n_images,
                "nb_iter": self.nb_iter, "step": "0.01" if self.name == "paper" else "2.5 * eps / nb_iter",
                "seed": self.seed, "backend": self.backend, "space": self.space,
                "random_start": True, "loss": "cross-entropy (sum over the batch)"}


@dataclass
class AttackSet:
    """Attacked versions of some test inputs at one epsilon of one protocol.

    Attributes:
        protocol: ``"paper"`` or ``"standard"``.
        epsilon: the L-inf budget (normalised units for the paper protocol, pixels for the standard one).
        x_adv: attacked inputs, in ``space``.
        space: ``"normalized"`` or ``"pixels"``.
        indices: positions of the attacked inputs in the test set, ``LongTensor[N]``.
    """

    protocol: str
    epsilon: float
    x_adv: Tensor
    space: str
    indices: Tensor

def to_model_space(x: Tensor, space: str, model_space: str, mean: Any, std: Any) -> Tensor:
    """Convert inputs between pixel space ([0, 1]) and normalised space ``(x - mean) / std``.

    Args:
        x: inputs ``[N, C, ...]``.
        space / model_space: ``"pixels"`` or ``"normalized"``: where ``x`` lives, where it must go.
        mean / std: per-channel statistics (numbers or sequences).
    """
    for s in (space, model_space):
        if s not in ("pixels", "normalized"):
            raise ValueError(f"space must be 'pixels' or 'normalized', got {s!r}")
    if space == model_space:
        return x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).reshape(shape)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).reshape(shape)
    return (x - m) / s if model_space == "normalized" else x * s + m

def generate_attack_sets(protocol: ProtocolSettings, model: torch.nn.Module, x_pixels: Tensor, y: Tensor, *,
                         mean: Any, std: Any, progress: bool | None = None) -> list[AttackSet]:
    """Attack the first ``protocol.n_images`` test inputs at every epsilon of one protocol.

    Uses :func:`libnet_plugin.experiments.attacks.attack_paper_protocol` or
    :func:`libnet_plugin.experiments.attacks.attack_standard_protocol` (advertorch's ``LinfPGDAttack`` through the
    project's compatibility module by default). Every attacked input is returned; the standard
    protocol's selection (correct on clean, attack succeeded) is made at evaluation time from the
    answers of the model being evaluated (:func:`evaluate_protocol`).

    Args:
        protocol: the protocol's settings.
        model: the torch net taking *normalised* inputs (the seed's convention); the standard protocol
            puts a :class:`~libnet_plugin.experiments.models.Normalize` in front of it so that it is attacked in
            pixel space.
        x_pixels: test images in [0, 1], ``[N, C, H, W]`` (moved to the model's device).
        y: their labels.
        mean / std: the normalisation of ``model``'s inputs.
        progress: tqdm bar over epsilons (``None``: only on a terminal).

    Returns:
        One :class:`AttackSet` per epsilon, in order, with the attacked tensors on the CPU.
    """
    from . import attacks
    from .models import Normalize

    n = min(int(protocol.n_images), int(x_pixels.shape[0]))
    device = next((p.device for p in model.parameters()), x_pixels.device)
    x, yy = x_pixels[:n].to(device), y[:n].long().to(device)
    indices = torch.arange(n)
    # a new Sequential is in training mode: give it the model's mode, or restoring it after the attack
    # (attacks run in eval mode and restore the mode they found) would leave the model in training mode
    pixel_model = torch.nn.Sequential(Normalize(mean, std).to(device), model).train(model.training)
    out = []
    for eps in progress_bar(protocol.epsilons, f"PGD ({protocol.name} protocol)", progress, unit="eps"):
        if protocol.name == "paper":
            x_adv = attacks.attack_paper_protocol(model, x, yy, eps=eps, seed=protocol.seed, mean=mean, std=std,
                                                  nb_iter=protocol.nb_iter, eps_iter=protocol.step(eps),
                                                  backend=protocol.backend)
        else:
            x_adv, _ = attacks.attack_standard_protocol(pixel_model, x, yy, eps=eps, nb_iter=protocol.nb_iter,
                                                        seed=protocol.seed, backend=protocol.backend)
        out.append(AttackSet(protocol.name, eps, x_adv.detach().cpu(), protocol.space, indices))
    return out

def check_pgd_backends(model: torch.nn.Module, x_pixels: Tensor, y: Tensor, *, eps: float, mean: Any, std: Any,
                       nb_iter: int = 40, seed: int = 1) -> dict[str, Any]:
    """Run the paper protocol with advertorch and with the project's torch PGD on the same inputs and seed.

    Both start from the same random point (same seed, same batching), so the adversarial tensors should
    agree to float precision; the report records the largest difference.

    Returns:
        ``{"n", "epsilon", "max_abs_diff", "answers_equal", "advertorch_available"}``; without
        advertorch only ``advertorch_available: False`` and a note.
    """
    from . import attacks

    try:
        from ._advertorch_compat import ensure_advertorch

        ensure_advertorch()
    except ImportError as exc:
        return {"advertorch_available": False, "note": f"advertorch cannot be imported: {exc}"}
    device = next((p.device for p in model.parameters()), x_pixels.device)
    x_pixels, y = x_pixels.to(device), y.to(device)
    kw = dict(eps=eps, seed=seed, mean=mean, std=std, nb_iter=nb_iter)
    a = attacks.attack_paper_protocol(model, x_pixels, y, backend="advertorch", **kw)
    b = attacks.attack_paper_protocol(model, x_pixels, y, backend="torch", **kw)
    with torch.no_grad():
        same = bool((model(a).argmax(1) == model(b).argmax(1)).all())
    return {"advertorch_available": True, "n": int(x_pixels.shape[0]), "epsilon": eps, "nb_iter": nb_iter,
            "max_abs_diff": float((a - b).abs().max()), "answers_equal": same}


_ATTACKS_KIND = "AttackSets"

def save_attack_sets(path: str | os.PathLike, sets: Sequence[AttackSet], metadata: Mapping[str, Any], *,
                     key: bytes | str | None = None) -> Path:
    """Write attack sets to one safetensors file, atomically (the ``--attacks-file`` format); signed when
    ``key`` is given (see :func:`~libnet_plugin.serialization.save_atomic`).

    Tensors are named ``<protocol>/<epsilon>/x_adv`` and ``<protocol>/<epsilon>/indices``; the JSON
    settings hold the list of sets (protocol, epsilon, space) and ``metadata`` (data settings, seeds,
    a fingerprint of the clean inputs) so that a reader can check it attacks the same data.
    """
    tensors: dict[str, Tensor] = {}
    entries = []
    for s in sets:
        name = f"{s.protocol}/{s.epsilon:g}"
        if f"{name}/x_adv" in tensors:
            raise ValueError(f"two attack sets for protocol {s.protocol!r} at epsilon {s.epsilon}")
        tensors[f"{name}/x_adv"] = s.x_adv.float().clone()  # own storage: safetensors refuses shared memory
        tensors[f"{name}/indices"] = s.indices.long().clone()
        entries.append({"protocol": s.protocol, "epsilon": s.epsilon, "space": s.space, "key": name})
    return save_atomic(path, tensors, kind=_ATTACKS_KIND, config={"sets": entries, "metadata": dict(metadata)},
                       key=key)

def load_attack_sets(path: str | os.PathLike, *, key: bytes | str | None = None) -> tuple[list[AttackSet], dict[str, Any]]:
    """Read a file written by :func:`save_attack_sets` (with ``key``: refused unless signed with it).

    Returns:
        ``(sets, metadata)``.

    Raises:
        FileNotFoundError: no such file.
        SaveFormatError: not an attack-sets file, or an entry is missing or malformed.
    """
    tensors, cfg = load_checked(path, kind=_ATTACKS_KIND, key=key)
    sets = []
    try:
        for e in cfg["sets"]:
            sets.append(AttackSet(e["protocol"], float(e["epsilon"]), tensors[f"{e['key']}/x_adv"], e["space"],
                                  tensors[f"{e['key']}/indices"].long()))
        metadata = dict(cfg["metadata"])
    except KeyError as exc:
        raise SaveFormatError(f"{str(path)!r}: attack-sets file is missing the entry {exc}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise SaveFormatError(f"{str(path)!r}: attack-sets file has a malformed entry ({exc})") from exc
    return sets, metadata

def attacked_evidence(sweep: LibrarySweep, probe: Any, sets: Sequence[AttackSet], requests: Iterable[EvidenceKey],
                      labels: Tensor, *, model_space: str, mean: Any, std: Any, batch_size: int = 256,
                      progress: bool | None = None) -> dict[float, Evidence]:
    """Evidence of every attack set of one protocol, each moved to the probed model's input space.

    Args:
        sweep / probe: as for :func:`compute_evidence`.
        sets: attack sets of one protocol (one per epsilon).
        requests: ``(layer, theta, top_k)`` triples, e.g. :func:`cpl_requests`.
        labels: labels of the whole test set; each set takes those at its ``indices``.
        model_space / mean / std: the probed model's input space and the normalisation (see
            :func:`to_model_space`).
        batch_size / progress: as for :func:`compute_evidence`.

    Returns:
        ``{epsilon: Evidence}``, ready for :func:`evaluate_protocol`.
    """
    requests = list(requests)
    return {s.epsilon: compute_evidence(sweep, probe, to_model_space(s.x_adv, s.space, model_space, mean, std),
                                        requests, labels=labels[s.indices.to(labels.device)],
                                        batch_size=batch_size, progress=progress,
                                        desc=f"{s.protocol} eps={s.epsilon:g}") for s in sets}

def evaluate_protocol(protocol: str, clean: Evidence, attacked: Mapping[float, Evidence],
                      threshold_sets: Mapping[str, Mapping[str, float]], *, top_k: int = 20,
                      fpr: float = 0.05) -> dict[str, Any]:
    """CPL detection per threshold set and epsilon under one protocol (the paper's Fig. 5B/5C).

    Args:
        protocol: ``"paper"``: all attacked inputs against all clean ones; ``"standard"``: only inputs
            the model classifies correctly whose attack succeeds (the model's answer on the attacked
            input differs from the label), paired with their clean versions.
        clean: evidence of the clean inputs (with labels), row ``i`` the clean version of row ``i`` of
            every attacked set.
        attacked: ``{epsilon: evidence of the attacked inputs}``.
        threshold_sets: ``{set name: {layer: theta}}``.
        top_k: nodes per layer in CPL (20 in the paper).
        fpr: false-positive rate for the TPR column.

    Returns:
        ``{"protocol", "top_k", "fpr", "epsilons": [{"epsilon", "n_inputs", "n_selected",
        "answers_changed", "model_accuracy_attacked"}], "results": {set: [{"epsilon", **detection}]},
        "cpl": {set: {"clean": Tensor, eps: Tensor}}, "cpl_clean_selected": {set: {eps: Tensor}}}``: the raw
        CPL values feed the histograms (``"cpl"``: every clean input, and the scored attacked inputs per
        epsilon; ``"cpl_clean_selected"``: the clean inputs scored against them at each epsilon).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if clean.labels is None:
        raise ValueError("evaluate_protocol needs the clean evidence with labels")
    eps_rows, results = [], {name: [] for name in threshold_sets}
    raw: dict[str, dict[Any, Tensor]] = {name: {} for name in threshold_sets}
    raw_clean: dict[str, dict[float, Tensor]] = {name: {} for name in threshold_sets}
    for name, thr in threshold_sets.items():
        raw[name]["clean"] = cpl_from_evidence(clean, thr, top_k)
    for eps, adv in sorted(attacked.items()):
        if len(adv) != len(clean):
            raise ShapeMismatchError(f"epsilon {eps}: {len(adv)} attacked inputs but {len(clean)} clean ones")
        changed = adv.answers != clean.answers
        if protocol == "standard":
            keep = (clean.answers == clean.labels) & (adv.answers != clean.labels)
        else:
            keep = torch.ones(len(clean), dtype=torch.bool)
        eps_rows.append({"epsilon": eps, "n_inputs": len(clean), "n_selected": int(keep.sum()),
                         "answers_changed": float(changed.float().mean()),
                         "model_accuracy_attacked": float((adv.answers == clean.labels).float().mean())})
        for name, thr in threshold_sets.items():
            c_all = raw[name]["clean"]
            a_all = cpl_from_evidence(adv, thr, top_k)
            raw[name][eps] = a_all[keep]
            raw_clean[name][eps] = c_all[keep]
            results[name].append({"epsilon": eps, **detection_metrics(c_all[keep], a_all[keep], fpr)})
    return {"protocol": protocol, "top_k": top_k, "fpr": fpr, "epsilons": eps_rows, "results": results, "cpl": raw,
            "cpl_clean_selected": raw_clean}

def _ranked(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both score arrays as float64, ``+inf`` (flagged: fail closed) replaced by one more than the largest
    finite score, so that rank metrics see the order and scikit-learn sees finite numbers."""
    c = np.asarray(torch.as_tensor(clean_scores).double().cpu())
    a = np.asarray(torch.as_tensor(attacked_scores).double().cpu())
    both = np.r_[c, a]
    if np.isnan(both).any():
        raise ValueError("detector scores hold NaN; ConsistencyDetector reports a non-finite score as inf")
    finite = both[np.isfinite(both)]
    top = (finite.max() if finite.size else 0.0) + 1.0
    low = (finite.min() if finite.size else 0.0) - 1.0
    fix = lambda v: np.where(v == np.inf, top, np.where(v == -np.inf, low, v))  # noqa: E731
    return fix(c), fix(a)


def auroc(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray) -> float:
    """AUROC (scikit-learn) of separating attacked (positive) from clean; scores: higher = suspicious."""
    from sklearn.metrics import roc_auc_score

    c, a = _ranked(clean_scores, attacked_scores)
    if len(c) == 0 or len(a) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(c)), np.ones(len(a))]
    return float(roc_auc_score(y, np.r_[c, a]))


def auroc_bootstrap(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray, *, n_boot: int = 1000,
                    seed: int = 0) -> np.ndarray:
    """The AUROC of :func:`auroc` on ``n_boot`` bootstrap resamples ``[n_boot]``: clean and attacked
    inputs are each drawn with replacement, in their own numbers.

    The resamples depend only on ``seed`` and the two sizes, so two detectors scored on the same inputs
    and bootstrapped with the same seed are resampled alike: the differences of their arrays give a
    paired interval for the difference of their AUROCs. A tie counts one half, as in :func:`auroc`.

    Example:
        >>> boot = auroc_bootstrap(np.array([0., 1., 2., 3.]), np.array([2., 4., 5.]), n_boot=200)
        >>> boot.shape, bool(((boot >= 0) & (boot <= 1)).all())
        ((200,), True)
        >>> float(auroc_bootstrap(np.arange(5.), np.arange(5.) + 10, n_boot=50).min())  # always separated
        1.0
    """
    c, a = _ranked(clean_scores, attacked_scores)
    if len(c) == 0 or len(a) == 0:
        return np.full(n_boot, np.nan)
    rng = np.random.default_rng(seed)
    order = np.argsort(c, kind="stable")
    c_sorted = c[order]
    # resampled multiplicities of every clean input, in sorted order, then their running sums
    wc = np.zeros((n_boot, len(c)))
    np.add.at(wc, (np.arange(n_boot)[:, None], rng.integers(0, len(c), (n_boot, len(c)))), 1.0)
    cum = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(wc[:, order], axis=1)], axis=1)
    wa = np.zeros((n_boot, len(a)))
    np.add.at(wa, (np.arange(n_boot)[:, None], rng.integers(0, len(a), (n_boot, len(a)))), 1.0)
    left = np.searchsorted(c_sorted, a, side="left")
    right = np.searchsorted(c_sorted, a, side="right")
    below = cum[:, left] + 0.5 * (cum[:, right] - cum[:, left])  # clean mass below each attacked score [B, n_a]
    return (wa * below).sum(axis=1) / (len(c) * len(a))


def aupr(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray) -> float:
    """Area under the precision-recall curve with the attacked / out-of-domain inputs as positives
    (OpenOOD's AUPR-Out; scikit-learn's average precision). Its chance level is the positives' share.

    Example:
        >>> aupr(np.array([0., 1.]), np.array([2., 3.]))
        1.0
    """
    from sklearn.metrics import average_precision_score

    c, a = _ranked(clean_scores, attacked_scores)
    if len(c) == 0 or len(a) == 0:
        return float("nan")
    y = np.r_[np.zeros(len(c)), np.ones(len(a))]
    return float(average_precision_score(y, np.r_[c, a]))


def fpr_at_tpr(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray, tpr: float = 0.95) -> float:
    """Share of clean inputs flagged at the highest threshold that flags ``tpr`` of the attacked ones
    (FPR at 95% TPR, as OpenOOD reports it); lower is better.

    Example:
        >>> fpr_at_tpr(np.arange(10.), np.array([5., 20., 30., 40.]), tpr=0.75)
        0.0
        >>> fpr_at_tpr(np.arange(10.), np.array([5., 20., 30., 40.]), tpr=1.0)
        0.5
    """
    c, a = _ranked(clean_scores, attacked_scores)
    if len(c) == 0 or len(a) == 0:
        return float("nan")
    k = max(1, math.ceil(tpr * len(a) - 1e-9))  # flag at least k of the attacked inputs
    thr = np.sort(a)[::-1][k - 1]
    return float(np.mean(c >= thr))

def tpr_at_fpr(clean_scores: Tensor | np.ndarray, attacked_scores: Tensor | np.ndarray, fpr: float = 0.05) -> float:
    """True-positive rate on attacked inputs at the threshold that flags ``fpr`` of the clean ones."""
    c, a = _ranked(clean_scores, attacked_scores)
    if len(c) == 0 or len(a) == 0:
        return float("nan")
    thr = np.quantile(c, 1.0 - fpr, method="higher")
    return float(np.mean(a > thr))
