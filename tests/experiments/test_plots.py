"""Tests of libnet_plugin.experiments.plots: every figure is a readable PNG, drawn headless, with the right content."""

from __future__ import annotations

import math

import matplotlib.image
import numpy as np
import pytest
import torch

from libnet_plugin.experiments import plots


@pytest.fixture()
def captured(monkeypatch):
    """Keep the Figure objects the plot functions draw (they are still written to disk)."""
    figures = []
    real_save = plots._save

    def save(fig, path):
        figures.append(fig)
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_save", save)
    return figures


def _png(path):
    img = matplotlib.image.imread(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    return img


SIZES = {"conv1": {0.4: 65, 0.6: 405, 0.8: 2033}, "fc1": {0.5: 0, 0.7: 6, 0.9: 69}}


def test_library_sizes_log_axis_one_line_per_layer(tmp_path, captured):
    path = plots.plot_library_sizes(SIZES, tmp_path / "sizes.png")
    _png(path)
    ax = captured[0].axes[0]
    assert ax.get_yscale() == "log"
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ["conv1", "fc1"]
    assert list(lines[0].get_xdata()) == [0.4, 0.6, 0.8] and list(lines[0].get_ydata()) == [65, 405, 2033]
    assert list(lines[1].get_ydata())[0] == 1  # an empty library is drawn at 1 on the log axis


def test_agreement_three_panels(tmp_path, captured):
    table = {l: [{"theta": t, "top1_agreement": 0.5, "top3_agreement": 0.9, "accuracy": None} for t in sorted(d)]
             for l, d in SIZES.items()}
    _png(plots.plot_agreement(table, tmp_path / "agree.png"))
    axes = captured[0].axes
    assert len(axes) == 3
    assert [a.get_title() for a in axes][:2] == ["top-1 agreement with the model", "model's answer in the top 3"]
    assert list(axes[1].get_lines()[0].get_ydata()) == [0.9, 0.9, 0.9]
    assert all(math.isnan(v) for v in axes[2].get_lines()[0].get_ydata())  # missing accuracy: not drawn


def test_confusion_grid_rows_thetas_columns_layers(tmp_path, captured):
    m = torch.rand(10, 10)
    m.fill_diagonal_(0)
    m[3] = float("nan")  # a class never predicted correctly
    ci = {0.65: {"conv1": m, "conv2": m.numpy(), "fc1": m.tolist()}, 0.75: {"conv1": m, "conv2": m, "fc1": m}}
    _png(plots.plot_confusion_grid(ci, tmp_path / "ci.png", class_names=[str(i) for i in range(10)]))
    heatmaps = [a for a in captured[0].axes if a.get_images()]
    assert len(heatmaps) == 6
    assert heatmaps[0].get_title() == "conv1, θ = 0.65" and heatmaps[5].get_title() == "fc1, θ = 0.75"
    assert [t.get_text() for t in heatmaps[0].get_xticklabels()] == [str(i) for i in range(10)]
    assert np.ma.is_masked(heatmaps[0].get_images()[0].get_array()[3, 0])


def test_confusion_grid_bad_input(tmp_path):
    with pytest.raises(ValueError, match="square"):
        plots.plot_confusion_grid({0.65: {"conv1": torch.zeros(3, 4)}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="class names"):
        plots.plot_confusion_grid({0.65: {"conv1": torch.zeros(3, 3)}}, tmp_path / "x.png", class_names=["a"])
    with pytest.raises(ValueError, match="empty"):
        plots.plot_confusion_grid({}, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cpl_histograms_and_auroc(tmp_path, captured):
    g = torch.Generator().manual_seed(0)
    clean, attacked = torch.rand(50, generator=g) * 0.5 + 0.5, torch.rand(30, generator=g) * 0.5
    _png(plots.plot_cpl_histograms([("paper", clean, attacked), ("standard", clean, attacked[:5])],
                                   tmp_path / "hist.png"))
    hist_axes = captured[0].axes
    assert len(hist_axes) == 2
    assert [t.get_text() for t in hist_axes[1].get_legend().get_texts()] == ["clean (n=50)", "attacked (n=5)"]
    results = {"S1": [{"epsilon": 0.3, "auroc": 0.8}, {"epsilon": 0.1, "auroc": 0.6}],
               "S2": [{"epsilon": 0.1, "auroc": None}, {"epsilon": 0.3, "auroc": 0.7}]}
    _png(plots.plot_auroc_vs_epsilon(results, tmp_path / "auroc.png", epsilon_label="ε (pixels)"))
    ax = captured[1].axes[0]
    s1 = ax.get_lines()[0]
    assert list(s1.get_xdata()) == [0.1, 0.3] and list(s1.get_ydata()) == [0.6, 0.8]  # sorted by epsilon
    assert ax.get_xlabel() == "ε (pixels)"
    assert "chance" in [l.get_label() for l in ax.get_lines()]


def test_exemplars_grid_gray_and_rgb(tmp_path, captured):
    q = torch.rand(2, 1, 28, 28)
    ex = {"conv1": torch.rand(2, 3, 1, 28, 28), "fc1": torch.rand(2, 2, 1, 28, 28)}
    sims = {"conv1": torch.tensor([[0.9, 0.8, 0.7]] * 2), "fc1": torch.tensor([[0.99, 0.5]] * 2)}
    _png(plots.plot_exemplars(q, ex, tmp_path / "ex.png", similarities=sims, query_titles=["a", "b"]))
    axes = captured[0].axes
    assert len(axes) == 2 * (1 + 3 + 2)
    assert axes[1].get_title() == "conv1 0.90" and axes[4].get_title() == "fc1 0.99"
    _png(plots.plot_exemplars(torch.rand(1, 3, 32, 32), {"layer1": torch.rand(1, 2, 3, 32, 32)}, tmp_path / "rgb.png"))
    with pytest.raises(ValueError, match="cover 1 inputs"):
        plots.plot_exemplars(q, {"conv1": torch.rand(1, 3, 1, 28, 28)}, tmp_path / "bad.png")


def test_no_temp_files_and_overwrite(tmp_path):
    p = tmp_path / "sizes.png"
    plots.plot_library_sizes(SIZES, p)
    first = p.read_bytes()
    plots.plot_library_sizes({"conv1": {0.4: 1, 0.5: 2}}, p)
    assert p.read_bytes() != first
    assert [x.name for x in tmp_path.iterdir()] == ["sizes.png"]


def test_evasion_two_panels_lines_per_detector_and_threat_model(tmp_path, captured):
    by_eps = {"0.1": {"non-adaptive": 0.0, "white-box": 0.2, "black-box": None, "strongest": 0.25,
                      "strongest_at_fpr": {"0.05": 0.25, "0.2": 0.1}},
              "0.3": {"non-adaptive": 0.1, "white-box": 0.9, "black-box": 0.3, "strongest": 0.95,
                      "strongest_at_fpr": {"0.05": 0.95, "0.2": 0.6}}}
    dets = {"a": {"attacks": {"by_epsilon": by_eps}}, "b": {"attacks": {"by_epsilon": by_eps}}, "no attacks": {}}
    path = plots.plot_evasion(dets, tmp_path / "evasion.png")
    assert matplotlib.image.imread(path).ndim == 3
    left, right = captured[-1].axes
    assert len(right.lines) == 3  # one per attacked detector, plus the calibrated FPR marker
    assert [list(l.get_ydata()) for l in left.lines[:3]] == [[0.25, 0.95], [0.2, 0.9], [0.0, 0.1]]
    assert list(left.lines[3].get_ydata()) == [0.3]  # black-box only where it ran
    with pytest.raises(ValueError):
        plots.plot_evasion({"no attacks": {}}, tmp_path / "e2.png")


def test_heatmap_writes_values_and_outlines_marked_cells(tmp_path, captured):
    m = [[0.25, None], [1.0, 0.5]]
    _png(plots.plot_heatmap(m, ["a", "b"], ["x", "y"], tmp_path / "h.png", title="t", marks=[(1, 0)]))
    ax = captured[0].axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.25", "0.50", "1.00"]  # the missing cell is blank
    assert len(ax.patches) == 1 and ax.patches[0].get_xy() == (-0.5, 0.5)
    with pytest.raises(ValueError, match="column labels"):
        plots.plot_heatmap(m, ["a", "b"], ["x"], tmp_path / "bad.png", title="t")


def test_score_histogram_marks_the_threshold(tmp_path, captured):
    _png(plots.plot_score_histogram([0.1, 0.2, 0.9, float("inf")], tmp_path / "s.png", threshold=0.5, title="S"))
    ax = captured[0].axes[0]
    assert ax.get_title() == "S (1 not finite)"
    assert "2 above" in ax.get_legend().get_texts()[1].get_text()
