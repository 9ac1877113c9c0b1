"""Fit and guard against the model's forward pass on ResNet-style nets of real size (issue 30's targets).

Nets defined here in plain torch (random weights, nothing downloaded): a ResNet-18-style net
(:func:`benchmarks.bench_fit_passes.resnet18_like`, basic blocks, 96 px) and a ResNet-50-style net
(:func:`resnet50_like`: torchvision's ResNet-50 layout, bottleneck blocks [3, 4, 6, 3], 160 px); timm's
``resnet18`` and ``resnet50`` too where timm imports (``--timm``). Layers layer2, layer3, layer4,
``thresholds="auto"``, random inputs. Per net, all from one run, best of ``repeat`` turns taken in turns
(A B C A B C ...) so that load on a shared machine hits them alike:

- ``fit_in_memory / forward``: the whole ``LibraryNetwork.fit`` with the default ``cache_bytes="auto"``
  (the HAPs kept: one forward pass) over one forward pass of the model over the same data (``torch.no_grad``,
  batches of ``batch``);
- ``fit_streamed / forward``: the same with ``cache_bytes=0`` (two forward passes; the auto-threshold
  sample, of half the inputs, taken from the first half of the first pass);
- ``guard / forward``: the default detector's guard (``ConsistencyDetector(net)``, fitted and calibrated
  on the training inputs) on one batch of ``batch`` inputs, over the model on the same batch.

What the guard adds above the forward is split by timers and the profiler: ``hooks`` (the probe's run,
``net.probe.run(x)``, over the plain forward) and ``after_the_model`` (the guard over the probe's run), the
latter by torch op from ``torch.profiler`` over a few guard calls, ops inside the model's forward left out:
shares of ``products`` (matrix products: the library similarities, the detector's feature maps and
precisions), ``reductions`` (norms, sums, top-k, max, softmax) and ``other`` (element-wise work, copies,
checks, the fusion and p-values), and the costliest ops with their input shapes. Each fit is also given
over one of its own forward passes (its time inside the model, probe hooks included, over its pass count,
from the same turn): steadier than the ratio to ``forward`` when the load changes between turns.

    python -m benchmarks.bench_real_models [--nets resnet18,resnet50] [--n 192] [--batch 64] [--repeat 2]
                                           [--threads N] [--timm] [--out FILE.json]

On the 2-core development machine under load, ``--n 128`` keeps the ResNet-50-style run within a few minutes.
``benchmarks/run.py`` calls :func:`main` (section ``real_models``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from benchmarks._util import load_average, machine_info, resolve_device, sync
from benchmarks.bench_fit_passes import resnet18_like
from libnet_plugin import ConsistencyDetector, LibraryNetwork

__all__ = ["resnet50_like", "main", "run_net", "NETS"]

LAYERS = ["layer2", "layer3", "layer4"]


class _Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + self.down(x))


class ResNet50Like(nn.Module):
    """torchvision's ResNet-50 layout: a 7x7 stem, max-pool, four stages of bottleneck blocks [3, 4, 6, 3]
    (widths 64-512, outputs 256-2048 channels), a linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        cin = 64
        for i, (width, blocks) in enumerate(zip([64, 128, 256, 512], [3, 4, 6, 3])):
            stage = [_Bottleneck(cin, width, 1 if i == 0 else 2)]
            cin = width * _Bottleneck.expansion
            stage += [_Bottleneck(cin, width, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.head(x)


def resnet50_like(classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet50Like(classes).eval()


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm  # only with --timm, where it imports

        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, num_classes=10).eval()
    return build


#: ``{name: (builder, pixels)}``
NETS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (resnet18_like, 96), "resnet50": (resnet50_like, 160),
    "timm_resnet18": (_timm("resnet18"), 96), "timm_resnet50": (_timm("resnet50"), 160),
}

#: torch ops counted as products / reductions in the guard's breakdown (the rest is "other")
PRODUCT_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
               "aten::_linalg_eigh", "aten::linalg_solve")
REDUCTION_OPS = ("aten::linalg_vector_norm", "aten::norm", "aten::sum", "aten::mean", "aten::topk", "aten::max",
                 "aten::amax", "aten::min", "aten::amin", "aten::sort", "aten::logsumexp", "aten::_softmax",
                 "aten::softmax", "aten::log_softmax", "aten::_log_softmax", "aten::argmax", "aten::cumsum",
                 "aten::searchsorted", "aten::kthvalue", "aten::median", "aten::prod", "aten::std", "aten::var")


def _best(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int,
          on_best: Callable[[str], None] | None = None) -> dict[str, float]:
    """Best seconds of each function over ``repeat`` turns (A B C A B C ...); ``on_best(k)`` after each new best."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            t = time.perf_counter() - t0
            if t < best[k]:
                best[k] = t
                if on_best is not None:
                    on_best(k)
    return best


class _ModelClock:
    """Seconds inside ``model``'s forward (its pre-hook to its hook), and a profiler range around it."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.seconds, self.device, self._t0, self._range = 0.0, device, 0.0, None
        self.handles = [model.register_forward_pre_hook(self._pre), model.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        sync(self.device)
        self._range = torch.autograd.profiler.record_function("bench.model_forward")
        self._range.__enter__()
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        sync(self.device)
        self.seconds += time.perf_counter() - self._t0
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _guard_breakdown(guard: Callable[[torch.Tensor], Any], model: nn.Module, xb: torch.Tensor,
                     device: torch.device, calls: int = 3) -> dict[str, Any]:
    """The guard's torch ops outside the model's forward, from the profiler (self times over ``calls`` calls):
    each kind's share of that time, and the five costliest (op, input shapes) with their ms per call. The
    profiler slows small ops more than large ones: the shares, not its absolute times, are what to read."""
    from torch.profiler import ProfilerActivity, profile

    clock = _ModelClock(model, device)
    try:
        guard(xb)
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                guard(xb)
    finally:
        clock.remove()
    kinds = {"products": 0.0, "reductions": 0.0, "other": 0.0}
    top: dict[str, float] = {}
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        parent, inside = ev.cpu_parent, False
        while parent is not None and not inside:  # self times: a nested op counts apart from its caller
            inside = parent.name == "bench.model_forward"
            parent = parent.cpu_parent
        if inside:
            continue
        t = ev.self_cpu_time_total / 1e3 / calls
        kinds["products" if ev.name in PRODUCT_OPS else "reductions" if ev.name in REDUCTION_OPS else "other"] += t
        key = f"{ev.name} {ev.input_shapes}"
        top[key] = top.get(key, 0.0) + t
    total = sum(kinds.values()) or 1.0
    return {"shares": {k: round(v / total, 3) for k, v in kinds.items()},
            "costliest_ms_per_call": {k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:5]}}


def run_net(name: str, device: torch.device, *, n: int, batch: int, repeat: int,
            log: Callable[[str], None] = print) -> dict[str, Any]:
    """The fit and guard ratios of one net."""
    build, px = NETS[name]
    model = build().to(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, px, px, generator=g).to(device)
    clean = torch.randn(max(batch, 128), 3, px, px, generator=g).to(device)
    xb = torch.randn(batch, 3, px, px, generator=g).to(device)
    got: dict[str, Any] = {}

    def forward_all() -> None:
        with torch.no_grad():
            for i in range(0, n, batch):
                model(x[i:i + batch])

    # the sample from half the data, so that the streamed fit streams (it holds the batches of its sample)
    auto = {"sample_size": max(1, min(1000, n // 2))}

    def fit(key: str, **kw: Any) -> Callable[[], None]:
        def go() -> None:
            clock = _ModelClock(model, device)
            try:
                got[key] = LibraryNetwork(model, LAYERS, thresholds="auto", auto_thresholds=auto, batch_size=batch,
                                          device=device, **kw).fit(x, progress=False)
            finally:
                clock.remove()
            got[key + "_model_s"] = clock.seconds
        return go

    forward_all()  # warm-up
    t0 = time.perf_counter()
    model_s: dict[str, float] = {}  # the model's seconds in each fit's best turn

    def keep(k: str) -> None:
        if k != "forward":
            model_s[k] = got[k + "_model_s"]

    fit_s = _best({"forward": forward_all, "fit_in_memory": fit("fit_in_memory"),
                   "fit_streamed": fit("fit_streamed", cache_bytes=0)}, device, repeat, keep)
    log(f"[real models] {name}: fits timed in {time.perf_counter() - t0:.0f} s")
    net = got["fit_in_memory"]
    det = ConsistencyDetector(net).fit(x)
    det.calibrate(clean)
    guard = det.guard()

    def model_batch() -> None:
        with torch.no_grad():
            model(xb)

    guard(xb)  # warm-up
    probe = net.probe
    g_s = _best({"forward": model_batch, "probe": lambda: probe.run(xb), "guard": lambda: guard(xb)}, device,
                max(repeat, 3) * 2)
    breakdown = _guard_breakdown(guard, model, xb, device)
    f = fit_s["forward"]
    out = {"net": name, "px": px, "n": n, "batch": batch, "layers": LAYERS, "detector": det.method,
           "auto_thresholds": auto,
           "hap_mb": round(n * sum(net.hap_dims_.values()) * 4 / 2**20, 1), "library_sizes": net.library_sizes_,
           "thetas_in_memory": net.thresholds_, "thetas_streamed": got["fit_streamed"].thresholds_,
           "passes": {"fit_in_memory": net.n_forward_passes_,
                      "fit_streamed": got["fit_streamed"].n_forward_passes_},
           "seconds": {k: round(v, 3) for k, v in {**fit_s, **{f"batch_{k}": v for k, v in g_s.items()}}.items()},
           "fit_model_seconds": {k: round(v, 3) for k, v in model_s.items()},
           "ratios": {"fit_in_memory_over_forward": round(fit_s["fit_in_memory"] / f, 2),
                      "fit_streamed_over_forward": round(fit_s["fit_streamed"] / f, 2),
                      # steadier under load: each fit over one of its own (probed) forward passes, same turn
                      "fit_in_memory_over_own_pass": round(fit_s["fit_in_memory"] / (
                          model_s["fit_in_memory"] / max(net.n_forward_passes_, 1)), 2),
                      "fit_streamed_over_own_pass": round(fit_s["fit_streamed"] / (
                          model_s["fit_streamed"] / max(got["fit_streamed"].n_forward_passes_, 1)), 2),
                      "guard_over_forward": round(g_s["guard"] / g_s["forward"], 3),
                      "probe_over_forward": round(g_s["probe"] / g_s["forward"], 3)},
           "guard_above_forward_s": {"hooks": round(g_s["probe"] - g_s["forward"], 4),
                                     "after_the_model": round(g_s["guard"] - g_s["probe"], 4),
                                     "after_the_model_profile": breakdown}}
    r = out["ratios"]
    log(f"[real models] {name} ({px} px, {n} inputs, batch {batch}, sizes {net.library_sizes_}): "
        f"fit in memory {r['fit_in_memory_over_forward']}x the forward ({out['passes']['fit_in_memory']} pass; "
        f"{r['fit_in_memory_over_own_pass']}x one of its own), streamed {r['fit_streamed_over_forward']}x "
        f"({out['passes']['fit_streamed']} passes; {r['fit_streamed_over_own_pass']}x one of its own); "
        f"guard {r['guard_over_forward']}x the forward at batch {batch} "
        f"(hooks {out['guard_above_forward_s']['hooks'] * 1e3:.1f} ms, after the model "
        f"{out['guard_above_forward_s']['after_the_model'] * 1e3:.1f} ms; forward {g_s['forward'] * 1e3:.1f} ms)")
    log(f"  after the model, shares of the profiled time: {breakdown['shares']}; costliest (ms per call, "
        f"profiled): {breakdown['costliest_ms_per_call']}")
    return out


def main(device: str = "cpu", *, quick: bool = False, nets: list[str] | None = None, n: int | None = None,
         batch: int = 64, repeat: int = 2, timm_nets: bool = False,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every net's ratios, with the machine, thread count and load; ``quick``: fewer inputs, one turn."""
    dev = resolve_device(device)
    names = list(nets or ["resnet18", "resnet50"])
    if timm_nets:
        try:
            import timm  # noqa: F401
            names += ["timm_resnet18", "timm_resnet50"]
        except ImportError:
            log("[real models] timm does not import: its models are left out")
    n = n or (64 if quick else 192)
    repeat = 1 if quick else repeat
    report: dict[str, Any] = {"machine": {**machine_info(dev), "threads": torch.get_num_threads()},
                              "setting": {"n": n, "batch": batch, "repeat": repeat, "thresholds": "auto"},
                              "nets": {}}
    for name in names:
        report["nets"][name] = run_net(name, dev, n=n, batch=batch, repeat=repeat, log=log)
    report["load_average_at_end"] = load_average()
    log(f"[real models] {torch.get_num_threads()} threads; load average at start "
        f"{report['machine']['load_average_at_start']}, at end {report['load_average_at_end']}")
    return report


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--nets", default="resnet18,resnet50")
    p.add_argument("--n", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--timm", action="store_true")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    result = main(a.device, quick=a.quick, nets=a.nets.split(","), n=a.n, batch=a.batch, repeat=a.repeat,
                  timm_nets=a.timm)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1, default=str)
