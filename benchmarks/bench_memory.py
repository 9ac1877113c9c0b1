"""Peak memory of fitting: peak resident set size (the ``getrusage`` counter) of a fresh process.

tracemalloc cannot see tensor memory (torch allocates outside Python's allocator), so each measurement
runs in its own interpreter (``python -m benchmarks.bench_memory --child CASE``): it records the peak
RSS once everything is imported and set up, fits, and records the peak again (with glibc's mmap
threshold fixed, see :data:`MALLOC_ENV`). The growth is what fitting needed; it is compared with the
bytes the fitted library holds and with the bytes all N patterns of the layer would take.

Cases:
- ``synthetic``: the synthetic construction set streamed batch by batch (generated on the fly, so the
  set itself never exists in memory) into an :class:`~libnet_plugin.ExactLibrary`.
- ``mnist``: ``LibraryNetwork.fit`` on the MNIST default (set S1), with ``cache_bytes=0`` (two streamed
  passes) and with the default cache (the first pass's HAPs are kept for the Hebbian pass while they
  fit the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["measure", "main", "peak_mb", "MALLOC_ENV"]

_ROOT = Path(__file__).resolve().parent.parent
#: glibc keeps freed large buffers in its heap once its adaptive mmap threshold has grown, so peak RSS
#: would also count memory that is free; a fixed threshold returns every freed buffer of 64 KiB or more
#: to the system and the peak RSS is then the peak of live memory (ignored by other C libraries).
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _peak_mb() -> float:
    """Peak RSS of this process in MiB.

    On Linux ``getrusage``'s ``ru_maxrss`` of a child started by a large parent still reports the
    parent's size at fork, so the same kernel counter is read per address space from
    ``/proc/self/status`` (``VmHWM``); elsewhere ``ru_maxrss`` is used (KiB, bytes on macOS).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


#: the peak RSS of this process in MiB (public for the other memory benchmarks)
peak_mb = _peak_mb


class _GpuPeak:
    """Peak CUDA memory allocated by torch from construction to :meth:`result` (nothing on a CPU)."""

    def __init__(self, device):
        import torch

        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            self.base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)

    def result(self) -> dict[str, float]:
        import torch

        if self.device.type != "cuda":
            return {}
        torch.cuda.synchronize(self.device)
        return {"cuda_peak_growth_mb": (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20}


def _child_synthetic(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from benchmarks.synthetic import SyntheticSpec, synthetic_batches
    from libnet_plugin.library import ExactLibrary

    spec = SyntheticSpec(**args["spec"])
    device = torch.device(args["device"])
    lib = ExactLibrary(spec.theta, device=device)
    batches = synthetic_batches(spec, args["batch_size"])
    first = next(batches)  # warm the allocator and the generator with one batch before the baseline
    lib.partial_fit(first.to(device))
    base, gpu = _peak_mb(), _GpuPeak(device)
    for xb in batches:
        lib.partial_fit(xb.to(device))
    peak = _peak_mb()
    buf = lib._nodes
    sketch = lib._sketch_nodes
    held = buf.numel() * buf.element_size() + (0 if sketch is None else sketch.numel() * sketch.element_size())
    return {"baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base, "nodes": lib.size,
            "library_mb": lib.nodes.numel() * lib.nodes.element_size() / 2**20,
            "library_buffers_mb": held / 2**20,
            "all_patterns_mb": spec.n * spec.dim * 4 / 2**20, "batch_mb": args["batch_size"] * spec.dim * 4 / 2**20,
            **gpu.result()}


def _child_mnist(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    import libnet_plugin as lnp
    from benchmarks.mnist_setup import LAYERS, S1
    from libnet_plugin.experiments.data import load_mnist_default
    from libnet_plugin.experiments.models import MnistNet, load_state_dict_checked
    from libnet_plugin.serialization import load_checked

    device = torch.device(args["device"])
    tensors, _ = load_checked(args["weights"], kind="MnistNet")
    model = load_state_dict_checked(MnistNet(normalize=True), tensors).eval().to(device)
    x_tr, _, _, _ = load_mnist_default(seed=0, n_train=4000, cache_dir=args.get("cache_dir"))
    x_tr = x_tr.to(device)
    kw = {} if args["cache_bytes"] is None else {"cache_bytes": args["cache_bytes"]}
    with torch.no_grad():
        model(x_tr[:256])
    base, gpu = _peak_mb(), _GpuPeak(device)
    net = lnp.LibraryNetwork(model, list(LAYERS), thresholds=S1, device=device, **kw).fit(x_tr, progress=False)
    peak = _peak_mb()
    lib_bytes = sum(l.nodes.numel() * l.nodes.element_size() for l in net.libraries_.values())
    hap_bytes = sum(x_tr.shape[0] * d * 4 for d in net.hap_dims_.values())
    return {"baseline_mb": base, "peak_mb": peak, "growth_mb": peak - base, "sizes": net.library_sizes_,
            "library_mb": lib_bytes / 2**20, "all_patterns_mb": hap_bytes / 2**20,
            "cache_bytes": args["cache_bytes"] if args["cache_bytes"] is not None else "default", **gpu.result()}


_CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"synthetic": _child_synthetic,
                                                                    "mnist": _child_mnist}


def measure(case: str, args: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
    """Run one case in a fresh interpreter and return its JSON answer (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", case, json.dumps(args)]
    try:
        proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **MALLOC_ENV})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(_CHILDREN), required=True)
    parser.add_argument("args", help="the case's settings as JSON")
    ns = parser.parse_args(argv)
    print(json.dumps(_CHILDREN[ns.child](json.loads(ns.args))))


if __name__ == "__main__":
    main()
