"""The detector guard on a ``torch.compile``-d model against the guard on the eager model.

A small CNN with random weights (three conv blocks with batch-norm and in-place ReLUs, a linear head; nothing
downloaded) gets a ``library-distance`` detector on three layers, fitted on the eager model. The same
detector's libraries are then put on ``torch.compile(model)`` (the probed forward compiled with the model's
settings) and calibrated again.
Timed in turns, best of ``repeat``, batch ``batch``: the eager model, the compiled model, the guard on
each; the compiled guard's output and scores are checked equal to the eager guard's (1e-5). What
compiling buys is the compiled guard's time against the eager guard's; compile time is reported apart.

    python -m benchmarks.bench_guard_compiled [--backend inductor] [--device cpu] [--batch 256] [--repeat 5]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from benchmarks._util import interleaved_best, resolve_device, sync
from libnet_plugin import ConsistencyDetector, LibraryNetwork


def _cnn(width: int = 32, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    c = 3
    for _ in range(3):
        layers += [nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(width * 16, classes))


def main(device: str = "cpu", *, backend: str = "inductor", batch: int = 256, repeat: int = 5,
         log: Any = print) -> dict[str, Any]:
    dev = resolve_device(device)
    torch.manual_seed(0)
    model = _cnn().to(dev).eval()
    g = torch.Generator().manual_seed(1)
    train, clean = torch.randn(1000, 3, 16, 16, generator=g), torch.randn(300, 3, 16, 16, generator=g)
    x = torch.randn(batch, 3, 16, 16, generator=g).to(dev)
    layers = ["4", "7", "11"]
    eager_det = ConsistencyDetector.from_model(model, train, layers, thresholds=0.9, method="library-distance")
    eager_det.calibrate(clean)
    compiled = torch.compile(model, backend=backend)
    fitted = eager_det.net  # the same libraries on the compiled model (a refit could pick other nodes near theta)
    net = LibraryNetwork(compiled, layers, thresholds=0.9).adopt_fitted(
        fitted.libraries_, fitted.readouts_, n_classes=fitted.n_classes_, n_train=fitted.n_train_,
        input_shape=fitted.input_shape_)
    det = ConsistencyDetector(net, method="library-distance").calibrate(clean)
    eager_guard, compiled_guard = eager_det.guard(), det.guard()
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(x)  # the model's own graph for this shape
    compiled_guard(x)  # the probe's graph for this shape
    sync(dev)
    compile_s = time.perf_counter() - t0
    a, b = eager_guard(x), compiled_guard(x)
    torch.testing.assert_close(b.output, a.output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.score, a.score, rtol=1e-5, atol=1e-5)

    def plain(m: nn.Module):
        def run() -> None:
            with torch.no_grad():
                m(x)
        return run

    best = interleaved_best({"model (eager)": plain(model), "model (compiled)": plain(compiled),
                             "guard (eager)": lambda: eager_guard(x), "guard (compiled)": lambda: compiled_guard(x)},
                            dev, repeat=repeat)
    out = {"backend": backend, "device": str(dev), "batch": batch, "compile_s": compile_s,
           "ms": {k: 1000 * v for k, v in best.items()},
           "guard_speedup": best["guard (eager)"] / best["guard (compiled)"],
           "model_speedup": best["model (eager)"] / best["model (compiled)"]}
    for k, v in out["ms"].items():
        log(f"{k:18s} {v:8.2f} ms per batch of {batch}")
    log(f"compiling: the model {out['model_speedup']:.2f}x, the guard {out['guard_speedup']:.2f}x "
        f"(backend {backend}, {dev}; first calls {compile_s:.1f} s)")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    main(a.device, backend=a.backend, batch=a.batch, repeat=a.repeat)
