"""``libnet reproduce cifar10``: the paper's CIFAR-10 ResNet-44 experiments (Table 1, Figs. 4 and 5C).

What it does (docs/method.md sections 7-10):

1. Checks everything a long run needs before starting it: the device (``--device cuda`` without a GPU
   is an error, ``--device auto`` falls back to the CPU with a warning), the six CIFAR-10 python batches
   in ``--data-dir`` (the message names the expected files), and the ``--weights`` file (it must fit
   :class:`~libnet_plugin.experiments.models.ResNet44`; the message shows the first mismatched key and its shapes).
2. Reads CIFAR-10 from the python batches (no torchvision), loads the weights (the public
   ``pytorch_resnet_cifar10`` ``state_dict`` format, ``module.`` prefixes accepted) or, with
   ``--train-epochs N`` and no weights, trains the ResNet-44 with the standard recipe
   (:mod:`libnet_plugin.experiments.training`) and caches the weights in ``--cache-dir`` (default
   ``.cache`` in the current folder, as for ``libnet reproduce mnist``; a second run with the same data
   and recipe reuses them). The cache must lie outside ``--out``, which a run replaces as a whole; a
   folder where an older version cached weights (``OUT/cache``) is refused, and the message names them.
3. Fits, in two streamed passes over the training images, one library and one Hebbian readout per
   threshold level of Table 1 for the five probed blocks ``conv1``, ``layer1``, ``layer2``, ``layer3``,
   ``linear`` (:func:`~libnet_plugin.experiments.sweep.fit_library_sweep`); no step ever holds the
   HAPs of the whole training set.
4. Reports library sizes (Fig. 4A) and top-1 / top-3 agreement with the model at ``top_k`` 8 (Figs. 4B,
   4C), CPL AUROC against epsilon for the seven threshold sets of Table 1 at ``top_k`` 20 under both
   attack protocols (Fig. 5C), the detector comparison, and the seed's published numbers beside ours,
   in ``report.json`` and ``report.md`` (written atomically).
5. Optionally (``--adaptive-detectors LABEL ...``, off by default: ResNet44 attacks are heavy on a CPU)
   attacks the listed detectors of the comparison with attackers who know them, as ``libnet
   evaluate-detectors`` does for MNIST (:mod:`~libnet_plugin.experiments.threat_models`: white-box
   adaptive PGD on the detector's score or a feature-matching surrogate, a score-only search), on the
   correctly classified images of the standard protocol, in pixel space (the ResNet44 is reached through
   the pixel-to-normalised map), and reports their evasion rates (misclassified and not flagged at the
   calibrated threshold) in ``report.json``, ``report.md`` and ``evasion.png``.

Output folder: the run is written into a fresh hidden folder beside ``--out`` and put in its place only
when it is complete (:func:`~libnet_plugin.experiments.report.staged_output`), so a rerun replaces an
earlier run as a whole (no stale figures or attacks) and a failed or interrupted rerun leaves the earlier
complete run exactly as it was. ``--out`` must be new, empty or an earlier run's folder holding only the
files that run wrote (listed with their SHA-256 in its manifest ``.libnet-run``); anything else is refused
before any work, with exit status 2 and the foreign files named. Once the libraries are fitted, their sizes and agreement are
written to ``<out>.partial-report.json`` beside ``--out`` (e.g. ``runs/cifar10.partial-report.json``):
a run that then fails records ``"status": "failed"`` and the error there (a killed run leaves it at
``"libraries done; attacks running"``); a complete run removes it, and every run removes the one of an
earlier run when it starts. A failed run leaves no empty folder: the staging folder is removed, and so
are the folders it created for ``--out`` that stayed empty.

The settings of the paper are data in this module (:data:`LAYERS`, :data:`THRESHOLD_LEVELS`,
:data:`CPL_SETS`, :data:`PAPER_EPSILONS`, :data:`STANDARD_EPSILONS`, :data:`SEED_RESULTS`), and the
pipeline is callable from Python as :func:`reproduce_cifar10`.

Example:
    Command line (real data, on a GPU)::

        libnet reproduce cifar10 --data-dir ~/data --weights resnet44-014dd654.th --device cuda

    A quick run on the CPU (fewer images, fewer epsilons, 10 PGD steps)::

        libnet reproduce cifar10 --data-dir ~/data --weights resnet44.th --quick
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import LibnetError
from ..plugins import registered_detectors
from .comparison import detector_comparison
from .data import CIFAR10_FILES, CIFAR_MEAN, CIFAR_STD, check_cifar10_dir, load_cifar10
from .models import ResNet44, StateDictMismatchError, load_state_dict_checked
from .protocols import (
    PROTOCOLS,
    AttackSet,
    ProtocolSettings,
    attacked_evidence,
    evaluate_protocol,
    generate_attack_sets,
    save_attack_sets,
    to_model_space,
)
from .report import (
    ExperimentError,
    StageTimer,
    check_run_folder,
    environment_info,
    markdown_table,
    relocate,
    resolve_device,
    staged_output,
    to_jsonable,
    write_json_atomic,
    write_text_atomic,
)
from .sweep import (
    Evidence,
    LibrarySweep,
    agreement_table,
    compute_evidence,
    cpl_requests,
    fit_library_sweep,
    theta_grid,
    theta_key,
)
from .threat_models import (
    AdaptiveBudget,
    adaptive_budget,
    add_budget_arguments,
    check_budget_setting,
    comparison_evasion_markdown,
)

__all__ = [
    "LAYERS",
    "PAPER_NAMES",
    "THRESHOLD_LEVELS",
    "CPL_SETS",
    "TOP_K_AGREEMENT",
    "TOP_K_CPL",
    "PAPER_EPSILONS",
    "STANDARD_EPSILONS",
    "SEED_RESULTS",
    "Cifar10Settings",
    "resolve_device",
    "check_data_dir",
    "check_weights",
    "partial_report_path",
    "reproduce_cifar10",
    "render_markdown",
    "add_arguments",
    "run",
]

# --------------------------------------------------------------------------------------------------
# The paper's settings, as data (docs/method.md sections 7, 8 and 10)
# --------------------------------------------------------------------------------------------------

#: The probed blocks of the ResNet-44 (module names of :class:`~libnet_plugin.experiments.models.ResNet44`): the
#: first convolution before its batch norm, the output of each of the three stages, and the logits.
LAYERS: tuple[str, ...] = ("conv1", "layer1", "layer2", "layer3", "linear")
#: The paper's names for them (CN1, composite layers CL1-3, FC).
PAPER_NAMES: dict[str, str] = {"conv1": "CN1", "layer1": "CL1", "layer2": "CL2", "layer3": "CL3", "linear": "FC"}

#: Table 1, top rows: the 8 threshold levels (0-7) of each block.
THRESHOLD_LEVELS: dict[str, tuple[float, ...]] = {
    "conv1": tuple(theta_key(t) for t in (0.18, 0.20, 0.22, 0.24, 0.26, 0.30, 0.32, 0.34)),
    "layer1": tuple(theta_grid(0.64, 0.78, 0.02)),
    "layer2": tuple(theta_grid(0.48, 0.62, 0.02)),
    "layer3": tuple(theta_grid(0.50, 0.64, 0.02)),
    "linear": tuple(theta_grid(0.80, 0.94, 0.02)),
}

#: Table 1, bottom rows: the seven threshold sets used for CPL (conv1, layer1, layer2, layer3, linear).
CPL_SETS: dict[str, dict[str, float]] = {
    name: dict(zip(LAYERS, (theta_key(t) for t in values)))
    for name, values in (
        ("S1", (0.24, 0.72, 0.58, 0.62, 0.94)),
        ("S2", (0.26, 0.72, 0.56, 0.58, 0.88)),
        ("S3", (0.30, 0.74, 0.58, 0.60, 0.90)),
        ("S4", (0.32, 0.76, 0.60, 0.62, 0.92)),
        ("S5", (0.34, 0.78, 0.62, 0.64, 0.94)),
        ("S6", (0.26, 0.72, 0.60, 0.62, 0.92)),
        ("S7", (0.26, 0.72, 0.62, 0.64, 0.94)),
    )
}

#: Library nodes per prediction for the agreement figures (Figs. 4B/4C) and for CPL (Eq. 5).
TOP_K_AGREEMENT: int = 8
TOP_K_CPL: int = 20

#: The seed's epsilon grid for the ResNet under its own protocol (normalised units).
PAPER_EPSILONS: tuple[float, ...] = tuple(round(0.01 * i, 6) for i in range(1, 10)) + tuple(
    round(0.1 * i, 6) for i in range(1, 11))
#: The standard CIFAR-10 budgets, in pixel units: 2, 4, 8 and 16 / 255.
STANDARD_EPSILONS: tuple[float, ...] = tuple(round(k / 255, 6) for k in (2, 4, 8, 16))

#: The seed's published numbers (docs/method.md sections 8 and 10): ResNet-44 test accuracy; library size and
#: top-1 agreement (top_k 8, full CIFAR-10 test set) at the thresholds where they were reported; the
#: range of CPL AUROC under the paper protocol (200 clean vs 200 attacked) at epsilon 0.1-0.2.
SEED_RESULTS: dict[str, Any] = {
    "model_accuracy": 0.9310,
    "library": {
        "layer1": {0.64: {"size": 2, "top1_agreement": 0.099}, 0.72: {"size": 402, "top1_agreement": 0.361},
                   0.78: {"size": 9373, "top1_agreement": 0.597}},
        "layer2": {0.48: {"size": 29, "top1_agreement": 0.200}, 0.56: {"size": 1094, "top1_agreement": 0.564},
                   0.62: {"size": 9352, "top1_agreement": 0.732}},
        "layer3": {0.50: {"size": 210, "top1_agreement": 0.966}, 0.64: {"size": 4536, "top1_agreement": 0.972}},
        "linear": {0.80: {"size": 289, "top1_agreement": 0.969}, 0.94: {"size": 3718, "top1_agreement": 0.986}},
    },
    "cpl_auroc_paper_protocol": {"epsilon_range": [0.1, 0.2], "auroc_range": [0.74, 0.81],
                                 "n_clean": 200, "n_attacked": 200},
}

#: Settings changed by ``--quick`` (each can still be overridden on the command line).
QUICK_OVERRIDES: dict[str, Any] = {
    "n_train": 1000, "n_test": 200, "n_paper": 32, "n_standard": 64,
    "paper_epsilons": (0.02, 0.1), "standard_epsilons": (round(8 / 255, 6),), "nb_iter": 10,
}


@dataclass(frozen=True)
class Cifar10Settings:
    """Everything that defines one CIFAR-10 run (defaults: the paper's full experiment).

    Frozen and checked once when made (:class:`~libnet_plugin.experiments.report.ExperimentError` naming
    the first bad setting).

    Attributes:
        n_train: training images used for the libraries (the first ones of ``data_batch_1..5``, in file
            order); ``None`` = all 50,000.
        n_test: test images for agreement and as the attack pool; ``None`` = all 10,000.
        n_paper: images attacked under the paper protocol (the first test images; 200 in the seed).
        n_standard: images attacked under the standard protocol (the first test images).
        paper_epsilons: budgets of the paper protocol, normalised units.
        standard_epsilons: budgets of the standard protocol, pixel units.
        nb_iter: PGD steps (40 in both protocols).
        protocols: which protocols to run (``"paper"``, ``"standard"``).
        attack_seed: seed of the PGD random start (1 in the seed).
        attack_backend: ``"advertorch"`` (the seed's ``LinfPGDAttack``), ``"torch"`` (the project's PGD,
            the same steps) or ``"auto"`` (advertorch when importable).
        batch_size: images per forward pass.
        fpr: false-positive rate for the TPR columns.
        thresholds: ``{layer: levels}`` (Table 1).
        cpl_sets: ``{set: {layer: theta}}`` (Table 1); every theta must be one of the levels.
        top_k_agreement / top_k_cpl: nodes per prediction for Fig. 4 and for CPL.
        detectors: also run the detector comparison.
        adaptive: the sizes of the attacks that know the detector, run in the detector comparison on the
            standard protocol's images (:func:`~libnet_plugin.experiments.comparison.detector_comparison`'s
            ``adaptive``); ``None`` (the default): none. Its ``detectors`` are labels of the detector table.
        plots: also draw the figures.
        quick: the run was shortened by ``--quick`` (reported).
    """

    n_train: int | None = None
    n_test: int | None = None
    n_paper: int = 200
    n_standard: int = 1000
    paper_epsilons: tuple[float, ...] = PAPER_EPSILONS
    standard_epsilons: tuple[float, ...] = STANDARD_EPSILONS
    nb_iter: int = 40
    protocols: tuple[str, ...] = PROTOCOLS
    attack_seed: int = 1
    attack_backend: str = "auto"
    batch_size: int = 256
    fpr: float = 0.05
    thresholds: dict[str, tuple[float, ...]] = field(default_factory=lambda: dict(THRESHOLD_LEVELS))
    cpl_sets: dict[str, dict[str, float]] = field(default_factory=lambda: {k: dict(v) for k, v in CPL_SETS.items()})
    top_k_agreement: int = TOP_K_AGREEMENT
    top_k_cpl: int = TOP_K_CPL
    detectors: bool = True
    adaptive: AdaptiveBudget | None = None
    plots: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        self._check()

    def validate(self) -> Cifar10Settings:
        """Return ``self``, checked when it was made (kept for callers that check explicitly)."""
        return self

    def _check(self) -> None:
        """Raise :class:`~libnet_plugin.experiments.report.ExperimentError` naming the first bad setting."""
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ExperimentError(f"{name} must be a positive integer or None (all), got {v!r}")
        for name in ("n_paper", "n_standard", "nb_iter", "batch_size", "top_k_agreement", "top_k_cpl"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExperimentError(f"{name} must be a positive integer, got {v!r}")
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ExperimentError(f"protocols must be a non-empty subset of {PROTOCOLS}, got {list(self.protocols)}")
        for name in ("paper_epsilons", "standard_epsilons"):
            eps = getattr(self, name)
            bad = [e for e in eps if not (isinstance(e, (int, float)) and math.isfinite(e) and e > 0)]
            if bad or not eps:
                raise ExperimentError(f"{name} must be positive numbers, got {list(eps)}")
        if any(e > 1 for e in self.standard_epsilons):
            raise ExperimentError(f"standard_epsilons are pixel budgets in (0, 1], got {list(self.standard_epsilons)}")
        if not 0 < self.fpr < 1:
            raise ExperimentError(f"fpr must lie in (0, 1), got {self.fpr!r}")
        if list(self.thresholds) != list(LAYERS):
            raise ExperimentError(f"thresholds must give levels for exactly the layers {list(LAYERS)} in order, "
                                  f"got {list(self.thresholds)}")
        for name, thr in self.cpl_sets.items():
            if set(thr) != set(LAYERS):
                raise ExperimentError(f"CPL set {name!r} must give one theta for each of {list(LAYERS)}, "
                                      f"got {sorted(thr)}")
            for layer, theta in thr.items():
                levels = {theta_key(t) for t in self.thresholds[layer]}
                if theta_key(theta) not in levels:
                    raise ExperimentError(f"CPL set {name!r}: theta {theta} of layer {layer!r} is not one of its "
                                          f"levels {sorted(levels)}")
        if self.adaptive is not None:
            check_budget_setting(self.adaptive, list(registered_detectors(None)))
            if not self.detectors or "standard" not in self.protocols:
                raise ExperimentError("adaptive (--adaptive-detectors) attacks the detectors of the detector "
                                      "comparison on the standard protocol's images: it needs detectors=True (no "
                                      "--no-detectors) and 'standard' among the protocols, got detectors="
                                      f"{self.detectors}, protocols {list(self.protocols)}")


# --------------------------------------------------------------------------------------------------
# Checks made before any long work
# --------------------------------------------------------------------------------------------------


def check_data_dir(data_dir: str | os.PathLike) -> Path:
    """The folder holding the six CIFAR-10 python batches, checked without reading them.

    Like :func:`libnet_plugin.experiments.data.check_cifar10_dir`, but when ``data_dir`` has a
    ``cifar-10-batches-py`` subfolder and lacks the batches itself, the subfolder is the one checked,
    so that a partly extracted archive is reported file by file.

    Args:
        data_dir: the ``cifar-10-batches-py`` folder or its parent.

    Returns:
        The folder holding the batches.

    Raises:
        DataNotFoundError: (a ``FileNotFoundError``) naming the missing files and the folders searched.

    Example:
        >>> check_data_dir("~/data")  # doctest: +SKIP
        PosixPath('/home/me/data/cifar-10-batches-py')
    """
    base = Path(data_dir).expanduser()
    sub = base / "cifar-10-batches-py"
    if sub.is_dir() and not all((base / name).is_file() for name in CIFAR10_FILES):
        return check_cifar10_dir(sub)
    return check_cifar10_dir(base)


def _weights_hint(raw: Any) -> str:
    """What the file looks like, to explain a mismatch: its depth and its first keys with shapes."""
    if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        return ""
    state = {k[len("module."):] if isinstance(k, str) and k.startswith("module.") else k: v for k, v in raw.items()}
    expected = ResNet44().state_dict()
    parts = []
    blocks = {k.split(".")[1] for k in state if isinstance(k, str) and k.startswith("layer1.") and k.count(".") >= 2}
    if blocks and all(b.isdigit() for b in blocks) and len(blocks) != 7:
        n = len(blocks)
        parts.append(f"the file holds {n} blocks per stage, i.e. a ResNet{6 * n + 2}; ResNet44 has 7")
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        parts.append(f"ResNet44 expects {missing[0]!r} with shape {list(expected[missing[0]].shape)}")
    unexpected = [k for k in state if k not in expected]
    if unexpected and isinstance(state[unexpected[0]], Tensor):
        parts.append(f"the file has {unexpected[0]!r} with shape {list(state[unexpected[0]].shape)}")
    return "; ".join(parts)


def check_weights(path: str | os.PathLike) -> dict[str, Tensor]:
    """Check that ``path`` holds ResNet-44 weights, and return them as a plain ``state_dict``.

    Reads the file with ``torch.load(weights_only=True)`` (never unpickling code). Accepted: a plain
    ``state_dict``, a checkpoint ``{"state_dict": ..., ...}`` (the public ``pytorch_resnet_cifar10``
    files), keys with DataParallel's ``module.`` prefix.

    Args:
        path: the weights file.

    Returns:
        The ``state_dict`` of a :class:`~libnet_plugin.experiments.models.ResNet44` holding these weights (CPU).

    Raises:
        FileNotFoundError: no such file.
        StateDictMismatchError: (a ``ValueError``) the weights do not fit ResNet-44; the message names
            the first mismatched key with both shapes (or the expected shape of the first missing key)
            and, when it can tell, the depth of the net the file was saved from.
        SaveFormatError: the file is not readable as weights.

    Example:
        >>> state = check_weights("resnet44-014dd654.th")  # doctest: +SKIP
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--weights: no such file {str(p)!r}; expected a ResNet44 state_dict saved with "
                                "torch.save (e.g. the public pytorch_resnet_cifar10 resnet44 checkpoint)")
    model = ResNet44()
    try:
        load_state_dict_checked(model, p)
    except StateDictMismatchError as exc:
        try:
            hint = _weights_hint(torch.load(p, map_location="cpu", weights_only=True))
        except Exception:  # the hint is best effort; the original message stays
            hint = ""
        raise StateDictMismatchError(f"--weights {str(p)!r} does not fit ResNet44 (option-A shortcuts, "
                                     f"pytorch_resnet_cifar10 key names): {exc}" + (f"; {hint}" if hint else "")
                                     ) from exc
    return model.state_dict()


# --------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _library_bytes(sweep: LibrarySweep) -> dict[str, int]:
    """``{layer: bytes held by the nodes of all its libraries}`` (stored nodes, not spare capacity)."""
    out = {}
    for layer, libs in sweep.libraries.items():
        out[layer] = sum(lib.nodes.numel() * lib.nodes.element_size() for lib in libs.values() if lib.size)
    return out


def _seed_columns(layer: str, theta: float) -> dict[str, Any]:
    seed = SEED_RESULTS["library"].get(layer, {}).get(theta_key(theta))
    return {"seed_size": seed["size"] if seed else None,
            "seed_top1_agreement": seed["top1_agreement"] if seed else None}


def partial_report_path(out_dir: str | os.PathLike) -> Path:
    """Where a run into ``out_dir`` that has not completed keeps its partial report.

    The file lies beside the output folder, not in it (the folder holds only complete runs):
    ``runs/cifar10`` -> ``runs/cifar10.partial-report.json``.

    Example:
        >>> partial_report_path("/tmp/runs/cifar10").name
        'cifar10.partial-report.json'
    """
    final = Path(out_dir).expanduser().absolute()
    return final.parent / f"{final.name}.partial-report.json"


def reproduce_cifar10(
    model: torch.nn.Module,
    x_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    settings: Cifar10Settings,
    *,
    device: torch.device,
    out_dir: str | os.PathLike,
    y_train: Tensor | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the CIFAR-10 experiments on a loaded model and data; write and return the report.

    The run is written into a fresh hidden folder beside ``out_dir`` and swapped in only when it is
    complete (:func:`~libnet_plugin.experiments.report.staged_output`): a failed or interrupted run leaves
    an earlier run in ``out_dir`` exactly as it was, and no staging or empty folder. Once the libraries are
    fitted, a partial report goes to :func:`partial_report_path` (beside ``out_dir``); a failure then
    rewrites it with ``"status": "failed"`` and ``"error"``, and a complete run removes it.

    Args:
        model: a :class:`~libnet_plugin.experiments.models.ResNet44` taking *normalised* input (``normalize=False``,
            the seed's convention), on ``device``, in eval mode.
        x_train: training pixels ``[N, 3, 32, 32]`` in ``[0, 1]``, already cut to ``settings.n_train``;
            their order is the visiting order of the libraries.
        x_test, y_test: test pixels and labels, already cut to ``settings.n_test``.
        settings: the run's settings (validated here).
        device: where the model runs and the libraries live.
        out_dir: folder for ``report.json``, ``report.md``, ``attacks.safetensors`` and figures: new, empty
            or an earlier run's (it is replaced as a whole).
        y_train: labels of ``x_train``, offered to the detector comparison (the libraries never use them).
        progress: tqdm bars (``None``: only on a terminal).
        log: where to print one line per stage (``None``: silent).
        extra: entries added to the report's ``"run"`` section (data and weights provenance).

    Returns:
        The report, as written to ``report.json`` (JSON types; paths name ``out_dir``, not the staging folder).

    Raises:
        ExperimentError: bad settings (``settings.adaptive`` naming a detector that is not registered among
            them), or ``out_dir`` holds files that are not an earlier run's (or holds the current folder); all
            before any work.
    """
    settings.validate()  # the adaptive budget's detectors too: before any long work
    created = _missing_folders(_out_parent(out_dir))
    final = check_run_folder(out_dir)
    partial = partial_report_path(final)
    partial.unlink(missing_ok=True)  # a partial report always belongs to the latest run
    holder: dict[str, Any] = {}
    try:
        with staged_output(final) as stage:
            report = _run_pipeline(model, x_train, x_test, y_test, settings, device=device, stage=stage,
                                   staging=_Staging(final, partial, holder), y_train=y_train,
                                   progress=progress, log=log, extra=extra)
    except BaseException as exc:
        if "report" in holder:  # the libraries were done: keep what is known, and why the run stopped
            _record_failure(holder, exc, partial, log)
        _remove_empty(created)
        raise
    partial.unlink(missing_ok=True)
    return report


def _record_failure(holder: dict[str, Any], exc: BaseException, partial: Path,
                    log: Callable[[str], None] | None) -> None:
    """Rewrite the partial report with ``"status": "failed"`` and the error (best effort: never masks ``exc``)."""
    failed = {**holder["report"], "status": "failed", "error": f"{type(exc).__name__}: {exc}",
              "timings": holder["timer"].as_dict()}
    try:
        write_json_atomic(partial, failed)
    except (OSError, TypeError, ValueError) as write_exc:
        if log:
            log(f"could not write the partial report {str(partial)!r}: {write_exc}")
        return
    if log:
        log(f"the run did not complete ({type(exc).__name__}); the output folder {str(holder['final'])!r} is as "
            f"it was before the run; the libraries' sizes and agreement are in {str(partial)!r}")


def _out_parent(out_dir: str | os.PathLike) -> Path:
    """The folder ``out_dir`` lies in, with ``..`` and links resolved as the run folder's checks resolve them."""
    try:
        return Path(out_dir).expanduser().resolve().parent
    except (OSError, RuntimeError):  # a loop of links: the checks refuse it
        return Path(out_dir).expanduser().absolute().parent


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet, deepest first (folders a run would create)."""
    missing = []
    for p in (path, *path.parents):
        if p.exists():
            break
        missing.append(p)
    return missing


def _remove_empty(folders: Sequence[Path]) -> None:
    """Remove those of ``folders`` (deepest first) that are empty; the others stay."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


@dataclass
class _Staging:
    """Where :func:`_run_pipeline` reports besides its staging folder: the run folder it is swapped into, the
    partial report beside it, and ``holder``, which receives the partial report (for :func:`_record_failure`)."""

    final: Path
    partial: Path
    holder: dict[str, Any]


@dataclass
class _Stages:
    """What the stages of one :func:`_run_pipeline` share."""

    model: torch.nn.Module
    probe: Any
    settings: Cifar10Settings
    progress: bool | None
    timer: StageTimer


def _run_pipeline(model: torch.nn.Module, x_train: Tensor, x_test: Tensor, y_test: Tensor, settings: Cifar10Settings,
                  *, device: torch.device, stage: Path, staging: _Staging, y_train: Tensor | None,
                  progress: bool | None, log: Callable[[str], None] | None,
                  extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """The stages of :func:`reproduce_cifar10`, writing into the staging folder ``stage``."""
    out = stage
    timer = StageTimer(log)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from ..plugins import make_probe

    st = _Stages(model, make_probe(model, list(LAYERS), device), settings, progress, timer)
    sweep, test_ev, table, cpl_req = _libraries(st, x_train, x_test, y_test, device)
    report: dict[str, Any] = {
        "experiment": "cifar10",
        "status": "libraries done; attacks running",
        "run": {**dict(extra or {}), "device": str(device), "n_train": sweep.n_train, "n_test": len(test_ev),
                "quick": settings.quick},
        "settings": {**asdict(settings), "layers": list(LAYERS), "paper_names": PAPER_NAMES},
        "model": {"test_accuracy": float((test_ev.answers == test_ev.labels).float().mean()),
                  "seed_test_accuracy": SEED_RESULTS["model_accuracy"]},
        "libraries": {"sizes": sweep.sizes(), "agreement": table, "top_k": settings.top_k_agreement},
        "seed": SEED_RESULTS,
    }
    staging.holder.update(report=relocate(to_jsonable(report), stage, staging.final), timer=timer,
                          final=staging.final)
    write_json_atomic(staging.partial, staging.holder["report"])  # beside the run folder: survives a failed run
    detection, attack_sets = _attack_protocols(st, sweep, test_ev, cpl_req, x_test, y_test)
    if attack_sets:
        save_attack_sets(out / "attacks.safetensors", attack_sets,
                         {"dataset": "cifar10", "n_test": len(test_ev), "attack_seed": settings.attack_seed,
                          "nb_iter": settings.nb_iter})
    detectors = None
    if settings.detectors:
        with timer.stage("detectors"):
            detectors = _run_detectors(sweep, model, settings, device, data=(x_train, y_train, x_test, y_test),
                                       attack_sets=attack_sets, out_dir=out, log=log)
    figures: list[str] = []
    if settings.plots:
        with timer.stage("figures"):
            figures = _draw_figures(out, sweep.sizes(), table, detection, settings)
    memory = {"library_bytes": sum(_library_bytes(sweep).values()), "library_bytes_by_layer": _library_bytes(sweep),
              "peak_rss_bytes": _peak_rss_bytes(),
              "cuda_peak_allocated_bytes": (int(torch.cuda.max_memory_allocated(device))
                                            if device.type == "cuda" else None)}
    report.update({
        "status": "complete",
        "detection": {name: {k: v for k, v in res.items() if not k.startswith("cpl")}  # raw CPL: figures only
                      for name, res in detection.items()},
        "detectors": detectors,
        "figures": figures,
        "memory": memory,
        "timings": timer.as_dict(),
        "environment": environment_info(),
    })
    report = relocate(to_jsonable(report), stage, staging.final)  # paths name the folder the run is swapped into
    if detectors and detectors.get("available") and (out / "detectors.json").is_file():
        write_json_atomic(out / "detectors.json", report["detectors"]["table"])  # its file paths, too
    write_text_atomic(out / "report.md", render_markdown(report))
    write_json_atomic(out / "report.json", report)  # last: its presence means the run completed
    return report


def _libraries(st: _Stages, x_train: Tensor, x_test: Tensor, y_test: Tensor,
               device: torch.device) -> tuple[LibrarySweep, Evidence, dict[str, Any], list[Any]]:
    """The library sweep and the test evidence: ``(sweep, test evidence, agreement table, CPL requests)``."""
    settings, timer, progress = st.settings, st.timer, st.progress
    xn_train = to_model_space(x_train, "pixels", "normalized", CIFAR_MEAN, CIFAR_STD)
    xn_test = to_model_space(x_test, "pixels", "normalized", CIFAR_MEAN, CIFAR_STD)
    with timer.stage("library sweep"):
        sweep = fit_library_sweep(st.probe, xn_train, settings.thresholds, batch_size=settings.batch_size,
                                  device=device, progress=progress)
    agree_req = [(l, t, settings.top_k_agreement) for l in LAYERS for t in settings.thresholds[l]]
    cpl_req = cpl_requests(settings.cpl_sets, settings.top_k_cpl)
    with timer.stage("test evidence"):
        test_ev = compute_evidence(sweep, st.probe, xn_test, agree_req + cpl_req, labels=y_test,
                                   batch_size=settings.batch_size, progress=progress, desc="test evidence")
    table = agreement_table(sweep, test_ev, top_k=settings.top_k_agreement)
    for layer, rows in table.items():
        levels = [theta_key(t) for t in settings.thresholds[layer]]
        for row in rows:
            row["level"] = levels.index(row["theta"])
            row.update(_seed_columns(layer, row["theta"]))
    return sweep, test_ev, table, cpl_req


def _attack_protocols(st: _Stages, sweep: LibrarySweep, test_ev: Evidence, cpl_req: list[Any], x_test: Tensor,
                      y_test: Tensor) -> tuple[dict[str, Any], list[AttackSet]]:
    """Each protocol's attacks and CPL detection: ``({protocol: result}, every attack set)``."""
    settings, timer, progress = st.settings, st.timer, st.progress
    mean, std = CIFAR_MEAN, CIFAR_STD
    detection: dict[str, Any] = {}
    attack_sets: list[AttackSet] = []
    for name in settings.protocols:
        n_req = settings.n_paper if name == "paper" else settings.n_standard
        n = min(n_req, len(test_ev))
        eps = settings.paper_epsilons if name == "paper" else settings.standard_epsilons
        proto = ProtocolSettings(name, list(eps), n_images=n, nb_iter=settings.nb_iter, seed=settings.attack_seed,
                                 backend=settings.attack_backend)
        with timer.stage(f"attacks ({name})"):
            sets = generate_attack_sets(proto, st.model, x_test, y_test, mean=mean, std=std, progress=progress)
        attack_sets.extend(sets)
        with timer.stage(f"attacked evidence ({name})"):
            attacked = attacked_evidence(sweep, st.probe, sets, cpl_req, y_test, model_space="normalized", mean=mean,
                                         std=std, batch_size=settings.batch_size, progress=progress)
        clean = test_ev.subset(torch.arange(n))
        result = evaluate_protocol(name, clean, attacked, settings.cpl_sets, top_k=settings.top_k_cpl,
                                   fpr=settings.fpr)
        result["n_requested"] = n_req
        result["attack"] = proto.describe()
        detection[name] = result
    return detection, attack_sets


def _run_detectors(sweep: LibrarySweep, model: torch.nn.Module, settings: Cifar10Settings, device: torch.device, *,
                   data: tuple[Tensor, Tensor | None, Tensor, Tensor], attack_sets: Sequence[AttackSet],
                   out_dir: Path, log: Callable[[str], None] | None) -> dict[str, Any]:
    """The detector comparison (:func:`~libnet_plugin.experiments.comparison.detector_comparison`) of this run.

    The library network is the sweep's at the first CPL set; the detectors are scored on the successful
    standard-protocol attacks and, as out-of-domain inputs, on the registry's ``"uniform noise"`` set
    (:func:`~libnet_plugin.experiments.ood.ood_set`, seeded with ``settings.attack_seed``, as many images as
    there are test images). With ``settings.adaptive`` the
    detectors it names are also attacked by attackers who know them (``detector_comparison``'s
    ``adaptive``; ``evasion.png`` too). ``data`` is ``(x_train, y_train, x_test, y_test)`` in pixels;
    ``detectors.json``, ``detectors.md`` and ``roc.png`` go into ``out_dir``.
    """
    x_train, y_train, x_test, y_test = data
    first = next(iter(settings.cpl_sets))
    net = sweep.to_network(model, settings.cpl_sets[first], top_k=settings.top_k_cpl, device=device)
    from .ood import ood_set

    noise = ood_set("uniform noise", x_test.cpu(), seed=settings.attack_seed)
    return detector_comparison(net, (x_train, y_train), (x_test.cpu(), y_test.cpu()), attack_sets,
                               space="normalized", mean=CIFAR_MEAN, std=CIFAR_STD, protocol="standard",
                               ood_sets={"uniform noise": noise}, out_dir=out_dir, batch_size=settings.batch_size,
                               log=log, adaptive=settings.adaptive)


def _pick(values: Sequence[float], n: int) -> list[float]:
    """Up to ``n`` values spread evenly over ``values`` (first and last included)."""
    values = list(values)
    if len(values) <= n:
        return values
    return [values[round(i * (len(values) - 1) / (n - 1))] for i in range(n)]


def _draw_figures(out: Path, sizes: Mapping[str, Any], table: Mapping[str, Any], detection: Mapping[str, Any],
                  settings: Cifar10Settings) -> list[str]:
    """Figs. 4A, 4B/C, 5C (AUROC and TPR vs epsilon per protocol) and CPL histograms; returns file names."""
    from . import plots

    files = [plots.plot_library_sizes(sizes, out / "fig4a_library_sizes.png",
                                      title="ResNet44 on CIFAR-10: library size vs threshold (Fig. 4A)"),
             plots.plot_agreement(table, out / "fig4bc_agreement.png", top_k=settings.top_k_agreement,
                                  title=f"ResNet44 per-layer predictions, top_k = {settings.top_k_agreement} "
                                        "(Figs. 4B, 4C)")]
    for name, res in detection.items():
        unit = "normalised units" if name == "paper" else "pixels"
        for metric, what in (("auroc", "AUROC, Fig. 5C"), ("tpr_at_fpr", f"TPR at {settings.fpr * 100:g}% FPR")):
            files.append(plots.plot_auroc_vs_epsilon(
                res["results"], out / f"fig5c_{metric}_{name}.png", metric=metric, epsilon_label=f"ε ({unit})",
                title=f"CPL detection, {name} protocol ({what})"))
        first = next(iter(settings.cpl_sets))
        raw = res["cpl"][first]
        clean_sel = res.get("cpl_clean_selected", {}).get(first, {})  # the clean inputs scored at each epsilon
        eps = _pick([e for e in raw if e != "clean"], 4)
        if eps:
            files.append(plots.plot_cpl_histograms(
                [(f"{first}, ε = {e:g}", clean_sel.get(e, raw["clean"]), raw[e]) for e in eps],
                out / f"cpl_hist_{name}.png",
                title=f"CPL of clean vs attacked inputs, set {first}, {name} protocol"))
    return [p.name for p in files]


# --------------------------------------------------------------------------------------------------
# The report as markdown
# --------------------------------------------------------------------------------------------------


def _pct(v: Any) -> Any:
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else 100.0 * v


def render_markdown(report: Mapping[str, Any]) -> str:
    """``report.md``: the tables of the report, with the seed's numbers beside ours.

    Args:
        report: a report as returned by :func:`reproduce_cifar10`.

    Returns:
        Markdown text.
    """
    run, s = report["run"], report["settings"]
    lines = ["# CIFAR-10 ResNet44: library networks (paper Table 1, Figs. 4 and 5C)", ""]
    if run.get("quick"):
        lines += ["**Quick run** (`--quick`): fewer images, epsilons and PGD steps than the paper; the numbers "
                  "check the pipeline, they do not reproduce the paper.", ""]
    lines += [f"- data: `{run.get('data_dir', '?')}`; {run['n_train']} training images (library order: file "
              f"order), {run['n_test']} test images",
              f"- weights: `{run.get('weights', '?')}`",
              f"- device: `{run['device']}`",
              f"- model test accuracy: {report['model']['test_accuracy'] * 100:.2f}% on these {run['n_test']} test "
              f"images (seed's weights: {report['model']['seed_test_accuracy'] * 100:.2f}% on all 10,000)", ""]
    lines += ["## Library size and agreement with the model (Figs. 4A-C)", "",
              f"top_k = {report['libraries']['top_k']}; agreement = argmax P equals the model's answer (top-1) or is "
              "among the 3 largest entries of P (top-3); accuracy = argmax P against the labels. Seed columns: "
              "the seed code's committed results on the full data (docs/method.md section 10), where reported.", ""]
    for layer, rows in report["libraries"]["agreement"].items():
        lines += [f"### {layer} ({PAPER_NAMES.get(layer, layer)})", ""]
        lines.append(markdown_table(
            ["level", "theta", "size", "top-1 %", "top-3 %", "accuracy %", "seed size", "seed top-1 %"],
            [[r.get("level"), f"{r['theta']:.2f}", r["size"], _pct(r["top1_agreement"]), _pct(r["top3_agreement"]),
              _pct(r["accuracy"]), r.get("seed_size"), _pct(r.get("seed_top1_agreement"))] for r in rows],
            floatfmt=".1f"))
        lines.append("")
    lines += ["## CPL detection: AUROC against epsilon (Fig. 5C)", "",
              "Threshold sets (Table 1): " + "; ".join(
                  f"{n} = " + "/".join(f"{t:.2f}" for t in thr.values()) for n, thr in s["cpl_sets"].items())
              + f" for {'/'.join(PAPER_NAMES[l] for l in LAYERS)}; top_k = {s['top_k_cpl']}.", ""]
    seed_cpl = report["seed"]["cpl_auroc_paper_protocol"]
    for name, res in report["detection"].items():
        eps = [row["epsilon"] for row in res["epsilons"]]
        if name == "paper":
            lines += ["### Paper protocol (for comparison with the seed only)", "",
                      "advertorch-style PGD on normalised tensors clipped to [0, 1], epsilon in normalised units, "
                      f"{s['nb_iter']} steps of 0.01, every attacked image used. Seed: AUROC "
                      f"{seed_cpl['auroc_range'][0]:.2f}-{seed_cpl['auroc_range'][1]:.2f} at epsilon "
                      f"{seed_cpl['epsilon_range'][0]:g}-{seed_cpl['epsilon_range'][1]:g} "
                      f"({seed_cpl['n_clean']} vs {seed_cpl['n_attacked']}).", ""]
            fmt = lambda e: f"{e:g}"  # noqa: E731
        else:
            lines += ["### Standard protocol (the honest number)", "",
                      f"PGD in [0, 1] pixel space, normalisation inside the model, {s['nb_iter']} steps of "
                      "2.5 eps / steps from a random start; only inputs classified correctly whose attack succeeds.",
                      ""]
            fmt = lambda e: f"{Fraction(e).limit_denominator(255).numerator}/255" if abs(  # noqa: E731
                e * 255 - round(e * 255)) < 1e-3 else f"{e:g}"
        lines.append(markdown_table(["epsilon"] + [fmt(e) for e in eps],
                                    [["n (clean = attacked)"] + [row["n_selected"] for row in res["epsilons"]],
                                     ["model accuracy attacked %"] + [_pct(row["model_accuracy_attacked"])
                                                                       for row in res["epsilons"]]],
                                    floatfmt=".1f"))
        lines.append("")
        lines.append(markdown_table(["AUROC"] + [fmt(e) for e in eps],
                                    [[set_name] + [r["auroc"] for r in rows]
                                     for set_name, rows in res["results"].items()]))
        lines.append("")
        lines.append(markdown_table([f"TPR at {res['fpr'] * 100:g}% FPR"] + [fmt(e) for e in eps],
                                    [[set_name] + [r["tpr_at_fpr"] for r in rows]
                                     for set_name, rows in res["results"].items()]))
        lines.append("")
    det = report.get("detectors")
    if det:
        lines += ["## Other detectors", ""]
        if det.get("available"):
            lines += [f"Every detector of `libnet evaluate-detectors`, calibrated on the second half of the test "
                      f"images and scored on the first half and the successful {det['protocol']}-protocol "
                      "attacks on it, and on uniform noise (cells: AUROC / TPR at the calibrated threshold; files "
                      "`detectors.json`, `detectors.md`, `roc.png`"
                      + (", `evasion.png`" if det["table"].get("files", {}).get("evasion_png") else "") + ").", "",
                      det["table"]["table_markdown"], ""]
            evasion = comparison_evasion_markdown(det["table"])
            if evasion is not None:
                lines += [evasion, ""]
        else:
            lines += [det["note"], ""]
    mem = report["memory"]
    lines += ["## Cost", "",
              markdown_table(["stage", "seconds"], [[k, v] for k, v in report["timings"].items()], floatfmt=".1f"),
              "",
              f"- library nodes held: {mem['library_bytes'] / 2**20:.1f} MiB (all levels of all layers)",
              f"- peak process memory: {mem['peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f"; peak CUDA memory allocated: {mem['cuda_peak_allocated_bytes'] / 2**20:.0f} MiB"
                 if mem.get("cuda_peak_allocated_bytes") is not None else ""),
              ""]
    if report.get("figures"):
        lines += ["## Figures", ""] + [f"- `{f}`" for f in report["figures"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def _epsilon(text: str) -> float:
    """An epsilon given as a number (``0.03``) or a fraction (``8/255``)."""
    try:
        value = float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"epsilon must be positive, got {text!r}")
    return round(value, 6)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``libnet reproduce cifar10`` to ``parser``."""
    parser.epilog = ("Data: the CIFAR-10 'python version' (data_batch_1..5, test_batch) in --data-dir or its "
                     "cifar-10-batches-py subfolder. Weights: a ResNet44 state_dict (pytorch_resnet_cifar10 "
                     "format). Nothing is downloaded.")
    g = parser.add_argument_group("data and model")
    g.add_argument("--data-dir", required=True, metavar="DIR",
                   help=f"folder holding the CIFAR-10 python batches ({', '.join(CIFAR10_FILES)}), or its parent")
    w = g.add_mutually_exclusive_group()
    w.add_argument("--weights", metavar="FILE",
                   help="ResNet44 weights: a state_dict or {'state_dict': ...} checkpoint saved with torch.save "
                        "(the public pytorch_resnet_cifar10 resnet44 file works; 'module.' prefixes accepted)")
    w.add_argument("--train-epochs", type=_positive_int, metavar="N",
                   help="no weights: train the ResNet44 for N epochs (SGD 0.9, lr 0.1, wd 1e-4, crop + flip; "
                        "200 is the standard recipe, for GPU machines) and cache the weights")
    g.add_argument("--train-schedule", choices=("step", "cosine"), default="step",
                   help="learning-rate schedule for --train-epochs (default: step, /10 at 50%% and 75%%)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of the training run (default 0)")
    g.add_argument("--cache-dir", default=".cache", metavar="DIR",
                   help="where --train-epochs caches the trained weights (default: %(default)s in the current "
                        "folder, as for reproduce mnist); it must lie outside --out, which a run replaces as a "
                        "whole")
    g.add_argument("--device", default="auto",
                   help="auto (CUDA if available, else CPU with a warning), cpu, cuda or cuda:N (default auto)")
    r = parser.add_argument_group("run size")
    r.add_argument("--quick", action="store_true",
                   help="a short run: 1000 training / 200 test images, 32 + 64 attacked images, 2 + 1 epsilons, "
                        "10 PGD steps (explicit options below still win)")
    r.add_argument("--n-train", type=_positive_int, metavar="N", help="training images for the libraries (default all)")
    r.add_argument("--n-test", type=_positive_int, metavar="N", help="test images (default all)")
    r.add_argument("--n-paper", type=_positive_int, metavar="N", help="images attacked, paper protocol (default 200)")
    r.add_argument("--n-standard", type=_positive_int, metavar="N",
                   help="images attacked, standard protocol (default 1000)")
    r.add_argument("--paper-epsilons", type=_epsilon, nargs="+", metavar="EPS",
                   help="paper-protocol budgets in normalised units (default 0.01..0.09, 0.1..1.0)")
    r.add_argument("--standard-epsilons", type=_epsilon, nargs="+", metavar="EPS",
                   help="standard-protocol budgets in pixels, e.g. 8/255 (default 2/255 4/255 8/255 16/255)")
    r.add_argument("--attack-steps", type=_positive_int, metavar="N", help="PGD steps (default 40)")
    r.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS),
                   help="attack protocols to run (default both)")
    r.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass (default 256)")
    r.add_argument("--seed", type=int, default=1,
                   help="seed of the PGD random start and of the attacks that know the detector (default 1, as the "
                        "seed)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=os.path.join("runs", "cifar10"), metavar="DIR",
                   help="output folder for report.json, report.md, figures (default runs/cifar10): new, empty "
                        "or an earlier run's holding only what that run wrote, which is replaced only when the "
                        "new run completes; a run that "
                        "fails after the libraries leaves its partial report in OUT.partial-report.json")
    o.add_argument("--no-detectors", action="store_true", help="skip the detector comparison")
    o.add_argument("--no-plots", action="store_true", help="skip the figures")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: only on a terminal)")
    a = parser.add_argument_group(
        "attacks that know the detector",
        "off unless --adaptive-detectors is given (ResNet44 attacks are heavy on a CPU); the other options size "
        "the attacks, on the correctly classified standard-protocol images, in pixel space")
    add_budget_arguments(a, detectors_help="attack these detectors (labels of the detector table, e.g. msp "
                                           "'library-fusion') with white-box adaptive PGD and a score-only search "
                                           "and report their evasion rates (default: none)")


def _adaptive_budget(args: argparse.Namespace) -> AdaptiveBudget | None:
    """The budget of ``--adaptive-detectors`` and the options that size it (checked by the one policy,
    :func:`~libnet_plugin.experiments.threat_models.adaptive_budget`: its seed is ``--seed``, the attack
    seed; its detectors are checked by :meth:`Cifar10Settings.validate`); ``None`` without it."""
    refuse = None
    if args.no_detectors:
        refuse = "--adaptive-detectors attacks detectors of the detector comparison, which --no-detectors skips"
    elif "standard" not in args.protocols:
        refuse = ("--adaptive-detectors attacks the standard protocol's images; add 'standard' to --protocols "
                  f"(got {' '.join(args.protocols)})")
    return adaptive_budget(args, quick=bool(args.quick), enabled=bool(args.adaptive_detectors),
                           off="only size the attacks of --adaptive-detectors, which is not given; add "
                               "--adaptive-detectors LABEL ... (labels of the detector table)", refuse=refuse)


def settings_from_args(args: argparse.Namespace) -> Cifar10Settings:
    """The :class:`Cifar10Settings` of parsed command-line arguments (``--quick`` first, then options)."""
    s = Cifar10Settings(quick=bool(args.quick))
    if args.quick:
        s = replace(s, **QUICK_OVERRIDES)
    overrides = {"n_train": args.n_train, "n_test": args.n_test, "n_paper": args.n_paper,
                 "n_standard": args.n_standard, "nb_iter": args.attack_steps,
                 "paper_epsilons": tuple(args.paper_epsilons) if args.paper_epsilons else None,
                 "standard_epsilons": tuple(args.standard_epsilons) if args.standard_epsilons else None}
    s = replace(s, **{k: v for k, v in overrides.items() if v is not None})
    s = replace(s, protocols=tuple(dict.fromkeys(args.protocols)), attack_seed=args.seed, batch_size=args.batch_size,
                detectors=not args.no_detectors, plots=not args.no_plots, adaptive=_adaptive_budget(args))
    return s.validate()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_outside(final: Path, paths: Mapping[str, Path | None]) -> None:
    """Refuse an input (``{option: path}``) that lies inside the run folder, which a run replaces as a whole."""
    root = final.resolve()
    for option, path in paths.items():
        if path is None:
            continue
        p = path.expanduser().resolve()
        if p == root or root in p.parents:
            raise ExperimentError(f"{option} {str(path)!r} lies inside the output folder {str(final)!r}, which a "
                                  "run replaces as a whole when it completes; move it out of there (the weight "
                                  "cache's default is .cache in the current folder) or choose another --out")


def run(args: argparse.Namespace) -> int:
    """Run ``libnet reproduce cifar10``; return the exit status (0 ok, 2 bad input, 1 failed run).

    Every input and the output folder are checked first (exit 2 before any work); a failed run (exit 1, or
    an exception) leaves an earlier run in ``--out`` as it was and no empty folder (see the module docstring).
    """
    prog = "libnet reproduce cifar10"
    created = _missing_folders(_out_parent(args.out))
    try:
        settings = settings_from_args(args)
        device, warning = resolve_device(args.device)
        data_dir = check_data_dir(args.data_dir)
        if args.weights is None and args.train_epochs is None:
            raise ExperimentError("give --weights FILE (ResNet44 weights) or --train-epochs N (train them here; "
                                  "for GPU machines)")
        state = check_weights(args.weights) if args.weights is not None else None
        cache = Path(args.cache_dir).expanduser()
        out = check_run_folder(args.out)  # the run is staged beside it and swapped in when complete
        _check_outside(out, {"--cache-dir": cache, "--data-dir": data_dir,
                             "--weights": Path(args.weights) if args.weights is not None else None})
        if warning:
            print(f"{prog}: warning: {warning}", file=sys.stderr)
        _log(f"reading CIFAR-10 from {str(data_dir)!r}")
        x_train, y_train, x_test, y_test = load_cifar10(data_dir)  # labels 0..9, images in both splits
    except (LibnetError, OSError) as exc:
        _remove_empty(created)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    try:
        extra: dict[str, Any] = {"data_dir": str(data_dir), "n_train_available": int(x_train.shape[0]),
                                 "n_test_available": int(x_test.shape[0])}
        if state is not None:
            model = ResNet44()
            model.load_state_dict(state)
            extra["weights"] = str(Path(args.weights).expanduser())
        else:
            from .training import TrainConfig, load_or_train_resnet44

            cfg = TrainConfig(epochs=args.train_epochs, schedule=args.train_schedule, seed=args.train_seed)
            _log(f"training ResNet44 for {cfg.epochs} epochs on {x_train.shape[0]} images on {device} "
                 f"(cache: {str(cache)!r})")
            net, path, info = load_or_train_resnet44(x_train, y_train, cfg, cache, x_test=x_test, y_test=y_test,
                                                     device=device, progress=args.progress)
            _log(("loaded cached weights " if info.get("cached") else "trained and saved weights ") + str(path))
            model = ResNet44()
            model.load_state_dict(net.state_dict())
            extra["weights"] = str(path)
            extra["training"] = info
        model = model.to(device).eval()
        n_train = settings.n_train or x_train.shape[0]
        n_test = settings.n_test or x_test.shape[0]
        report = reproduce_cifar10(model, x_train[:n_train], x_test[:n_test], y_test[:n_test], settings,
                                   device=device, out_dir=out, y_train=y_train[:n_train], progress=args.progress,
                                   log=_log, extra=extra)
    except LibnetError as exc:
        _remove_empty(created)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BaseException:
        _remove_empty(created)
        raise
    _log(f"report: {str(out / 'report.md')!r} and {str(out / 'report.json')!r} "
         f"({report['timings']['total']:.0f} s)")
    return 0
