"""Nothing lost on failure, and files that cannot be trusted are refused (fail closed)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import libnet_plugin as lnp
from libnet_plugin.errors import SaveFormatError


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
    det = lnp.ConsistencyDetector(fitted, method="cpl").calibrate(torch.randn(60, 10), fpr=0.1)
    huge = x[:4].clone()
    huge[1] = 3e38  # finite, but CPL's evidence overflows float32 and comes out NaN
    scores = det.score(huge)
    assert math.isinf(float(scores[1])) and bool(det.predict(huge)[1])
    default = lnp.ConsistencyDetector(fitted).calibrate(torch.randn(60, 10), fpr=0.1)
    assert bool(default.predict(huge)[1])  # the default score stays finite there, and flags the row


def test_files_carry_digests_that_name_what_changed(tmp_path, fitted, mlp):
    fitted.save(tmp_path / "net.lnp")
    with safe_open(str(tmp_path / "net.lnp"), "pt") as f:
        name = next(k for k in f.keys() if k.endswith("nodes"))
        nodes = f.get_tensor(name)
    nodes.view(torch.int32)[0, 0] ^= 1  # one flipped bit of one node
    _rewrite(tmp_path / "net.lnp", tensors={name: nodes})
    with pytest.raises(SaveFormatError, match=rf"modified or corrupted.*{name}"):
        lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)


def test_a_detector_file_without_a_fingerprint_does_not_load_onto_a_torch_model(tmp_path, fitted, mlp):
    import json

    det = lnp.ConsistencyDetector(fitted).calibrate(torch.randn(60, 10), fpr=0.1)
    det.save(tmp_path / "det.lnp")
    with safe_open(str(tmp_path / "det.lnp"), "pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["config"])
    cfg["fingerprint"] = None
    meta["config"] = json.dumps(cfg, sort_keys=True)
    _rewrite(tmp_path / "det.lnp", metadata=meta)
    with pytest.raises(SaveFormatError):
        lnp.ConsistencyDetector.load(tmp_path / "det.lnp", mlp)


def test_random_byte_flips_give_a_clear_error_or_identical_scores(tmp_path, fitted, mlp, mlp_data):
    """Property: a corrupted file never loads into different answers (seeded, 150 flips per file kind)."""
    x, _ = mlp_data
    det = lnp.ConsistencyDetector(fitted, method="library-distance").calibrate(torch.randn(60, 10), fpr=0.1)
    det.save(tmp_path / "det.lnp")
    fitted.save(tmp_path / "net.lnp")
    probe = x[:16]
    cases = {"det.lnp": (lambda p: lnp.ConsistencyDetector.load(p, mlp).score(probe), det.score(probe)),
             "net.lnp": (lambda p: lnp.LibraryNetwork.load(p, mlp).predict_scores(probe)["out"],
                         fitted.predict_scores(probe)["out"])}
    rng = torch.Generator().manual_seed(0)
    outcomes = {"error": 0, "identical": 0}
    for name, (load_and_score, want) in cases.items():
        raw = (tmp_path / name).read_bytes()
        header = int.from_bytes(raw[:8], "little") + 8
        for i in range(150):
            data = bytearray(raw)
            # half the flips in the header (lengths, names, dtypes, offsets, JSON settings), half in the data
            hi = header if i % 2 == 0 else len(raw)
            lo = 0 if i % 2 == 0 else header
            pos = int(torch.randint(lo, hi, (1,), generator=rng))
            data[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=rng))
            bad = tmp_path / f"bad-{name}"
            bad.write_bytes(bytes(data))
            try:
                got = load_and_score(bad)
            except (lnp.LibnetError, FileNotFoundError) as exc:
                assert str(exc), "an error must say what is wrong"
                outcomes["error"] += 1
                continue
            assert torch.equal(got, want), f"{name}: a flip at byte {pos} silently changed the scores"
            outcomes["identical"] += 1
    assert outcomes["error"] > 200  # nearly every flip is caught; the rest (e.g. in JSON whitespace) are harmless


def test_a_nan_node_saved_with_a_valid_digest_is_still_refused(tmp_path, fitted, mlp):
    """A file whose digests were recomputed over a NaN node (not a bit flip: a consistent but bad file)."""
    lib = fitted.libraries_["fc1"]
    lib.nodes[0, 0] = float("nan")  # the library's storage, as a buggy writer could leave it
    fitted.save(tmp_path / "net.lnp")
    with pytest.raises(SaveFormatError, match="layer 'fc1' is inconsistent: its library nodes hold NaN"):
        lnp.LibraryNetwork.load(tmp_path / "net.lnp", mlp)
