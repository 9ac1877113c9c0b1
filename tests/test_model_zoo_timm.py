"""timm's architectures through the whole pipeline: built by name with random weights, nothing downloaded.

Part of the model zoo (tests/test_model_zoo.py has the hand-built and HuggingFace models). timm needs a torchvision
that runs beside the installed torch: it is the ``[timm]`` extra, installed by ``make test-compat`` (the lock's CPU
torch cannot run torchvision's operators), and these tests skip with the reason wherever ``timm`` does not import.
Each model goes through fit, evaluate, calibrate, score, guard and save / load on small inputs, with two of its
stages probed (the names timm's own ``feature_info`` gives), and must leave its weights and mode as they were.
"""

from __future__ import annotations

import pytest
import torch

import libnet_plugin as lnp

#: model name -> the constructor's size settings for small inputs (where the architecture allows them)
MODELS = {
    "resnet18": {},
    "efficientnet_b0": {},
    "mobilenetv3_small_100": {},
    "convnext_atto": {},
    "regnetx_002": {},
    "vit_tiny_patch16_224": {"img_size": 32, "patch_size": 8},
    "swin_tiny_patch4_window7_224": {"img_size": 32, "window_size": 2},
    "levit_128s": {"img_size": 64},
}
SIDE = {"levit_128s": 64}


def _timm():
    try:
        import timm
    except Exception as exc:  # ImportError, or torchvision's operators missing beside a CPU-only torch
        pytest.skip(f"timm does not import here ({type(exc).__name__}: {exc}); `make test-compat` installs it")
    return timm


@pytest.mark.parametrize("name", list(MODELS))
def test_a_timm_model_fits_calibrates_and_guards(name, tmp_path):
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **MODELS[name]).eval()
    layers = [info["module"] for info in model.feature_info][-2:]
    side = SIDE.get(name, 32)
    g = torch.Generator().manual_seed(1)
    train, clean, test = (torch.randn(n, 3, side, side, generator=g) for n in (48, 32, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}

    net = lnp.LibraryNetwork(model, layers, thresholds=0.9, batch_size=16).fit(train)
    assert net.n_train_ == 48 and all(1 <= n <= 48 for n in net.library_sizes_.values())
    report = net.evaluate(test)
    assert set(report) == set(layers) and all(0.0 <= r["top1_agreement"] <= 1.0 for r in report.values())

    det = lnp.ConsistencyDetector(net).calibrate(clean, fpr=0.1)
    scores = det.score(test)
    assert scores.shape == (16,) and not bool(torch.isnan(scores).any())
    out = det.guard()(test[:4])
    with torch.no_grad():
        logits = model(test[:4])
    torch.testing.assert_close(out.output, logits, rtol=1e-4, atol=1e-4)
    assert out.flagged.shape == (4,)

    det.save(tmp_path / "det.lnp")
    back = lnp.ConsistencyDetector.load(tmp_path / "det.lnp", model)
    torch.testing.assert_close(back.score(test), scores, rtol=1e-5, atol=1e-5)
    assert not model.training
    for k, v in model.state_dict().items():  # batch-norm statistics and weights untouched
        assert torch.equal(v, state[k]), k
