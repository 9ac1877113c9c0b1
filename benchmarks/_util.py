"""Timing, machine description and small helpers shared by the benchmarks."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from libnet_plugin.experiments.report import environment_info

__all__ = ["machine_info", "sync", "interleaved_best", "cpu_model", "resolve_device"]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def resolve_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)`` after checking that CUDA is there when asked for."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available on this machine")
    return dev


def load_average() -> list[float] | None:
    """The load average over 1, 5 and 15 minutes (``None`` where the platform has none)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """Platform, CPU model and count, torch version and threads, and the device the numbers come from."""
    info = environment_info()
    info["cpu_model"] = cpu_model()
    info["device"] = str(device)
    info["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"
    info["load_average_at_start"] = load_average()
    return info


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work (timings on a GPU are meaningless without it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_best(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int = 3,
                     warmup: int = 1) -> dict[str, float]:
    """Best times of several functions measured in turns (A B C A B C ...), so that a burst of load on a
    shared machine hits them alike; ratios between them are then fair."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best
