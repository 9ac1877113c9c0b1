"""Nothing lost on failure, and files that cannot be trusted are refused (fail closed)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import libnet_plugin as lnp
from libnet_plugin.errors import SaveFormatError


@pytest.fixture
def fitted(mlp, mlp_data):
    x, _ = mlp_data
    return lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)


def test_a_failed_refit_keeps_the_fitted_network(fitted, mlp_data):
    x, _ = mlp_data
    sizes, scores = fitted.library_sizes_, fitted.predict_scores(x[:20])
    bad = torch.randn(50, 3)  # the model takes 10 features
    with pytest.raises(RuntimeError):
        fitted.fit(bad)
    with pytest.raises(ValueError, match="non-finite"):
        fitted.fit(torch.full((50, 10), float("nan")))
    assert fitted.is_fitted and fitted.library_sizes_ == sizes
    assert all(torch.equal(a, fitted.predict_scores(x[:20])[l]) for l, a in scores.items())


def test_a_failed_detector_fit_keeps_the_fitted_and_calibrated_detector(fitted, mlp_data):
    x, y = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="knn").fit((x, y)).calibrate(torch.randn(60, 10), fpr=0.1)
    before = det.score(x[:10])
    with pytest.raises(ValueError):
        det.fit(torch.empty(0, 10))
    assert det.is_calibrated and torch.equal(det.score(x[:10]), before)


def _rewrite(path, *, metadata=None, tensors=None):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(metadata or {})
    data.update(tensors or {})
    save_file(data, str(path), metadata=meta)


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), 1e30])
def test_a_threshold_edited_in_the_file_is_refused(tmp_path, fitted, mlp, threshold):
    import json

    det = lnp.ConsistencyDetector(fitted).calibrate(torch.randn(60, 10), fpr=0.1)
    det.save(tmp_path / "det.lnp")
    with safe_open(str(tmp_path / "det.lnp"), "pt") as f:
        meta = dict(f.metadata())
    key = next(k for k, v in meta.items() if '"calibration"' in v)
    cfg = json.loads(meta[key])
    cfg["calibration"]["threshold"] = threshold
    _rewrite(tmp_path / "det.lnp", metadata={key: json.dumps(cfg)})
    with pytest.raises(SaveFormatError, match="modified or corrupted"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp)


def test_unsorted_calibration_scores_are_refused(tmp_path, fitted, mlp):
    det = lnp.ConsistencyDetector(fitted).calibrate(torch.randn(60, 10), fpr=0.1)
    det.save(tmp_path / "det.lnp")
    flipped = det.calibration_scores_.flip(0).contiguous()
    _rewrite(tmp_path / "det.lnp", tensors={"calibration/scores": flipped})
    with pytest.raises(SaveFormatError, match="modified or corrupted"):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp)


def test_non_finite_scores_are_always_flagged(fitted, mlp_data):
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted).calibrate(torch.randn(60, 10), fpr=0.1)
    huge = x[:4].clone()
    huge[1] = 3e38  # finite, but its activations overflow float32
    scores = det.score(huge)
    assert math.isinf(float(scores[1])) and bool(det.predict(huge)[1])
