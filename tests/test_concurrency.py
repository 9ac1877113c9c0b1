"""Scoring from many threads at once gives exactly the single-thread results (the probe's hooks ignore
other threads' forward passes), and no hook is left on the model."""

from __future__ import annotations

import threading

import torch
from torch import nn

import libnet_plugin as lnp


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_eight_threads_mixed_with_plain_forwards_give_the_single_thread_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    g = torch.Generator().manual_seed(1)
    train, clean = torch.randn(400, 10, generator=g), torch.randn(100, 10, generator=g)
    det = lnp.ConsistencyDetector.from_model(model, train, layers=["0", "2", "4"], thresholds=0.9,
                                             method="library-distance").calibrate(clean, fpr=0.1)
    guard = det.guard()
    batches = [torch.randn(7, 10, generator=g) for _ in range(16)]
    expected = [guard(b) for b in batches]
    plain = [model(b) for b in batches]
    failures: list[str] = []

    def worker(k: int) -> None:
        for i in range(100):
            j = (k * 31 + i) % len(batches)
            try:
                if i % 3 == 2:  # plain forwards of the same model, with no detector involved
                    if not torch.equal(model(batches[j]), plain[j]):
                        failures.append(f"plain forward {k}/{i}")
                    continue
                out = guard(batches[j]) if i % 2 else det.score_and_output(batches[j])
                want = expected[j]
                if not (torch.equal(out.score, want.score) and torch.equal(out.output, want.output)
                        and torch.equal(out.flagged, want.flagged)):
                    failures.append(f"thread {k} call {i}: different results")
            except Exception as exc:
                failures.append(f"thread {k} call {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert _hooks(model) == 0  # every call removed its own hooks; the guard keeps none between calls
