"""The `libnet evaluate-detectors` command: threshold specs and a quick run."""

from __future__ import annotations

import pytest


def test_threshold_specs_of_the_command():
    from libnet_plugin.experiments.evaluate_detectors import _parse_thresholds
    from libnet_plugin.experiments.report import ExperimentError

    layers = ["conv1", "conv2", "fc1", "fc2"]
    assert _parse_thresholds("S1", layers) == ({"conv1": 0.55, "conv2": 0.70, "fc1": 0.75, "fc2": 0.80}, None)
    assert _parse_thresholds("auto:0.25", layers) == ("auto", {"target": 0.25})
    assert _parse_thresholds("auto:500", layers) == ("auto", {"target": 500})
    assert _parse_thresholds(".6,.7,.8,.9", layers)[0] == {"conv1": 0.6, "conv2": 0.7, "fc1": 0.8, "fc2": 0.9}
    for bad in ("S9", ".6,.7", "auto:lots"):
        with pytest.raises(ExperimentError):
            _parse_thresholds(bad, layers)


def test_evaluate_detectors_command_quick(tmp_path, capsys):
    from libnet_plugin.cli import main

    out = tmp_path / "out"
    rc = main(["evaluate-detectors", "--quick", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--detectors", "cpl (paper, top_k 20)", "library-distance", "msp", "--attacks", "pgd", "fgsm",
               "deepfool", "--ood", "uniform noise", "rotated 90", "--adaptive-n", "4", "--adaptive-steps", "3",
               "--adaptive-detectors", "msp", "cpl (paper, top_k 20)", "--adaptive-kappas", "0", "5",
               "--black-box-queries", "4", "--no-progress"])
    assert rc == 0
    import json

    res = json.loads((out / "detectors.json").read_text())
    assert set(res["detectors"]) == {"cpl (paper, top_k 20)", "library-distance", "library-distance (conv1, conv2)",
                                     "msp"}
    assert res["detectors"]["library-distance (conv1, conv2)"]["library_based"]
    assert set(res["sets"]) == {"PGD eps=0.1", "PGD eps=0.3", "FGSM eps=0.1", "FGSM eps=0.3", "DeepFool",
                                "uniform noise", "rotated 90"}
    assert res["run"]["command"].startswith("libnet evaluate-detectors --quick --detectors")
    assert "--adaptive-steps 3" in res["run"]["command"] and "--ood 'uniform noise'" in res["run"]["command"]
    entry = res["detectors"]["msp"]
    for metric in ("auroc", "tpr_at_fpr", "fpr_at_95tpr", "aupr"):
        assert set(entry[metric]) == set(res["sets"]) and all(0 <= v <= 1 for v in entry[metric].values())
    attacks = entry["attacks"]
    assert attacks["white-box method"] == "score gradient"
    assert res["detectors"]["cpl (paper, top_k 20)"]["attacks"]["white-box method"] == "feature-matching surrogate"
    at3 = attacks["by_epsilon"]["0.3"]
    assert at3["n"] == 4 and at3["black-box"] is not None and attacks["by_epsilon"]["0.1"]["black-box"] is None
    assert at3["strongest"] >= max(at3["non-adaptive"], at3["white-box"], at3["black-box"])
    assert res["adaptive"]["budget"]["steps"] == 3 and res["adaptive"]["budget"]["kappas"] == [0.0, 5.0]
    assert "attacks" not in res["detectors"]["library-distance"]  # not in --adaptive-detectors
    text = (out / "detectors.md").read_text()
    assert "| detector |" in text and "FPR at 95% TPR" in text and "### Evasion" in text and "](evasion.png)" in text
    assert (out / "roc.png").is_file() and (out / "evasion.png").is_file()
    assert res["files"]["evasion_png"] == str(out / "evasion.png")
    assert "best library-based detector" in capsys.readouterr().out


def test_evaluate_detectors_on_an_adversarially_trained_net(tmp_path):
    import json

    from libnet_plugin.cli import main

    out, cache = tmp_path / "out", tmp_path / "cache"
    rc = main(["evaluate-detectors", "--quick", "--out", str(out), "--cache-dir", str(cache), "--detectors", "msp",
               "--attacks", "fgsm", "--ood", "uniform noise", "--no-adaptive", "--adversarial-training", "0.3",
               "--adversarial-steps", "2", "--no-progress"])
    assert rc == 0
    res = json.loads((out / "detectors.json").read_text())
    assert res["run"]["model"]["adversarial_training"] == {"eps": 0.3, "steps": 2, "epochs": 1}
    assert "trained adversarially (2-step PGD at eps 0.3, 1 epoch)" in (out / "detectors.md").read_text()
    weights = sorted(p.name for p in cache.glob("mnistnet-*.safetensors"))
    assert len(weights) == 1 and "-at0.3k2" in weights[0]  # its own cache entry, never the standard net's


@pytest.mark.parametrize("argv, message", [
    (["--fpr", "1.5"], "--fpr must lie in the open interval"),
    (["--detectors", "nope"], "no registered detector has the label or name 'nope'"),
    (["--thresholds", "bogus"], "--thresholds must be one of"),
    (["--epsilons", "2"], "--epsilons in \\(0, 1\\]"),
    (["--ood", "nope"], "unknown --ood sets \\['nope'\\]"),
    (["--adaptive-lambdas", "-1"], "--adaptive-lambdas must be finite numbers >= 0"),
    (["--adaptive-detectors", "nope"], "--adaptive-detectors \\['nope'\\] are not among"),
    (["--adaptive-kappas", "-1"], "--adaptive-kappas must be finite numbers >= 0"),
    (["--adaptive-n", "0"], "--adaptive-n, --adaptive-steps and --adaptive-restarts must be >= 1"),
    (["--adversarial-training", "1.5"], "--adversarial-training must lie in \\[0, 1\\]"),
    (["--adversarial-steps", "0"], "--adversarial-steps and --adversarial-epochs be >= 1"),
])
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, argv, message):
    import re

    from libnet_plugin import cli

    rc = cli.main(["evaluate-detectors", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), *argv])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "c").exists()  # no data was read, no model trained


def test_the_adaptive_options_are_shared_with_reproduce_cifar10():
    """Both commands define the attack-size options once (threat_models.add_budget_arguments): same names,
    types, defaults and help, except the help of --adaptive-detectors, whose meaning differs."""
    import argparse

    from libnet_plugin.experiments import cifar10, evaluate_detectors

    def actions(add):
        parser = argparse.ArgumentParser()
        add(parser)
        return {a.dest: a for a in parser._actions}

    mnist, cifar = actions(evaluate_detectors.add_arguments), actions(cifar10.add_arguments)
    shared = ["adaptive_n", "adaptive_steps", "adaptive_restarts", "adaptive_lambdas", "adaptive_kappas",
              "black_box_queries"]
    for dest in shared:
        a, b = mnist[dest], cifar[dest]
        assert (a.option_strings, a.type, a.default, a.nargs, a.metavar, a.help) == \
               (b.option_strings, b.type, b.default, b.nargs, b.metavar, b.help)
    assert mnist["adaptive_detectors"].help.startswith("attack only these detectors")
    assert "default: none" in cifar["adaptive_detectors"].help
    assert "adaptive" in mnist and "adaptive" not in cifar  # --adaptive / --no-adaptive is the MNIST command's


def test_layers_named_by_class_gaussians_are_probed_too():
    # a candidate whose class Gaussians read "conv2:input" needs that layer probed even when no other detector of
    # the run names it (before, only ``layers`` were collected and the run failed with LayerNotFoundError)
    from libnet_plugin.detectors import MNIST_CANDIDATES
    from libnet_plugin.experiments.evaluate_detectors import _extra_layers

    label = "library-gaussian-fusion (conv1, conv2; gauss conv1, conv2:input; vim; tail)"
    assert _extra_layers({label: MNIST_CANDIDATES[label]}) == ["conv2:input"]
    assert _extra_layers({"msp": ("msp", {})}) == []
    both = {"a": ("library-fusion", {"layers": ["conv1", "fc1:input"]}),
            "b": ("library-gaussian-fusion", {"layers": ["fc1:input"], "gaussian_layers": ["conv2:input"]})}
    assert _extra_layers(both) == ["fc1:input", "conv2:input"]
