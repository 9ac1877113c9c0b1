"""The guard never runs the model in training mode, whatever another thread does to ``model.training``."""

from __future__ import annotations

import threading

import torch
from torch import nn

import libnet_plugin as lnp


class Pause(nn.Module):
    """Identity; calls ``during()`` when set: the point of a forward pass where another thread gets its turn."""

    def __init__(self) -> None:
        super().__init__()
        self.during = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.during is not None:
            self.during()
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), Pause(), nn.Linear(16, 16),
                          nn.BatchNorm1d(16), nn.Dropout(0.5), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():  # running statistics far from a batch's own, so training mode would show
        for bn in (model[1], model[5]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.2, 2)
        model[8].weight.mul_(4.0)
        model[8].bias.zero_()
    return model.eval()


def _detector(model):
    g = torch.Generator().manual_seed(1)
    train, clean = torch.randn(100, 6, generator=g), torch.randn(40, 6, generator=g)
    return lnp.ConsistencyDetector.from_model(model, train, ["0", "4", "8"], thresholds=0.7,
                                              method="library-distance").calibrate(clean, fpr=0.1)


def _buffers(model):
    return {k: v.clone() for k, v in model.named_buffers()}


def test_a_thread_switching_to_train_mode_mid_pass_changes_nothing():
    """Deterministic: in the middle of each guarded forward pass another thread calls ``model.train()``."""
    model = _model()
    det = _detector(model)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(2))
    want = det.guard()(x)
    before = _buffers(model)

    def switch():
        t = threading.Thread(target=model.train)
        t.start()
        t.join()

    model[3].during = switch
    try:
        for _ in range(3):
            got = det.guard()(x)
            torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.score, want.score, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.flagged, want.flagged)
            assert model.training  # the other thread's train() held for the model itself
    finally:
        model[3].during = None
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), f"the guard changed the buffer {k}"
    model.eval()
    torch.testing.assert_close(det.guard()(x).score, want.score, rtol=1e-5, atol=1e-5)  # no ModelChangedError


def test_guarded_calls_while_a_thread_toggles_train_and_eval():
    model = _model()
    det = _detector(model)
    guarded = det.guard()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3))
    want = guarded(x)
    before = _buffers(model)
    stop = threading.Event()

    def toggle():
        while not stop.is_set():
            model.train()
            guarded.eval()
            guarded.train()
            model.eval()

    t = threading.Thread(target=toggle)
    t.start()
    try:
        for _ in range(20):
            got = guarded(x)
            torch.testing.assert_close(got.output, want.output, rtol=1e-5, atol=1e-5)
            assert torch.equal(got.flagged, want.flagged)
    finally:
        stop.set()
        t.join(timeout=30)
    for k, v in model.named_buffers():
        assert torch.equal(v, before[k]), f"the guard changed the buffer {k}"
    model.eval()
    torch.testing.assert_close(guarded(x).score, want.score, rtol=1e-5, atol=1e-5)


def test_the_guard_follows_the_model_weights_and_submodules():
    """The view shares the model's tensors (an in-place update is seen, and caught as a change) and is rebuilt
    when a submodule is replaced."""
    model = _model()
    det = _detector(model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(4))
    out = det.guard()(x).output
    torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    model[6] = nn.Identity()  # the dropout replaced: the same tensors, another module tree
    torch.testing.assert_close(det.guard()(x).output, model(x), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        model[8].bias += 1.0
    try:
        det.guard()(x)
    except lnp.LibnetError as exc:
        assert "changed" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("a weight changed in place must be caught")


def test_models_the_view_cannot_cover_run_as_themselves():
    """A module whose forward was replaced on the instance may call the original modules: no view, the model
    itself runs (in eval mode here), with the same outputs as before."""
    model = _model()
    det = _detector(model)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(5))
    assert det.guard().runs_on_eval_view
    want = det.guard()(x).output
    inner = model[3]
    inner.forward = lambda t: t  # e.g. accelerate's hooks
    assert not det.guard().runs_on_eval_view
    torch.testing.assert_close(det.guard()(x).output, want, rtol=1e-5, atol=1e-5)
