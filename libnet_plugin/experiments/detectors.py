"""``libnet evaluate-detectors``: every registered detector on the same clean, attacked and out-of-domain sets.

The MNIST default (the paper's net trained on 4,000 of the 5,000 embedded images with a fixed seed, the
weights cached in ``--cache-dir`` and shared with ``libnet reproduce mnist``): the 1,000 test images are
split in two halves; the first half is the clean CALIBRATION set (detector thresholds and the clean
reference of fused scores), the second half the clean EVALUATION set, whose correctly classified images
are attacked with the standard protocol of METHOD.md section 9 (L-inf PGD-40 in pixel space, random
start, step ``2.5 eps / 40``, eps 0.1 / 0.2 / 0.3; only successful attacks are kept). Out-of-domain sets:
scikit-learn's 8x8 digits upscaled to 28x28, and uniform noise images. Every detector listed by the
registered plugins (:func:`libnet_plugin.detectors.registered_detectors`), plus the MNIST variants of
:data:`MNIST_VARIANTS` (the library-based scores on the convolution layers), is calibrated on the same clean
images at 5% FPR and scored on the same sets; none sees an attacked input before the test.

Output (``--out``, default ``runs/detectors``): ``detectors.json`` (everything
:func:`evaluate_detectors` returns), ``detectors.md`` (the table) and ``roc.png`` (ROC curves, one panel
per set).

Example:
    libnet evaluate-detectors                  # the MNIST default, a few minutes on 2 cores
    libnet evaluate-detectors --quick          # a small run for tests (about 30 s)
    libnet evaluate-detectors --thresholds S1  # the seed's hand-picked set S1 instead of "auto"
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .._batches import iter_batches
from ..detector import ConsistencyDetector
from ..detectors import registered_detectors
from ..metrics import auroc, tpr_at_fpr
from ..network import LibraryNetwork
from ..serialization import atomic_write_bytes
from .common import ExperimentError, StageTimer, ensure_writable_dir, environment_info, markdown_table, write_json_atomic, write_text_atomic

__all__ = ["evaluate_detectors", "calibration_check", "plot_roc_curves", "add_arguments", "run", "DEFAULT_THRESHOLDS"]

#: The default ``--thresholds``: each layer's theta chosen so that its library holds about a quarter of
#: the training inputs (:func:`libnet_plugin.thresholds.choose_thresholds`).
DEFAULT_THRESHOLDS = "auto:0.25"
#: The library-based score restricted to the MNIST net's convolution layers (added by the MNIST run).
MNIST_CONV_VARIANT = "library-margin (conv1, conv2)"
#: The library Mahalanobis distance on the MNIST net's convolution layers (added by the MNIST run); the
#: layers were chosen on dev splits (other seeds), not on the reported sets.
MNIST_DISTANCE_VARIANT = "library-distance (conv1, conv2)"
#: Detectors the MNIST run adds to the registered ones: ``{label: (name, settings)}``.
MNIST_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    MNIST_CONV_VARIANT: ("library-margin", {"layers": ["conv1", "conv2"]}),
    MNIST_DISTANCE_VARIANT: ("library-distance", {"layers": ["conv1", "conv2"]}),
}
#: Detector names whose score is computed from the libraries (the rest are baselines).
LIBRARY_BASED = frozenset({"cpl", "library-margin", "library-distance"})


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
    return _split_fpr(det._calibration_data(x_clean), det._fuses, fpr, n_splits, seed)


def _split_fpr(data: Tensor, fused: bool, fpr: float, n_splits: int, seed: int) -> dict[str, Any]:
    """:func:`calibration_check` on what :meth:`ConsistencyDetector._calibration_data` returned for clean inputs."""
    from ..detectors import ConformalFusion

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
        if fused:
            fusion = ConformalFusion()
            cal_scores, held_scores = fusion.fit(cal), fusion(held)
        else:
            cal_scores, held_scores = cal, held
        threshold = cal_scores.sort().values[rank - 1]
        rates.append(float((held_scores > threshold).double().mean()))
    r = np.asarray(rates)
    return {"requested": fpr, "mean": float(r.mean()), "sd": float(r.std(ddof=1)) if len(r) > 1 else 0.0,
            "min": float(r.min()), "max": float(r.max()), "n_calibration": n_cal, "n_heldout": n - n_cal,
            "n_splits": int(n_splits)}


def evaluate_detectors(net_or_model: Any, train: Any, clean_test: Any, attacked_sets: Mapping[str, Tensor],
                       ood_sets: Mapping[str, Tensor] | None = None, detectors: Any = None,
                       out_dir: str | os.PathLike | None = None, *, calibration: Any = None,
                       layers: Sequence[str] | None = None, thresholds: Any = None, fpr: float = 0.05,
                       batch_size: int = 256, fpr_splits: int = 50, plugin_manager: Any = None,
                       log: Callable[[str], None] | None = None) -> dict[str, Any]:
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
        detectors: ``None`` (every detector the registered plugins list), a list of detector names, or
            ``{label: name | (name, settings)}``.
        out_dir: if given, write ``detectors.json``, ``detectors.md`` and ``roc.png`` there.
        calibration: clean calibration inputs (default: the first half of ``clean_test``).
        layers / thresholds: used only when ``net_or_model`` is a model.
        fpr: the false-positive rate each detector is calibrated to.
        batch_size: scoring batch size (timings are per 1,000 inputs at this batch size).
        fpr_splits: random halves of the calibration + clean evaluation inputs over which the held-out
            false-positive rate of the calibration is measured (:func:`calibration_check`).
        plugin_manager: where detectors are looked up (default: the network's).
        log: a function receiving progress lines (default: silent).

    Returns:
        A JSON-able dict::

            {
              "settings": {"fpr", "n_train", "n_calibration", "n_clean", "layers", "thresholds",
                           "library_sizes", "batch_size"},
              "sets": {set name: {"kind": "attack" | "ood", "n": int}},
              "forward_ms_per_1000": float,        # the model alone, same batches
              "detectors": {label: {
                  "method": str, "settings": dict, "library_based": bool,
                  "auroc": {set: float}, "tpr_at_fpr": {set: float},   # TPR at fpr of the clean eval set
                  "tpr_calibrated": {set: float},  # flagged at the calibrated threshold
                  "heldout_fpr": float,            # clean evaluation inputs flagged (n = settings.n_clean)
                  "fpr_check": {"requested", "mean", "sd", "min", "max", "n_calibration", "n_heldout",
                                "n_splits"},       # held-out FPR over random halves of all clean inputs
                  "threshold": float, "fit_s": float, "ms_per_1000": float,
                  "time_ratio": float,             # ms_per_1000 / forward_ms_per_1000
                  "memory_bytes": {"library": int, "detector": int, "kept": int}}},
              "rows": [ {"detector": label, "<set>": "AUROC / TPR", ..., "held-out FPR", "ms / 1000",
                         "x forward", "memory MB"} ],   # one flat row per detector, for rendering
              "table_markdown": str,
              "best_library_based": label or None,  # highest mean AUROC over the attack sets
              "files": {"json", "markdown", "roc_png"} (paths, when out_dir is given),
            }

        ``memory_bytes.kept`` is what the detector keeps in memory: the library network plus its own
        tensors for library-based detectors, its own tensors only for the baselines.

    Example:
        >>> res = evaluate_detectors(net, (x_tr, y_tr), x_te, {"PGD eps=0.3": x_adv}, {"noise": noise})  # doctest: +SKIP
        >>> print(res["table_markdown"])  # doctest: +SKIP
    """
    say = log or (lambda _msg: None)
    if isinstance(net_or_model, LibraryNetwork):
        net = net_or_model
        if layers is not None or thresholds is not None:
            raise ValueError("layers and thresholds are only used when evaluate_detectors builds the library network")
    else:
        if layers is None or thresholds is None:
            raise ValueError("evaluate_detectors needs layers= and thresholds= to build a LibraryNetwork from a model")
        net = LibraryNetwork(net_or_model, layers, thresholds=thresholds, plugin_manager=plugin_manager)
    if not (isinstance(fpr, (int, float)) and 0.0 < fpr < 1.0):
        raise ValueError(f"fpr must be a number in (0, 1), got {fpr!r}")
    if not net.is_fitted:
        say("fitting the library network")
        net.fit(train)
    pm = plugin_manager if plugin_manager is not None else net.plugin_manager
    specs = _resolve_detectors(detectors, pm)
    x_clean, _ = _as_tensor(clean_test, batch_size)
    if calibration is None:
        half = x_clean.shape[0] // 2
        if half < 2:
            raise ValueError(f"clean_test has {x_clean.shape[0]} inputs; at least 4 are needed to split it")
        x_cal, x_clean = x_clean[:half], x_clean[half:]
    else:
        x_cal, _ = _as_tensor(calibration, batch_size)
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

    model = net.model
    forward_ms = float("nan")
    if isinstance(model, torch.nn.Module):
        def forward(x: Tensor) -> Tensor:
            with torch.no_grad():
                return model(x.to(net.device))

        forward_ms, _ = _time_scores(forward, x_clean, batch_size)

    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {name: {} for name in sets}
    for label, (method, settings) in specs.items():
        say(f"detector {label!r} ({method})")
        t0 = time.perf_counter()
        det = ConsistencyDetector(net, method=method, settings=settings, plugin_manager=pm)
        if det.requires_training_data:
            det.fit(train)
        cal_data = det._calibration_data(x_cal)  # kept for the FPR check below: no second pass over x_cal
        det._calibrate_on(cal_data, fpr)
        fit_s = time.perf_counter() - t0
        ms, parts = _time_scores(det.score, x_clean, batch_size)
        clean_scores = torch.cat(parts).cpu()
        # the FPR check needs the clean inputs as calibration sees them: plain scores are the ones just timed
        clean_data = det._calibration_data(x_clean) if det._fuses else clean_scores
        entry: dict[str, Any] = {
            "method": method, "settings": settings,
            "library_based": method in LIBRARY_BASED or bool(getattr(det.scorer, "uses_library", False)),
            "auroc": {}, "tpr_at_fpr": {}, "tpr_calibrated": {},
            "heldout_fpr": float((clean_scores > det.threshold_).float().mean()),
            "threshold": det.threshold_, "fit_s": fit_s, "ms_per_1000": ms,
            "time_ratio": ms / forward_ms if forward_ms and math.isfinite(forward_ms) else float("nan"),
        }
        entry["fpr_check"] = _split_fpr(torch.cat([cal_data.cpu(), clean_data.cpu()]), det._fuses, fpr,
                                        n_splits=fpr_splits, seed=0)
        mem = det.memory_bytes()
        mem["kept"] = mem["detector"] + (mem["library"] if entry["library_based"] else 0)
        entry["memory_bytes"] = mem
        for name, x in sets.items():
            s = det.score(x).cpu()
            entry["auroc"][name] = auroc(clean_scores, s)
            entry["tpr_at_fpr"][name] = tpr_at_fpr(clean_scores, s, fpr)
            entry["tpr_calibrated"][name] = float((s > det.threshold_).float().mean())
            curves[name][label] = _roc(clean_scores, s)
        results[label] = entry

    attack_names = [n for n in sets if kinds[n] == "attack"]
    lib = [l for l, e in results.items() if e["library_based"]]
    best = (max(lib, key=lambda l: float(np.mean([results[l]["auroc"][n] for n in attack_names])))
            if lib and attack_names else None)
    rows = []
    for label, e in results.items():
        row: dict[str, Any] = {"detector": label}
        for name in sets:
            row[f"{name}: AUROC / TPR"] = f"{e['auroc'][name]:.3f} / {e['tpr_at_fpr'][name]:.2f}"
        row["held-out FPR"] = e["heldout_fpr"]
        row[f"FPR over {e['fpr_check']['n_splits']} splits"] = f"{e['fpr_check']['mean']:.3f} ± {e['fpr_check']['sd']:.3f}"
        row["ms / 1000"] = round(e["ms_per_1000"], 1)
        row["x forward"] = round(e["time_ratio"], 2) if math.isfinite(e["time_ratio"]) else None
        row["memory MB"] = round(e["memory_bytes"]["kept"] / 2**20, 2)
        rows.append(row)
    headers = list(rows[0])
    table = markdown_table(headers, [[r[h] for h in headers] for r in rows])
    out: dict[str, Any] = {
        "settings": {"fpr": fpr, "n_train": net.n_train_, "n_calibration": int(x_cal.shape[0]),
                     "n_clean": int(x_clean.shape[0]), "layers": list(net.layers), "thresholds": dict(net.thresholds),
                     "library_sizes": net.library_sizes_, "batch_size": batch_size},
        "sets": {name: {"kind": kinds[name], "n": int(x.shape[0])} for name, x in sets.items()},
        "forward_ms_per_1000": forward_ms, "detectors": results, "rows": rows, "table_markdown": table,
        "best_library_based": best, "files": {},
    }
    if out_dir is not None:
        d = ensure_writable_dir(out_dir)
        out["files"] = {"json": str(d / "detectors.json"), "markdown": str(d / "detectors.md"),
                        "roc_png": str(plot_roc_curves(curves, d / "roc.png"))}
        write_text_atomic(d / "detectors.md", table + "\n")
        write_json_atomic(d / "detectors.json", out)
    return out


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
    import io

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


# ---------------------------------------------------------------------------------------------------
# the MNIST default run
# ---------------------------------------------------------------------------------------------------


def _parse_thresholds(spec: str, layers: Sequence[str]) -> tuple[Any, dict[str, Any] | None]:
    """``"S1".."S7"`` | ``"auto"`` | ``"auto:<target>"`` | four comma-separated numbers."""
    from .mnist import CPL_SETS

    if spec in CPL_SETS:
        return dict(CPL_SETS[spec]), None
    if spec == "auto" or spec.startswith("auto:"):
        target_text = spec.partition(":")[2] or "0.1"
        try:
            target: float | int = int(target_text) if target_text.isdigit() else float(target_text)
        except ValueError:
            raise ExperimentError(f"--thresholds auto:<target>: the target must be a fraction or a number of nodes, "
                                  f"got {target_text!r}") from None
        return "auto", {"target": target}
    parts = spec.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(layers):
        raise ExperimentError(f"--thresholds must be one of {sorted(CPL_SETS)}, 'auto', 'auto:<target>' or "
                              f"{len(layers)} comma-separated numbers for {list(layers)}, got {spec!r}")
    return dict(zip(layers, values)), None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libnet evaluate-detectors``."""
    parser.add_argument("--out", default=os.path.join("runs", "detectors"), metavar="DIR",
                        help="folder receiving detectors.json, detectors.md and roc.png (default: %(default)s)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, metavar="SPEC",
                        help="library thresholds: a seed set S1..S7, 'auto', 'auto:<fraction or nodes>', or "
                             "four numbers for conv1,conv2,fc1,fc2 (default: %(default)s)")
    parser.add_argument("--detectors", nargs="+", metavar="LABEL",
                        help="only these detectors (labels of the table, or detector names); default: all registered")
    parser.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                        help="PGD budgets in pixel units (default 0.1 0.2 0.3)")
    parser.add_argument("--n-attack", type=int, metavar="N",
                        help="clean evaluation images attacked (default all 500; 48 with --quick)")
    parser.add_argument("--fpr", type=float, default=0.05, help="calibrated false-positive rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, training and attacks")
    parser.add_argument("--cache-dir", default=".cache", metavar="DIR",
                        help="cache of the embedded data and the trained weights, shared with `libnet reproduce "
                             "mnist` (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for tests: 600 training images, 1 epoch, 10-step PGD on 48 images")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")


def _mnist_model(x_tr: Tensor, y_tr: Tensor, seed: int, epochs: int, cache_dir: str | None,
                 progress: bool | None, log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """The paper's net trained with ``seed``, from (or into) the cache shared with ``reproduce mnist``."""
    from .mnist import MnistSettings, cached_or_trained_mnist_net

    settings = MnistSettings.default_run(seed=seed, epochs=epochs, n_train=int(x_tr.shape[0]))
    cache = Path(cache_dir).expanduser() if cache_dir else None
    return cached_or_trained_mnist_net(x_tr, y_tr, settings, cache, progress, log)


def _cached_attacks(model: torch.nn.Module, x: Tensor, y: Tensor, epsilons: Sequence[float], nb_iter: int, seed: int,
                    cache_dir: str | None, progress: bool, log: Callable[[str], None]) -> dict[float, tuple[Tensor, str]]:
    """Standard-protocol PGD (pixel space) at each epsilon, read from / written to ``cache_dir`` when given.

    The cache file is keyed by a digest of the model's weights, the attacked images and labels, and the
    attack settings, so a different model or data never reuses it.
    """
    import hashlib

    from ..attacks import attack_standard_protocol
    from ..errors import LibnetError
    from .common import AttackSet, load_attack_sets, save_attack_sets

    h = hashlib.sha256(f"standard|{nb_iter}|{seed}".encode())
    for t in [*model.state_dict().values(), x, y]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir).expanduser() / f"detector-attacks-{h.hexdigest()[:16]}.safetensors" if cache_dir else None
    cached: dict[float, Tensor] = {}
    if path is not None and path.is_file():
        try:
            cached = {round(s.epsilon, 6): s.x_adv for s in load_attack_sets(path)[0]}
        except (LibnetError, OSError) as exc:
            log(f"the cached attacks {str(path)!r} are unreadable ({exc}); attacking again")
    out: dict[float, tuple[Tensor, str]] = {}
    for eps in epsilons:
        key = round(float(eps), 6)
        if key in cached and cached[key].shape == x.shape:
            out[eps] = (cached[key], "cache")
        else:
            x_adv, _ = attack_standard_protocol(model, x, y, eps=eps, nb_iter=nb_iter, seed=seed, backend="torch",
                                                progress=progress)
            cached[key] = x_adv.detach().cpu()
            out[eps] = (cached[key], "computed")
    if path is not None and any(src == "computed" for _, src in out.values()):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_attack_sets(path, [AttackSet("standard", e, xa, "pixels", torch.arange(x.shape[0]))
                                    for e, xa in sorted(cached.items())],
                             {"nb_iter": nb_iter, "seed": seed, "n_images": int(x.shape[0])})
        except OSError as exc:
            log(f"could not cache the attacks in {str(path)!r}: {exc}")
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options that differ from their defaults)."""
    parts = ["libnet", "evaluate-detectors"]
    if args.quick:
        parts.append("--quick")
    if args.thresholds != DEFAULT_THRESHOLDS:
        parts += ["--thresholds", args.thresholds]
    if args.detectors:
        parts += ["--detectors", *(repr(d) if " " in d else d for d in args.detectors)]
    if args.epsilons:
        parts += ["--epsilons", *(f"{e:g}" for e in args.epsilons)]
    for flag, value, default in (("--n-attack", args.n_attack, None), ("--fpr", args.fpr, 0.05),
                                 ("--seed", args.seed, 0), ("--cache-dir", args.cache_dir, ".cache"),
                                 ("--out", args.out, os.path.join("runs", "detectors"))):
        if value != default:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    """Run the MNIST default comparison (see the module docstring)."""
    from ..data import load_digits_upscaled, load_mnist_default
    from ..models import MnistNet, load_state_dict_checked
    from .mnist import LAYERS, STANDARD_EPSILONS

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    quick = bool(args.quick)
    n_train, epochs, nb_iter = (600, 1, 10) if quick else (4000, 5, 40)
    n_attack = args.n_attack if args.n_attack is not None else (48 if quick else 500)
    epsilons = list(args.epsilons) if args.epsilons else ([0.1, 0.3] if quick else list(STANDARD_EPSILONS))
    if n_attack < 1 or any(not (0 < e <= 1) for e in epsilons):
        raise ExperimentError(f"--n-attack must be >= 1 and --epsilons in (0, 1], got {n_attack}, {epsilons}")
    thresholds, auto = _parse_thresholds(args.thresholds, LAYERS)
    out_dir = ensure_writable_dir(args.out)
    timer = StageTimer(log)
    torch.manual_seed(args.seed)
    with timer.stage("data"):
        x_tr, y_tr, x_te, y_te = load_mnist_default(seed=args.seed, n_train=n_train, cache_dir=args.cache_dir)
        if quick:
            x_te, y_te = x_te[:200], y_te[:200]
        half = x_te.shape[0] // 2
        x_cal, x_eval, y_eval = x_te[:half], x_te[half:], y_te[half:]
    with timer.stage("model"):
        net_norm, model_info = _mnist_model(x_tr, y_tr, args.seed, epochs, args.cache_dir, args.progress, log)
        model = load_state_dict_checked(MnistNet(normalize=True), net_norm.state_dict()).eval()
        accuracy = float((model(x_eval).argmax(1) == y_eval).float().mean())
    attacked: dict[str, Tensor] = {}
    attack_info: dict[str, Any] = {}
    with timer.stage("attacks"):
        xa, ya = x_eval[:n_attack], y_eval[:n_attack]
        adv = _cached_attacks(model, xa, ya, epsilons, nb_iter, args.seed, args.cache_dir, bool(args.progress), log)
        for eps in epsilons:
            x_adv, source = adv[eps]
            with torch.no_grad():
                keep = (model(xa).argmax(1) == ya) & (model(x_adv).argmax(1) != ya)
            name = f"PGD eps={eps:g}"
            attacked[name] = x_adv[keep]
            attack_info[name] = {"attacked": int(xa.shape[0]), "successful": int(keep.sum()), "nb_iter": nb_iter,
                                 "source": source}
            log(f"{name}: {int(keep.sum())} successful attacks of {xa.shape[0]} ({source})")
    g = torch.Generator().manual_seed(args.seed)
    n_ood = 100 if quick else 500
    ood = {"digits 8x8 upscaled": load_digits_upscaled()[:n_ood],
           "uniform noise": torch.rand(n_ood, 1, 28, 28, generator=g)}
    with timer.stage("library network"):
        net = LibraryNetwork(model, list(LAYERS), thresholds=thresholds, auto_thresholds=auto).fit(
            x_tr, progress=args.progress)
    specs = registered_detectors(net.plugin_manager)
    # the MNIST-specific variants: the convolution layers, where the evidence sits at large epsilon
    specs.update({label: (name, dict(settings)) for label, (name, settings) in MNIST_VARIANTS.items()})
    if args.detectors:
        chosen = {}
        for want in args.detectors:
            hits = {l: s for l, s in specs.items() if l == want or s[0] == want}
            if not hits:
                raise ExperimentError(f"--detectors: no registered detector has the label or name {want!r}; "
                                      f"labels: {sorted(specs)}")
            chosen.update(hits)
        specs = chosen
    with timer.stage("detectors"):
        res = evaluate_detectors(net, (x_tr, y_tr), x_eval, attacked, ood, detectors=specs, calibration=x_cal,
                                 out_dir=out_dir, fpr=args.fpr, log=log)
    command = _command(args)
    res["run"] = {"command": command, "quick": quick, "seed": args.seed, "n_train": n_train, "epochs": epochs,
                  "model_accuracy_eval_half": accuracy, "model": model_info, "attacks": attack_info,
                  "thresholds_spec": args.thresholds, "auto_thresholds": getattr(net, "auto_thresholds_report_", None),
                  "timings_s": timer.as_dict(), "environment": environment_info()}
    s = res["settings"]
    note = (f"Command: `{command}`. Calibration: {s['n_calibration']} clean images at FPR {s['fpr']:g}; held-out "
            f"clean images: {s['n_clean']}; model accuracy on them {accuracy:.3f}. Library sizes: {s['library_sizes']} "
            f"({s['n_train']} training images). Model forward: {res['forward_ms_per_1000']:.1f} ms per 1,000 inputs "
            f"(batch {s['batch_size']}). Successful attacks: "
            + ", ".join(f"{k} {v['successful']}/{v['attacked']}" for k, v in attack_info.items()) + ".")
    write_text_atomic(out_dir / "detectors.md", res["table_markdown"] + "\n\n" + note + "\n")
    write_json_atomic(out_dir / "detectors.json", res)
    print(res["table_markdown"])
    print("\n" + note)
    print(f"best library-based detector: {res['best_library_based']}; files in {out_dir}")
    return 0
