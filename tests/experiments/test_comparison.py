"""The detector comparison (experiments.comparison): format, files, bad input, the calibration check."""

from __future__ import annotations

import pathlib

import pytest
import torch

import libnet_plugin as lnp


def test_evaluate_detectors_format_and_files(tmp_path, fitted, mlp_data):
    from libnet_plugin.experiments.comparison import evaluate_detectors

    x, y = mlp_data
    g = torch.Generator().manual_seed(7)
    clean = torch.randn(200, 10, generator=g)
    attacked = {"shifted": clean[:60] + 3.0}
    ood = {"wide": 6 * torch.randn(50, 10, generator=g)}
    res = evaluate_detectors(fitted, (x, y), clean, attacked, ood, detectors=["cpl", "msp", "knn"], out_dir=tmp_path)
    assert set(res["detectors"]) == {"cpl", "msp", "knn"}
    assert res["settings"]["n_calibration"] == 100 and res["settings"]["n_clean"] == 100
    assert res["sets"] == {"shifted": {"kind": "attack", "n": 60}, "wide": {"kind": "ood", "n": 50}}
    knn = res["detectors"]["knn"]
    assert 0.0 <= knn["auroc"]["shifted"] <= 1.0 and 0.0 <= knn["heldout_fpr"] <= 1.0
    assert knn["memory_bytes"]["kept"] == knn["memory_bytes"]["detector"] > 0
    check = res["detectors"]["msp"]["fpr_check"]
    assert check["n_calibration"] == check["n_heldout"] == 100 and check["n_splits"] == 50
    assert check["min"] <= check["mean"] <= check["max"] and abs(check["mean"] - 0.05) < 0.03
    assert res["detectors"]["cpl"]["library_based"] and res["best_library_based"] == "cpl"
    assert res["detectors"]["cpl"]["memory_bytes"]["kept"] == res["detectors"]["cpl"]["memory_bytes"]["library"]
    assert res["rows"][0]["detector"] == "cpl" and "shifted: AUROC / TPR" in res["rows"][0]
    assert res["table_markdown"].startswith("| detector |")
    for key in ("json", "markdown", "roc_png"):
        assert pathlib.Path(res["files"][key]).is_file()
    labelled = evaluate_detectors(fitted, x, clean, attacked, detectors={"paper": ("cpl", {"top_k": 20})},
                                  calibration=torch.randn(100, 10, generator=g))
    assert list(labelled["detectors"]) == ["paper"] and labelled["settings"]["n_clean"] == 200


def test_auroc_bootstrap_is_sklearn_on_each_resample_and_pairs_detectors():
    import numpy as np

    from libnet_plugin.experiments.protocols import auroc, auroc_bootstrap

    rng = np.random.default_rng(3)
    clean, attacked = rng.normal(size=80).round(1), (rng.normal(size=50) + 1).round(1)  # rounded: ties
    boot = auroc_bootstrap(clean, attacked, n_boot=400, seed=5)
    # each value is scikit-learn's AUROC of one resample: here, the resample with the same draws
    draws = np.random.default_rng(5)
    ic, ia = draws.integers(0, 80, (400, 80)), draws.integers(0, 50, (400, 50))
    assert boot[:3] == pytest.approx([auroc(clean[ic[b]], attacked[ia[b]]) for b in range(3)])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    assert lo < auroc(clean, attacked) < hi and hi - lo > 0.05
    # the same resamples for the same seed and sizes: a detector compared with itself differs by exactly 0,
    # and one that adds a constant to every score (the same ranks) too
    again = auroc_bootstrap(clean + 7.0, attacked + 7.0, n_boot=400, seed=5)
    assert np.array_equal(boot, again)
    assert not np.array_equal(boot, auroc_bootstrap(clean, attacked, n_boot=400, seed=6))
    assert np.isnan(auroc_bootstrap(clean[:0], attacked, n_boot=4)).all()


def test_evaluate_detectors_gives_auroc_intervals_and_margins_to_the_best_baseline(fitted, mlp_data):
    from libnet_plugin.experiments.comparison import evaluate_detectors

    x, y = mlp_data
    g = torch.Generator().manual_seed(8)
    clean = torch.randn(200, 10, generator=g)
    sets = {"shifted": clean[:60] + 1.0, "far": clean[60:120] + 4.0}
    res = evaluate_detectors(fitted, (x, y), clean, sets, detectors=["cpl", "library-distance", "msp", "knn"],
                             n_boot=300)
    for label, d in res["detectors"].items():
        for name in sets:
            lo, hi = d["auroc_ci95"][name]
            assert lo <= d["auroc"][name] <= hi, (label, name)
        assert ("auroc_vs_best_baseline" in d) == d["library_based"]
    for label in ("cpl", "library-distance"):
        for name, m in res["detectors"][label]["auroc_vs_best_baseline"].items():
            best = max(("msp", "knn"), key=lambda b: res["detectors"][b]["auroc"][name])
            assert m["baseline"] == best
            assert m["difference"] == pytest.approx(res["detectors"][label]["auroc"][name]
                                                    - res["detectors"][best]["auroc"][name])
            assert m["ci95"][0] <= m["ci95"][1]
    table = res["metric_tables"]["auroc_vs_best_baseline"]
    assert table.splitlines()[0] == "| detector | shifted | far |" and "| cpl |" in table and "| msp |" not in table
    only_library = evaluate_detectors(fitted, (x, y), clean, sets, detectors=["cpl"], n_boot=50)
    assert "auroc_vs_best_baseline" not in only_library["detectors"]["cpl"]
    assert "auroc_vs_best_baseline" not in only_library["metric_tables"]


def test_the_post_hoc_peers_are_baselines_of_the_comparison(fitted, mlp_data):
    from libnet_plugin.builtins import PEERS
    from libnet_plugin.experiments.comparison import evaluate_detectors
    from libnet_plugin.plugins import registered_detectors

    listed = registered_detectors(lnp.get_plugin_manager(autoload=False))
    assert [listed[p] for p in PEERS] == [(p, {}) for p in PEERS]  # in the default comparison, by name
    x, y = mlp_data
    g = torch.Generator().manual_seed(9)
    clean = torch.randn(120, 10, generator=g)
    sets = {"far": clean[:40] + 4.0}
    res = evaluate_detectors(fitted, (x, y), clean, sets, detectors=["library-distance", *PEERS], n_boot=50,
                             fpr_splits=5)
    for p in PEERS:
        assert not res["detectors"][p]["library_based"] and 0.0 <= res["detectors"][p]["auroc"]["far"] <= 1.0
    m = res["detectors"]["library-distance"]["auroc_vs_best_baseline"]["far"]
    assert m["baseline"] == max(PEERS, key=lambda p: res["detectors"][p]["auroc"]["far"])


def test_evaluate_detectors_bad_input(mlp, fitted, mlp_data):
    from libnet_plugin.experiments.comparison import evaluate_detectors

    x, _ = mlp_data
    with pytest.raises(ValueError, match="needs layers= and thresholds="):
        evaluate_detectors(mlp, x, x[:100], {"a": x[:10]})
    with pytest.raises(ValueError, match="no attacked or out-of-domain set"):
        evaluate_detectors(fitted, x, x[:100], {}, {})
    with pytest.raises(ValueError, match="used twice"):
        evaluate_detectors(fitted, x, x[:100], {"a": x[:10]}, {"a": x[:10]})
    with pytest.raises(ValueError, match="fpr must be"):
        evaluate_detectors(fitted, x, x[:100], {"a": x[:10]}, fpr=1.0)


@pytest.mark.parametrize("method", ["msp", "library-margin"])
def test_calibration_check_averages_to_the_requested_rate(fitted, method):
    from libnet_plugin.experiments.comparison import calibration_check

    clean = torch.randn(1000, 10, generator=torch.Generator().manual_seed(11))
    det = lnp.ConsistencyDetector(fitted, method=method).calibrate(clean[:500], fpr=0.05)
    check = calibration_check(det, clean, 0.05, n_splits=50)
    assert check["n_calibration"] == 500 and check["n_heldout"] == 500
    assert abs(check["mean"] - 0.05) < 0.01 and check["sd"] < 0.02, check  # conformal: slightly below 0.05
