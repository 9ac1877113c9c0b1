"""The whole ``LibraryNetwork.fit`` against one forward pass over the same data, one pass vs streamed.

A ResNet-18-style net written here in plain torch (basic blocks [2, 2, 2, 2], random weights, nothing
downloaded; timm is not needed), ``n`` random inputs of ``px`` x ``px`` pixels, layers layer2, layer3 and
layer4, ``thresholds="auto"`` (or a fixed theta with ``--theta``). Timed in turns, best of ``repeat``:

- ``forward``: the model over the data in batches of ``batch`` (no hooks, ``torch.no_grad``);
- ``fit_one_pass``: the fit with the default ``cache_bytes="auto"``: the HAPs of the three layers are kept and
  the model runs once (``n_forward_passes_ == 1``);
- ``fit_streamed``: the fit with ``cache_bytes=0``: two passes streamed, the auto-threshold sample (half the
  inputs, for both fits) taken from the first half of the first pass.

Each fit's time inside the model (forward hooks on the top module, so with the probe's hooks) is reported
apart, and the fit against one of its own forward passes (its model time over its pass count, from the same
turn: steadier than the ratio to ``forward`` when the load changes between turns). With a fixed theta the two
fits' libraries are checked equal (node indices) before any number is printed (with ``"auto"`` their samples,
hence their thetas, differ). Ratios come from one run.

    python -m benchmarks.bench_fit_passes [--n 256] [--px 96] [--batch 64] [--repeat 2] [--threads N]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from torch import nn

from benchmarks._util import load_average, machine_info, resolve_device, sync
from libnet_plugin import LibraryNetwork

__all__ = ["resnet18_like", "run"]

LAYERS = ["layer2", "layer3", "layer4"]


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18Like(nn.Module):
    """torchvision's ResNet-18 layout: a 7x7 stem, max-pool, four stages of two basic blocks, a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        widths, cin = [64, 128, 256, 512], 64
        for i, w in enumerate(widths):
            setattr(self, f"layer{i + 1}", nn.Sequential(_Block(cin, w, 1 if i == 0 else 2), _Block(w, w, 1)))
            cin = w
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


def resnet18_like(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet18Like(classes).eval()


class _ModelClock:
    """Seconds spent inside ``model``'s forward (pre-hook and hook on the top module)."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.seconds, self.device, self._t0 = 0.0, device, 0.0
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_):
        sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *_):
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0

    def remove(self):
        for h in self.handles:
            h.remove()


def run(device: str = "cpu", *, n: int = 256, px: int = 96, batch: int = 64, repeat: int = 2,
        theta: float | None = None, log: Any = print) -> dict[str, Any]:
    dev = resolve_device(device)
    machine = {**machine_info(dev), "threads": torch.get_num_threads()}  # the load average at the start
    model = resnet18_like().to(dev)
    x = torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(1)).to(dev)
    thresholds: Any = "auto" if theta is None else float(theta)
    auto = {"sample_size": max(1, n // 2)} if theta is None else None
    got: dict[str, Any] = {}

    def forward():
        with torch.no_grad():
            for i in range(0, n, batch):
                model(x[i:i + batch])

    def fit(name: str, **kw: Any):
        def go():
            clock = _ModelClock(model, dev)
            try:
                got[name] = LibraryNetwork(model, LAYERS, thresholds=thresholds, auto_thresholds=auto,
                                           batch_size=batch, device=dev, **kw).fit(x, progress=False)
            finally:
                clock.remove()
            got[name + "_model_s"] = clock.seconds
        return go

    fns = {"forward": forward, "fit_one_pass": fit("fit_one_pass"), "fit_streamed": fit("fit_streamed", cache_bytes=0)}
    forward()  # a warm-up of the kernels; the fits warm up in their first turn
    model_s: dict[str, float] = {}
    best = {k: float("inf") for k in fns}
    for _ in range(int(repeat)):  # turns A B C A B C ...; the model time is kept from each fit's best turn
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(dev)
            t = time.perf_counter() - t0
            if t < best[k]:
                best[k] = t
                if k != "forward":
                    model_s[k] = got[k + "_model_s"]
    one, streamed = got["fit_one_pass"], got["fit_streamed"]
    for l in LAYERS if theta is not None else []:
        if not torch.equal(one.libraries_[l].node_indices, streamed.libraries_[l].node_indices):
            raise AssertionError(f"layer {l!r}: the one-pass and streamed fits stored different nodes")
    passes = {"fit_one_pass": one.n_forward_passes_, "fit_streamed": streamed.n_forward_passes_}
    out = {"machine": machine,
           "setting": {"n": n, "px": px, "batch": batch, "layers": LAYERS, "thresholds": thresholds,
                       "hap_mb": round(n * sum(one.hap_dims_.values()) * 4 / 2**20, 1),
                       "library_sizes": one.library_sizes_, "thetas": one.thresholds_},
           "seconds": {k: round(v, 3) for k, v in best.items()},
           "model_seconds": {k: round(v, 3) for k, v in model_s.items()},
           "passes": passes,
           "ratio_to_forward": {k: round(best[k] / best["forward"], 2) for k in ("fit_one_pass", "fit_streamed")},
           # steadier under load: the fit against one of its own (probed) forward passes, from the same turn
           "ratio_to_own_pass": {k: round(best[k] / (model_s[k] / max(passes[k], 1)), 2)
                                 for k in ("fit_one_pass", "fit_streamed")},
           "load_average_at_end": load_average()}
    f = best["forward"]
    log(f"[fit passes] ResNet-18-style, {n} x {px}px, batch {batch}, {LAYERS}, thresholds={thresholds!r}, "
        f"{torch.get_num_threads()} threads, HAPs {out['setting']['hap_mb']} MB, sizes {one.library_sizes_}")
    log(f"  forward over the data {f:.2f} s")
    for k in ("fit_one_pass", "fit_streamed"):
        log(f"  {k}: {best[k]:.2f} s = {best[k] / f:.2f}x the forward ({out['passes'][k]} forward pass(es); "
            f"{model_s[k]:.2f} s in the model, {best[k] - model_s[k]:.2f} s elsewhere; "
            f"{out['ratio_to_own_pass'][k]:.2f}x one of its own forward passes)")
    log(f"  load average at start {out['machine']['load_average_at_start']}, at end {out['load_average_at_end']}")
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--px", type=int, default=96)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--theta", type=float, default=None, help="a fixed theta instead of thresholds='auto'")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run(a.device, n=a.n, px=a.px, batch=a.batch, repeat=a.repeat, theta=a.theta)
