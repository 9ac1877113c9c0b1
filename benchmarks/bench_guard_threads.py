"""Throughput of the detector guard from 1 and from several threads, against the unguarded model.

The guard of a ``library-distance (conv1, conv2)`` detector on the MNIST net (library thresholds S1) is
called with batches of 256 test images from 1 thread and from ``threads`` threads at once, for a fixed
number of calls each; so is the model alone. Reported: inputs per second and the ratio guarded / model
for the same number of threads, all from one run. On a 2-core machine torch already uses both cores
for one call, so more threads mainly show that concurrent calls are correct and not serialised.

    python -m benchmarks.bench_guard_threads [--threads 4] [--calls 40]
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.mnist_setup import LAYERS, S1, prepare_mnist
from libnet_plugin import ConsistencyDetector, LibraryNetwork


def _throughput(fn: Callable[[torch.Tensor], Any], batch: torch.Tensor, threads: int, calls: int) -> float:
    """Inputs per second of ``threads`` threads each making ``calls`` calls of ``fn(batch)``."""
    fn(batch)  # warm-up
    start = threading.Barrier(threads + 1)

    def work() -> None:
        start.wait()
        for _ in range(calls):
            fn(batch)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in pool:
        t.join()
    return threads * calls * batch.shape[0] / (time.perf_counter() - t0)


def main(device: str = "cpu", *, quick: bool = False, threads: int = 4, calls: int | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    dev = torch.device(device)
    mb = prepare_mnist(dev, quick=quick, log=log)
    net = LibraryNetwork(mb.model, list(LAYERS), thresholds=dict(S1)).fit(mb.x_train)
    det = ConsistencyDetector(net, method="library-distance", settings={"layers": ["conv1", "conv2"]})
    det.calibrate(mb.x_test[:500])
    guard = det.guard()
    batch = mb.x_test[500:756].to(dev)
    calls = calls or (5 if quick else 40)
    rows = {}
    for n in (1, threads):
        with torch.no_grad():
            model_ips = _throughput(mb.model, batch, n, calls)
        guard_ips = _throughput(guard, batch, n, calls)
        rows[n] = {"threads": n, "model_inputs_per_s": model_ips, "guard_inputs_per_s": guard_ips,
                   "guard_over_model": guard_ips / model_ips}
        log(f"[guard threads] {n} thread(s): model {model_ips:,.0f}/s, guard {guard_ips:,.0f}/s "
            f"({guard_ips / model_ips:.2f} of the model)")
    return {"batch": int(batch.shape[0]), "calls_per_thread": calls, "torch_threads": torch.get_num_threads(),
            "rows": list(rows.values())}


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--calls", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    a = parser.parse_args()
    main(a.device, quick=a.quick, threads=a.threads, calls=a.calls)
