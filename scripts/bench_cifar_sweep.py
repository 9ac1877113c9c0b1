"""A short CIFAR-shaped benchmark of the CIFAR-10 experiment's library work, on CUDA and on the CPU.

For each device it builds the full Table 1 sweep (8 thresholds x 5 blocks of a ResNet44 = 40 libraries
and readouts, two streamed passes, :func:`libnet_plugin.experiments.sweep.fit_library_sweep`) on
``--n-train`` CIFAR-shaped images, then scores ``--n-test`` images at every threshold (top_k 8) and every
CPL set (top_k 20) with :func:`~libnet_plugin.experiments.sweep.compute_evidence`. It prints, per device:
the time of the sweep and of the scoring, each also as a ratio to the model's own forward passes over the
same images on the same device, library sizes and bytes, and peak memory; then the CUDA / CPU speed-up
and whether both devices built the same libraries.

The images are smooth random images (8x8 noise upsampled to 32x32) and the ResNet44 is randomly
initialised with its batch-norm statistics measured on them, so the libraries are far from the sizes a
trained net gives on real CIFAR-10; the numbers are for comparing devices, not for the paper.

Usage (from the repository root)::

    python scripts/bench_cifar_sweep.py                      # cuda (if present) and cpu, 2000 / 500 images
    python scripts/bench_cifar_sweep.py --devices cuda --n-train 20000 --json bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libnet_plugin.experiments.cifar10 import CPL_SETS, LAYERS, THRESHOLD_LEVELS
from libnet_plugin.experiments.models import ResNet44
from libnet_plugin.experiments.sweep import compute_evidence, cpl_requests, fit_library_sweep
from libnet_plugin.plugins import make_probe


def cifar_shaped(n: int, seed: int) -> torch.Tensor:
    """``n`` smooth random images ``[n, 3, 32, 32]``, normalised-like (mean 0, std about 1)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=32, mode="bilinear", align_corners=False)
    return (x - 0.45) / 0.25


def make_model(calibration: torch.Tensor) -> nn.Module:
    """A random ResNet44 (seed 0) whose batch-norm statistics are measured on ``calibration``."""
    torch.manual_seed(0)
    net = ResNet44()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        for i in range(0, calibration.shape[0], 500):
            net(calibration[i:i + 500])
    return net.eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _forward_seconds(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, x.shape[0], batch_size):
        model(x[i:i + batch_size].to(device))
    _sync(device)
    return time.perf_counter() - t0


def bench_device(device: torch.device, model_cpu: nn.Module, x_train: torch.Tensor, x_test: torch.Tensor,
                 batch_size: int) -> dict:
    """Sweep + scoring on one device; returns timings, sizes and memory."""
    model = ResNet44()
    model.load_state_dict(model_cpu.state_dict())
    model = model.to(device).eval()
    _forward_seconds(model, x_train[:batch_size], device, batch_size)  # warm-up (kernels, allocator)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    probe = make_probe(model, list(LAYERS), device)
    _sync(device)
    t0 = time.perf_counter()
    sweep = fit_library_sweep(probe, x_train, {l: list(t) for l, t in THRESHOLD_LEVELS.items()},
                              batch_size=batch_size, device=device, progress=False)
    _sync(device)
    t_sweep = time.perf_counter() - t0
    requests = [(l, t, 8) for l in LAYERS for t in THRESHOLD_LEVELS[l]]
    requests += cpl_requests(CPL_SETS, 20)
    t0 = time.perf_counter()
    compute_evidence(sweep, probe, x_test, requests, batch_size=batch_size, progress=False)
    _sync(device)
    t_score = time.perf_counter() - t0
    passes = 1 if sweep.n_train * sum(sweep.hap_dims.values()) * 4 <= 512 * 2**20 else 2
    t_fwd_train = _forward_seconds(model, x_train, device, batch_size) * passes
    t_fwd_test = _forward_seconds(model, x_test, device, batch_size)
    lib_bytes = {l: sum(lib.size * sweep.hap_dims[l] * 4 for lib in libs.values())
                 for l, libs in sweep.libraries.items()}
    return {
        "device": str(device) if device.type == "cpu" else f"{device} ({torch.cuda.get_device_name(device)})",
        "n_train": int(x_train.shape[0]), "n_test": int(x_test.shape[0]),
        "sweep_s": t_sweep, "sweep_over_forward": t_sweep / t_fwd_train, "forward_passes_in_sweep": passes,
        "score_s": t_score, "score_over_forward": t_score / t_fwd_test,
        "train_images_per_s": x_train.shape[0] / t_sweep,
        "sizes": {l: [sweep.libraries[l][t].size for t in sweep.thresholds[l]] for l in LAYERS},
        "library_mib": {l: b / 2**20 for l, b in lib_bytes.items()},
        "cuda_peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "node_indices": {f"{l}@{t:g}": sweep.libraries[l][t].node_indices.tolist()
                         for l in LAYERS for t in sweep.thresholds[l]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", nargs="+", default=["cuda", "cpu"], help="devices to compare (default cuda cpu)")
    ap.add_argument("--n-train", type=int, default=2000, help="training images for the sweep (default 2000)")
    ap.add_argument("--n-test", type=int, default=500, help="images scored (default 500)")
    ap.add_argument("--scale-n-train", type=int, default=0,
                    help="also run a larger sweep with this many images on CUDA only (0: skip)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = []
    for d in args.devices:
        dev = torch.device(d)
        if dev.type == "cuda" and not torch.cuda.is_available():
            print(f"skipping {d}: no CUDA GPU visible to torch {torch.__version__}")
            continue
        devices.append(dev)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} CPU threads")
    x_train = cifar_shaped(args.n_train, seed=1)
    x_test = cifar_shaped(args.n_test, seed=2)
    model = make_model(x_train[:1000])
    results = []
    for dev in devices:
        r = bench_device(dev, model, x_train, x_test, args.batch_size)
        results.append(r)
        print(f"\n[{r['device']}] {r['n_train']} train / {r['n_test']} test images, 40 libraries")
        print(f"  sweep (fit, {r['forward_passes_in_sweep']} pass(es)): {r['sweep_s']:.2f} s = "
              f"{r['sweep_over_forward']:.1f} x the model's forward passes; {r['train_images_per_s']:.0f} images/s")
        print(f"  scoring (all levels + CPL sets): {r['score_s']:.2f} s = {r['score_over_forward']:.1f} x forward")
        print("  library sizes per level: " + "; ".join(f"{l} {r['sizes'][l]}" for l in LAYERS))
        peak = r["cuda_peak_mib"]
        print(f"  library nodes: {sum(r['library_mib'].values()):.0f} MiB"
              + (f"; peak CUDA memory allocated {peak:.0f} MiB" if peak is not None else ""))
    by_type = {r["device"].split(":")[0].split(" ")[0]: r for r in results}
    if "cuda" in by_type and "cpu" in by_type:
        g, c = by_type["cuda"], by_type["cpu"]
        same = sum(g["node_indices"][k] == c["node_indices"][k] for k in c["node_indices"])
        print(f"\nCUDA vs CPU (same run): sweep {c['sweep_s'] / g['sweep_s']:.1f}x faster, scoring "
              f"{c['score_s'] / g['score_s']:.1f}x faster; identical node lists in {same} of "
              f"{len(c['node_indices'])} libraries (float rounding may move borderline cosines)")
    if args.scale_n_train and any(d.type == "cuda" for d in devices):
        dev = next(d for d in devices if d.type == "cuda")
        x_big = cifar_shaped(args.scale_n_train, seed=3)
        r = bench_device(dev, model, x_big, x_test, args.batch_size)
        r["scale_run"] = True
        results.append(r)
        print(f"\n[{r['device']}] scale run, {r['n_train']} train images: sweep {r['sweep_s']:.1f} s "
              f"({r['train_images_per_s']:.0f} images/s), library nodes {sum(r['library_mib'].values()):.0f} MiB, "
              f"peak CUDA memory {r['cuda_peak_mib']:.0f} MiB")
    if args.json:
        slim = [{k: v for k, v in r.items() if k != "node_indices"} for r in results]
        Path(args.json).write_text(json.dumps(slim, indent=2) + "\n")
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
