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
               "--detectors", "cpl (paper, top_k 20)", "library-margin", "library-distance", "msp", "--no-progress"])
    assert rc == 0
    import json

    res = json.loads((out / "detectors.json").read_text())
    assert set(res["detectors"]) == {"cpl (paper, top_k 20)", "library-margin", "library-margin (conv1, conv2)",
                                     "library-distance", "library-distance (conv1, conv2)", "msp"}
    assert res["detectors"]["library-distance (conv1, conv2)"]["library_based"]
    assert set(res["sets"]) == {"PGD eps=0.1", "PGD eps=0.3", "digits 8x8 upscaled", "uniform noise"}
    assert res["run"]["command"].startswith("libnet evaluate-detectors --quick --detectors")
    assert (out / "roc.png").is_file() and "| detector |" in (out / "detectors.md").read_text()
    assert "best library-based detector" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--fpr", "1.5"], "--fpr must lie in the open interval"),
    (["--detectors", "nope"], "no registered detector has the label or name 'nope'"),
    (["--thresholds", "bogus"], "--thresholds must be one of"),
    (["--epsilons", "2"], "--epsilons in \\(0, 1\\]"),
])
def test_bad_arguments_exit_2_before_any_work(tmp_path, capsys, argv, message):
    import re

    from libnet_plugin import cli

    rc = cli.main(["evaluate-detectors", "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "c"), *argv])
    assert rc == 2 and re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "c").exists()  # no data was read, no model trained
