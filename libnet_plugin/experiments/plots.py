"""Figures of the paper's experiments, drawn with matplotlib's Agg canvas (headless, no pyplot state).

Every function takes plain results (dicts, tensors or arrays, as produced by
:mod:`libnet_plugin.experiments.sweep`), draws one figure, writes it as a PNG atomically (an interrupted
run never leaves half a file) and returns the path. Nothing here depends on the data set, so the MNIST and
CIFAR-10 reproductions share them.

* :func:`plot_library_sizes`: library size vs theta per layer, log y-axis (the paper's Fig. 2A / 4A).
* :func:`plot_agreement`: top-1 and top-3 agreement with the model, and accuracy against the labels,
  vs theta per layer (Fig. 2B, 2C).
* :func:`plot_confusion_grid`: confusion-index heatmaps, one row per theta and one column per layer
  (Fig. 3).
* :func:`plot_cpl_histograms`: CPL of clean vs attacked inputs (Fig. 5A).
* :func:`plot_auroc_vs_epsilon`: a detection metric vs epsilon, one line per threshold set (Fig. 5B).
* :func:`plot_exemplars`: for some test inputs, the training inputs behind the top library nodes of
  each layer.
* :func:`plot_heatmap`: a labelled matrix with its values written in the cells (e.g. per class, each
  layer's agreement with the model: the decision's path of ``libnet inspect``).
* :func:`plot_score_histogram`: one histogram of scores, with a decision threshold marked.

Example:
    >>> import tempfile, os
    >>> d = tempfile.mkdtemp()
    >>> p = plot_library_sizes({"fc1": {0.5: 3, 0.6: 10}}, os.path.join(d, "sizes.png"))
    >>> p.name
    'sizes.png'
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.patches
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..serialization import atomic_write_bytes

__all__ = [
    "plot_library_sizes",
    "plot_agreement",
    "plot_confusion_grid",
    "plot_cpl_histograms",
    "plot_auroc_vs_epsilon",
    "plot_exemplars",
    "plot_heatmap",
    "plot_score_histogram",
]

_DPI = 110


def _np(x: Any) -> np.ndarray:
    """A numpy copy of a tensor, array or nested list."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # headless raster canvas, independent of pyplot's global backend
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return atomic_write_bytes(path, buf.getvalue())


def _check_nonempty(obj: Mapping[str, Any], what: str) -> None:
    if not obj:
        raise ValueError(f"{what} is empty: nothing to plot")


def plot_library_sizes(sizes: Mapping[str, Mapping[float, int]], path: str | os.PathLike, *,
                       title: str | None = None) -> Path:
    """Library size vs threshold, one line per layer, log y-axis (Fig. 2A).

    Args:
        sizes: ``{layer: {theta: size}}`` (e.g. :meth:`LibrarySweep.sizes`).
        path: PNG file to write.
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Example:
        >>> plot_library_sizes({"conv1": {0.4: 65, 0.8: 2033}}, "sizes.png")  # doctest: +SKIP
    """
    _check_nonempty(sizes, "sizes")
    fig = _new_figure(5.2, 3.8)
    ax = fig.add_subplot()
    for layer, by_theta in sizes.items():
        thetas = sorted(by_theta)
        ax.plot(thetas, [max(by_theta[t], 1) for t in thetas], marker="o", label=layer)
    ax.set_yscale("log")
    ax.set_xlabel("threshold θ")
    ax.set_ylabel("library size (nodes)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="layer")
    ax.set_title(title or "Library size vs threshold")
    return _save(fig, path)


_AGREEMENT_PANELS = (("top1_agreement", "top-1 agreement with the model"),
                     ("top3_agreement", "model's answer in the top 3"),
                     ("accuracy", "top-1 accuracy vs true labels"))


def plot_agreement(table: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                   top_k: int = 3, title: str | None = None) -> Path:
    """Top-1 agreement (Fig. 2B), top-3 agreement (Fig. 2C) and accuracy vs threshold, per layer.

    Args:
        table: ``{layer: [{"theta", "top1_agreement", "top3_agreement", "accuracy"}, ...]}`` as returned
            by :func:`libnet_plugin.experiments.sweep.agreement_table`.
        path: PNG file to write.
        top_k: library nodes per prediction (shown in the title).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_nonempty(table, "table")
    fig = _new_figure(13, 3.8)
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (key, label) in zip(axes, _AGREEMENT_PANELS):
        for layer, rows in table.items():
            rows = sorted(rows, key=lambda r: r["theta"])
            vals = [np.nan if r.get(key) is None else float(r[key]) for r in rows]
            ax.plot([r["theta"] for r in rows], vals, marker="o", label=layer)
        ax.set_title(label)
        ax.set_xlabel("threshold θ")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("fraction of test inputs")
    axes[0].legend(title="layer")
    fig.suptitle(title or f"Per-layer predictions (top_k = {top_k} library nodes)")
    return _save(fig, path)


def plot_confusion_grid(ci: Mapping[float, Mapping[str, Any]], path: str | os.PathLike, *,
                        class_names: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Confusion-index heatmaps: one row per threshold, one column per layer (Fig. 3).

    Args:
        ci: ``{theta: {layer: [C, C] matrix}}``; row = true class d1, column = d2; NaN cells (classes
            never predicted correctly) are left blank.
        path: PNG file to write.
        class_names: tick labels (default ``0 .. C-1``).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_nonempty(ci, "ci")
    thetas = list(ci)
    layers = list(next(iter(ci.values())))
    if not layers:
        raise ValueError("ci has no layers: nothing to plot")
    fig = _new_figure(3.6 * len(layers), 3.2 * len(thetas))
    axes = np.atleast_2d(fig.subplots(len(thetas), len(layers), squeeze=False))
    for i, theta in enumerate(thetas):
        for j, layer in enumerate(layers):
            ax = axes[i, j]
            m = _np(ci[theta][layer])
            if m.ndim != 2 or m.shape[0] != m.shape[1]:
                raise ValueError(f"confusion index of layer {layer!r} at theta {theta} must be square, got {m.shape}")
            names = list(class_names) if class_names is not None else [str(c) for c in range(m.shape[0])]
            if len(names) != m.shape[0]:
                raise ValueError(f"{len(names)} class names for a {m.shape[0]}-class confusion index")
            finite = m[np.isfinite(m)]
            vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
            im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=0.0, vmax=vmax)
            ax.set_xticks(range(len(names)), names, fontsize=7)
            ax.set_yticks(range(len(names)), names, fontsize=7)
            ax.set_title(f"{layer}, θ = {theta:g}", fontsize=10)
            if i == len(thetas) - 1:
                ax.set_xlabel("answer d2")
            if j == 0:
                ax.set_ylabel("true class d1")
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(title or "Confusion index CI(d1, d2) (diagonal shown as 0)")
    return _save(fig, path)


def plot_cpl_histograms(panels: Sequence[tuple[str, Any, Any]], path: str | os.PathLike, *,
                        bins: int = 30, title: str | None = None) -> Path:
    """Histograms of CPL for clean vs attacked inputs, one panel per ``(title, clean, attacked)`` (Fig. 5A).

    Args:
        panels: ``[(panel title, clean CPL values, attacked CPL values), ...]``.
        path: PNG file to write.
        bins: histogram bins over [0, 1].
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    if not panels:
        raise ValueError("panels is empty: nothing to plot")
    fig = _new_figure(5.0 * len(panels), 3.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    edges = np.linspace(0.0, 1.0, bins + 1)
    for ax, (name, clean, attacked) in zip(axes, panels):
        c, a = _np(clean).ravel(), _np(attacked).ravel()
        ax.hist(c, bins=edges, alpha=0.6, label=f"clean (n={c.size})", color="tab:blue")
        ax.hist(a, bins=edges, alpha=0.6, label=f"attacked (n={a.size})", color="tab:red")
        ax.set_xlabel("CPL (consistency of the layers' predictions)")
        ax.set_ylabel("inputs")
        ax.set_title(name, fontsize=10)
        ax.legend()
    fig.suptitle(title or "CPL, clean vs attacked")
    return _save(fig, path)


def plot_auroc_vs_epsilon(results: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike, *,
                          metric: str = "auroc", title: str | None = None, epsilon_label: str = "ε") -> Path:
    """A detection metric vs epsilon, one line per threshold set (Fig. 5B).

    Args:
        results: ``{set name: [{"epsilon", metric: value}, ...]}`` (the ``"results"`` of
            :func:`libnet_plugin.experiments.protocols.evaluate_protocol`).
        path: PNG file to write.
        metric: which value to plot (``"auroc"`` or ``"tpr_at_fpr"``).
        title: figure title.
        epsilon_label: x-axis label (say the unit: normalised or pixel).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_nonempty(results, "results")
    fig = _new_figure(5.6, 3.9)
    ax = fig.add_subplot()
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r["epsilon"])
        vals = [np.nan if r.get(metric) is None else float(r[metric]) for r in rows]
        ax.plot([r["epsilon"] for r in rows], vals, marker="o", label=name)
    if metric == "auroc":
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(epsilon_label)
    ax.set_ylabel(metric.replace("_", " ").upper() if metric == "auroc" else metric.replace("_", " "))
    ax.grid(True, alpha=0.3)
    ax.legend(title="threshold set", fontsize=8)
    ax.set_title(title or f"{metric} vs ε")
    return _save(fig, path)


def _as_image(img: Any) -> tuple[np.ndarray, str | None]:
    """A ``[C, H, W]`` / ``[H, W]`` image as something ``imshow`` draws, with the colour map to use."""
    a = _np(img)
    if a.ndim == 3 and a.shape[0] in (1, 3):
        a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be [C, H, W] or [H, W] with 1 or 3 channels, got shape {a.shape}")
    return np.clip(a, 0.0, 1.0), ("gray" if a.ndim == 2 else None)


def plot_exemplars(queries: Any, exemplars: Mapping[str, Any], path: str | os.PathLike, *,
                   similarities: Mapping[str, Any] | None = None, query_titles: Sequence[str] | None = None,
                   title: str | None = None) -> Path:
    """A grid: each row a test input, then for each layer the training inputs behind its top nodes.

    Args:
        queries: test images ``[B, C, H, W]`` in [0, 1].
        exemplars: ``{layer: images [B, k, C, H, W]}``, most similar node first.
        path: PNG file to write.
        similarities: optional ``{layer: cosines [B, k]}`` printed above each exemplar.
        query_titles: one caption per test input (e.g. ``"label 7, model 7"``).
        title: figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    _check_nonempty(exemplars, "exemplars")
    q = _np(queries)
    b = q.shape[0]
    layers = list(exemplars)
    ks = {l: _np(exemplars[l]).shape[1] for l in layers}
    for l in layers:
        if _np(exemplars[l]).shape[0] != b:
            raise ValueError(f"exemplars of layer {l!r} cover {_np(exemplars[l]).shape[0]} inputs, queries {b}")
    n_cols = 1 + sum(ks.values())
    fig = _new_figure(1.05 * n_cols + 0.4, 1.25 * b + 0.6)
    axes = np.atleast_2d(fig.subplots(b, n_cols, squeeze=False))
    for i in range(b):
        img, cmap = _as_image(q[i])
        axes[i, 0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i, 0].set_title(query_titles[i] if query_titles else "test input", fontsize=7)
        col = 1
        for l in layers:
            ex = _np(exemplars[l])
            for j in range(ks[l]):
                img, cmap = _as_image(ex[i, j])
                ax = axes[i, col]
                ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
                cap = l if j == 0 else ""
                if similarities is not None:
                    s = float(_np(similarities[l])[i, j])
                    cap = f"{cap} {s:.2f}" if cap else f"{s:.2f}"
                ax.set_title(cap, fontsize=7)
                col += 1
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    fig.suptitle(title or "Training exemplars behind the most similar library nodes (cosine above each)",
                 fontsize=9)
    return _save(fig, path)



def plot_evasion(detectors: Mapping[str, Mapping[str, Any]], path: str | os.PathLike, *, fpr: float = 0.05) -> Path:
    """Evasion rate of each detector against epsilon per threat model, and against the FPR of the threshold.

    Args:
        detectors: ``{label: {"attacks": {"by_epsilon": {eps: {"non-adaptive", "white-box", "black-box",
            "strongest", "strongest_at_fpr": {fpr: value}}}}}}`` (the ``"detectors"`` of
            :func:`~libnet_plugin.experiments.comparison.evaluate_detectors` with
            :class:`~libnet_plugin.experiments.threat_models.ThreatModels`).
        path: PNG file to write.
        fpr: the calibrated FPR (marked on the right panel).

    Returns:
        ``path`` as a :class:`~pathlib.Path`. Left: evasion against epsilon (solid: the strongest attacker,
        dashed: white-box, dotted: non-adaptive; black-box as crosses). Right: the strongest attacker's
        evasion at the largest epsilon against the FPR of the threshold.
    """
    rows = {label: d["attacks"]["by_epsilon"] for label, d in detectors.items() if d.get("attacks")}
    _check_nonempty(rows, "detectors with attack results")
    fig = _new_figure(11.5, 4.2)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for label, by_eps in rows.items():
        eps = sorted(by_eps, key=float)
        xs = [float(e) for e in eps]
        line, = left.plot(xs, [by_eps[e]["strongest"] for e in eps], marker="o", label=label)
        c = line.get_color()
        left.plot(xs, [by_eps[e]["white-box"] for e in eps], linestyle="--", color=c, linewidth=1)
        left.plot(xs, [by_eps[e]["non-adaptive"] for e in eps], linestyle=":", color=c, linewidth=1)
        bb = [(x, by_eps[e]["black-box"]) for x, e in zip(xs, eps) if by_eps[e].get("black-box") is not None]
        if bb:
            left.plot(*zip(*bb), linestyle="none", marker="x", color=c)
        at = by_eps[eps[-1]]["strongest_at_fpr"]
        fprs = sorted(at, key=float)
        right.plot([float(f) for f in fprs], [at[f] for f in fprs], marker="o", color=c, label=label)
    left.set_xlabel("ε (L-inf, pixels)")
    left.set_ylabel("evasion (misclassified and not flagged)")
    left.set_ylim(-0.02, 1.02)
    left.grid(True, alpha=0.3)
    left.set_title("evasion vs ε: strongest (solid), white-box (--), non-adaptive (:), black-box (x)", fontsize=8)
    left.legend(fontsize=7)
    right.axvline(fpr, color="grey", linestyle="--", linewidth=1)
    right.set_xlabel("FPR of the threshold on clean data")
    right.set_ylabel("evasion of the strongest attacker")
    right.set_ylim(-0.02, 1.02)
    right.grid(True, alpha=0.3)
    right.set_title(f"trade-off at ε = {max(float(e) for r in rows.values() for e in r):g}", fontsize=9)
    return _save(fig, path)


def plot_heatmap(matrix: Any, rows: Sequence[str], columns: Sequence[str], path: str | os.PathLike, *,
                 title: str, xlabel: str = "", ylabel: str = "", marks: Sequence[tuple[int, int]] = (),
                 vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """A matrix as a heatmap with its values in the cells (NaN cells blank), some cells outlined.

    Args:
        matrix: ``[len(rows), len(columns)]`` values (NaN or ``None`` for no value).
        rows / columns: tick labels.
        path: PNG file to write.
        title / xlabel / ylabel: text of the figure.
        marks: ``(row, column)`` cells to outline (e.g. the first layer that agrees with the model).
        vmin / vmax: range of the colour map.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    m = np.array([[np.nan if v is None else float(v) for v in r] for r in _np_rows(matrix)], dtype=float)
    if m.shape != (len(rows), len(columns)):
        raise ValueError(f"a {m.shape} matrix for {len(rows)} row and {len(columns)} column labels")
    fig = _new_figure(1.2 + 0.75 * max(len(columns), 3), 1.0 + 0.38 * max(len(rows), 3))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(m), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=8, rotation=30 if len(columns) > 6 else 0)
    ax.set_yticks(range(len(rows)), [str(r) for r in rows], fontsize=8)
    if len(rows) * len(columns) <= 400:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < vmin + 0.6 * (vmax - vmin) else "black")
    for i, j in marks:
        ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return _save(fig, path)


def _np_rows(matrix: Any) -> list[list[Any]]:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().cpu().tolist()
    return [list(r) for r in (matrix.tolist() if isinstance(matrix, np.ndarray) else matrix)]


def plot_score_histogram(values: Any, path: str | os.PathLike, *, threshold: float | None = None,
                         xlabel: str = "score", title: str | None = None, bins: int = 30,
                         value_range: tuple[float, float] | None = None) -> Path:
    """A histogram of one set of scores, with the decision threshold as a dashed line.

    Args:
        values: the scores (infinite values are counted in the title, not drawn).
        path: PNG file to write.
        threshold: where inputs start to be flagged (``None``: no line).
        xlabel / title: text of the figure.
        bins: histogram bins.
        value_range: the x range of the bins (default: the finite values' range).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    v = _np(values).ravel()
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        raise ValueError("no finite value to plot")
    fig = _new_figure(5.6, 3.4)
    ax = fig.add_subplot()
    ax.hist(finite, bins=bins, range=value_range, color="tab:blue", alpha=0.8, label=f"inputs (n={v.size})")
    if threshold is not None and math.isfinite(threshold):
        above = int((v > threshold).sum())
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:.3g} ({above} above)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("inputs")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    extra = f" ({v.size - finite.size} not finite)" if finite.size < v.size else ""
    ax.set_title((title or "Scores") + extra, fontsize=10)
    return _save(fig, path)
