"""Files saved before the package layout moved still load and give the same numbers, to float32 rounding.

tests/data/legacy/ was written by tests/data/make_legacy_files.py with the code of main before the move
(a network and one detector per served method, with the scores they gave on fixed inputs). The model's own
float32 forward pass rounds differently on other CPUs and math libraries, so the scores are compared with the
suite's float32 rule (conftest.assert_close_f32), the flags exactly.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from conftest import assert_close_f32
from safetensors.torch import load_file

import libnet_plugin as lnp

DATA = Path(__file__).parent / "data"
LEGACY = DATA / "legacy"
_spec = importlib.util.spec_from_file_location("make_legacy_files", DATA / "make_legacy_files.py")
_maker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_maker)
METHODS, build = _maker.METHODS, _maker.build


@pytest.fixture(scope="module")
def saved():
    model, _, _, _ = build()
    model.load_state_dict(load_file(str(LEGACY / "model.safetensors")))
    inputs = load_file(str(LEGACY / "inputs.safetensors"))
    expected = json.loads((LEGACY / "expected.json").read_text())
    return model, inputs["probe"], expected


def test_old_network_file_loads_with_identical_scores(saved):
    model, probe, expected = saved
    net = lnp.LibraryNetwork.load(LEGACY / "network.safetensors", model)
    scores = net.predict_scores(probe)
    assert sorted(scores) == sorted(expected["network"])
    for layer, values in expected["network"].items():
        assert_close_f32(scores[layer], torch.tensor(values), layer)
    assert_close_f32(net.consistency(probe), torch.tensor(expected["consistency"]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_old_detector_file_loads_with_identical_scores(saved, method):
    model, probe, expected = saved
    det = lnp.ConsistencyDetector.load(LEGACY / f"detector-{method}.safetensors", model)
    want = expected["detectors"][method]
    assert det.method == method
    assert det.threshold_ == want["threshold"]
    score = det.score(probe)
    assert_close_f32(score, torch.tensor(want["score"]))
    assert torch.equal(score > det.threshold_, torch.tensor(want["score"]) > want["threshold"])
