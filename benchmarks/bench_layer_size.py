"""Peak memory and time of fitting and scoring one library against the layer's width (10k to 1M values per input).

Each configuration runs in a fresh interpreter (``python -m benchmarks.bench_layer_size --child JSON``, with
glibc's mmap threshold fixed, :data:`benchmarks.bench_memory.MALLOC_ENV`) and reads the peak resident set
size (Linux ``VmHWM``, the counter behind ``getrusage``'s ``ru_maxrss``): once everything is set up, after
fitting, and after scoring (the peak is reset in between through ``/proc/self/clear_refs`` where the kernel
allows it; otherwise the scoring peak is the overall peak). tracemalloc cannot see torch's tensors.

The data: ``n`` synthetic inputs of width D (2,000 by default) from ``clusters`` centres (rolls of one random
vector, so no centre matrix is held) plus Gaussian noise, generated batch by batch from per-batch seeds (the
set itself never exists; a batch of 64 rows of 1M floats is 256 MB). The fit is what
``LibraryNetwork.fit`` does with ``cache_bytes=0`` without a model: pass 1 feeds the batches to the
library, pass 2 accumulates the Hebbian readout from ``similarity``; scoring is Eq. 3 (``top_k`` 8) for
256 further inputs. Libraries:

- ``exact``: :class:`~libnet_plugin.ExactLibrary` on the whole vector;
- ``sparse``: 1,024 sampled units; ``projected-gaussian`` / ``projected-hashing``: 1,024 components;
- ``pooled``: an exact library on the channel means of a ``[256 channels, D / 256 positions]`` map (what
  probing a pooling layer, or the detectors' ``pool`` option, gives).

    python -m benchmarks.bench_layer_size [--widths 10240 102400 1048576] [--n 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_memory import MALLOC_ENV, peak_mb

__all__ = ["KINDS", "WIDTHS", "measure", "run", "render", "main", "reset_peak"]

_ROOT = Path(__file__).resolve().parent.parent
#: widths of the study: 40, 400 and 4,096 positions of 256 channels (a ResNet-50 stage at 224 px holds
#: 256 x 56 x 56 = 802,816 values)
WIDTHS = (10_240, 102_400, 1_048_576)
KINDS = ("exact", "sparse", "projected-gaussian", "projected-hashing", "pooled")
CHANNELS = 256
#: a dense Gaussian map of [D, 1024] float32 needs 4 GiB at D = 1M and D x 1024 multiply-adds per input:
#: beyond this width it is left out (the table says why)
GAUSSIAN_MAX_WIDTH = 200_000


def reset_peak() -> bool:
    """Reset this process's peak RSS (Linux ``clear_refs`` 5); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _batches(width: int, n: int, batch: int, seed: int, clusters: int, noise: float):
    import torch

    base = torch.randn(width, generator=torch.Generator().manual_seed(0))  # the same centres for every seed
    base /= base.norm()
    for j, start in enumerate(range(0, n, batch)):
        b = min(batch, n - start)
        g = torch.Generator().manual_seed(seed * 1_000_003 + j + 1)
        labels = torch.randint(0, clusters, (b,), generator=g)
        x = torch.randn(b, width, generator=g).mul_(noise / width ** 0.5)
        for i, c in enumerate(labels.tolist()):
            x[i] += base.roll(c * 7919)
        yield x, labels


def _library(kind: str, theta: float, width: int):

    from libnet_plugin.library import ExactLibrary
    from libnet_plugin.sparse import ProjectedLibrary, SparseLibrary

    if kind == "exact":
        return ExactLibrary(theta), None
    if kind == "sparse":
        return SparseLibrary(theta, n_units=1024, seed=0), None
    if kind.startswith("projected-"):
        return ProjectedLibrary(theta, n_components=1024, seed=0, method=kind.split("-")[1]), None
    if kind == "pooled":
        return ExactLibrary(theta), lambda x: x.reshape(x.shape[0], CHANNELS, -1).mean(dim=2)
    raise ValueError(f"unknown kind {kind!r}; one of {KINDS}")


def _held_mb(lib: Any) -> float:
    """Bytes the library keeps: its nodes, and its sampled units or projection map."""
    total = lib.nodes.numel() * lib.nodes.element_size()
    units = getattr(lib, "units", None)
    if units is not None:
        total += units.numel() * units.element_size()
    proj = getattr(lib, "projection", None) if getattr(lib, "method", "") == "gaussian" else None
    if proj is not None:
        total += proj.numel() * proj.element_size()
    elif getattr(lib, "method", "") == "hashing" and lib.dim:
        total += lib.dim * (8 + 4)  # bucket (int64) and sign (float32) per unit
    return total / 2**20


def _child(args: dict[str, Any]) -> dict[str, Any]:
    import torch

    from libnet_plugin.readout import HebbianReadout

    torch.set_num_threads(int(args.get("threads", 1)))
    width, n, batch, kind = int(args["width"]), int(args["n"]), int(args["batch"]), args["kind"]
    data = dict(clusters=int(args["clusters"]), noise=float(args["noise"]))
    # warm torch and the generator with one row before the baseline; the library's own set-up (units,
    # projection map) comes after it, so that the growth counts it
    warm = next(_batches(width, 1, 1, 99, **data))[0]
    (warm[:, :256] @ warm[:, :256].T).sum()
    del warm
    base = peak_mb()
    lib, pool = _library(kind, float(args["theta"]), width)
    feed = (lambda x: pool(x)) if pool else (lambda x: x)
    t0 = time.perf_counter()
    for x, _ in _batches(width, n, batch, 0, **data):
        lib.partial_fit(feed(x))
    t_lib = time.perf_counter() - t0
    readout = HebbianReadout(int(data["clusters"]))
    readout.reset(lib.size)
    for x, labels in _batches(width, n, batch, 0, **data):  # the "model's answers": the cluster of each row
        readout.accumulate(lib.similarity(feed(x)), labels)
    t_fit = time.perf_counter() - t0
    fit_peak = peak_mb()
    reset = reset_peak()
    t0 = time.perf_counter()
    agree = 0
    for x, labels in _batches(width, int(args["n_score"]), batch, 1, **data):
        agree += int((readout.scores(lib.similarity(feed(x)), 8).argmax(dim=1) == labels).sum())
    t_score = time.perf_counter() - t0
    score_peak = peak_mb()
    return {"kind": kind, "width": width, "n": n, "batch": batch, "nodes": lib.size,
            "stored_dim": int(lib.nodes.shape[1]), "library_mb": _held_mb(lib), "baseline_mb": base,
            "fit_peak_mb": fit_peak, "fit_growth_mb": fit_peak - base, "score_peak_mb": score_peak,
            "peak_reset": reset, "batch_mb": batch * width * 4 / 2**20, "fit_s": t_fit, "library_s": t_lib,
            "score_s": t_score, "score_inputs": int(args["n_score"]), "agreement": agree / int(args["n_score"])}


def measure(args: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """One configuration in a fresh interpreter; its JSON answer (or ``{"error": ...}``)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_layer_size", "--child", json.dumps(args)]
    try:
        proc = subprocess.run(cmd, cwd=_ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **MALLOC_ENV})
    except subprocess.TimeoutExpired:
        return {**args, "error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return {**args, "error": err[-1] if err else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(widths=WIDTHS, kinds=KINDS, *, n: int = 2000, n_score: int = 256, batch: int = 64, theta: float = 0.6,
        clusters: int = 200, noise: float = 0.75, threads: int = 1, log: Any = print) -> dict[str, Any]:
    """Every (width, kind) in its own process; returns ``{"rows": [...], "settings": {...}}``."""
    rows = []
    for width in widths:
        for kind in kinds:
            if kind == "projected-gaussian" and width > GAUSSIAN_MAX_WIDTH:
                rows.append({"kind": kind, "width": width, "error": f"not run: the map alone is "
                             f"{width * 1024 * 4 / 2**30:.1f} GiB and {width * 1024:.1e} multiply-adds per input"})
                continue
            if kind == "pooled" and width % CHANNELS:
                continue
            row = measure({"kind": kind, "width": width, "n": n, "n_score": n_score, "batch": batch, "theta": theta,
                           "clusters": clusters, "noise": noise, "threads": threads})
            rows.append(row)
            log(f"[layer size] {json.dumps(row)}")
    return {"rows": rows, "settings": {"n": n, "n_score": n_score, "batch": batch, "theta": theta, "clusters": clusters,
                                       "noise": noise, "threads": threads, "top_k": 8}}


def render(result: dict[str, Any]) -> str:
    """A markdown table of :func:`run`'s rows."""
    lines = ["Agreement: share of the scored inputs whose argmax P (top_k 8) is their cluster.", "",
             "| width D | library | nodes | stored dim | library MB | fit peak growth MB | fit peak RSS MB | "
             "score peak RSS MB | fit s | score s | agreement |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['width']:,} | {r['kind']} | {r['error']} |  |  |  |  |  |  |  |  |")
            continue
        lines.append(f"| {r['width']:,} | {r['kind']} | {r['nodes']} | {r['stored_dim']:,} | {r['library_mb']:.1f} | "
                     f"{r['fit_growth_mb']:.0f} | {r['fit_peak_mb']:.0f} | {r['score_peak_mb']:.0f} | "
                     f"{r['fit_s']:.1f} | {r['score_s']:.2f} | {r['agreement']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--widths", type=int, nargs="+", default=list(WIDTHS))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the rows to this file")
    ns = parser.parse_args(argv)
    if ns.child:
        print(json.dumps(_child(json.loads(ns.child))))
        return
    result = run(ns.widths, ns.kinds, n=ns.n, threads=ns.threads)
    print(render(result))
    if ns.json:
        Path(ns.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
