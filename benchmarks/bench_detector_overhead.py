"""Detector overhead: scoring time of each detector over the model's own forward time, same batch.

On the MNIST default (the paper's net from the shared ``.cache``, 4,000 training images), for the seed's
threshold set S1 and for ``thresholds="auto:0.25"`` (the default of ``libnet evaluate-detectors``), every
detector is fitted and calibrated, then timed on one batch of 256 test images against the plain forward
pass of the model (``torch.no_grad``), in turns (forward, detector, forward, detector, ...) so that load
on a shared machine hits both alike; the best of ``repeat`` runs is kept. The guard (output and flags from
one forward pass) is timed too: it should cost what the score costs, since the score already includes
the forward pass. Ratios are measured in one run; absolute times belong to the machine in ``machine``.

Usage::

    python -m benchmarks.bench_detector_overhead [--device cpu] [--quick] [--repeat N] [--candidates]
        [--out FILE.json]

``--candidates`` also times the development candidates of issue 28 (:data:`CANDIDATES`), each on a network
probing only the layers it reads (with ``thresholds="auto:0.25"``; fc1 added where a peer reads the
penultimate features).

``benchmarks/run.py`` calls :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from libnet_plugin import ConsistencyDetector, LibraryNetwork
from libnet_plugin.experiments.evaluate_detectors import mnist_model
from libnet_plugin.experiments.report import markdown_table, to_jsonable, write_json_atomic

from ._util import interleaved_best, machine_info, resolve_device

__all__ = ["main", "DETECTORS", "CONFIGS", "CANDIDATES"]

#: The detectors timed: ``{label: (name, settings)}``.
DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "cpl (paper, top_k 20)": ("cpl", {"top_k": 20}),
    "library-margin": ("library-margin", {}),
    "library-margin (conv1, conv2)": ("library-margin", {"layers": ["conv1", "conv2"]}),
    "library-distance": ("library-distance", {}),
    "library-distance (conv1, conv2)": ("library-distance", {"layers": ["conv1", "conv2"]}),
    "library-fusion": ("library-fusion", {}),
    "library-fusion (conv1, conv2)": ("library-fusion", {"layers": ["conv1", "conv2"]}),
    "msp": ("msp", {}),
    "mahalanobis": ("mahalanobis", {}),
    "knn": ("knn", {}),
}
#: Library thresholds: ``{label: (thresholds, auto_thresholds)}``.
CONFIGS: dict[str, tuple[Any, dict[str, Any] | None]] = {
    "S1": ({"conv1": 0.55, "conv2": 0.70, "fc1": 0.75, "fc2": 0.80}, None),
    "auto:0.25": ("auto", {"target": 0.25}),
}
LAYERS = ["conv1", "conv2", "fc1", "fc2"]
#: The development candidates of issue 28 timed with ``--candidates`` (labels of ``MNIST_CANDIDATES``).
CANDIDATES: tuple[str, ...] = (
    "library-gaussian-fusion (conv1, conv2; gauss conv2:input, fc1:input; tail)",
    "library-gaussian-fusion (conv1, conv2; gauss conv1, conv2:input; vim; tail)",
    "library-gaussian-fusion (conv1, conv2; gauss conv1, conv2:input, fc1:input; vim; truncated 0.1; tail)",
    "library-gaussian-fusion (generic: conv1, conv2:input, fc1:input; vim; truncated 0.1; tail)",
)


def _time_candidates(model: Any, train: tuple[torch.Tensor, torch.Tensor], cal: torch.Tensor, batch: torch.Tensor,
                     dev: torch.device, reps: int, say: Any) -> dict[str, Any]:
    """Score time / forward time of each of :data:`CANDIDATES`, each on a network of its own layers."""
    from libnet_plugin.detectors import MNIST_CANDIDATES

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    out: dict[str, Any] = {}
    for label in CANDIDATES:
        method, settings = MNIST_CANDIDATES[label]
        layers = list(dict.fromkeys([*settings.get("layers", []), *settings.get("gaussian_layers", []),
                                     *(["fc1"] if settings.get("peers") else [])]))
        net = LibraryNetwork(model, layers, thresholds="auto", auto_thresholds={"target": 0.25}, device=dev).fit(train[0])
        det = ConsistencyDetector(net, method=method, settings=settings).fit(train).calibrate(cal)
        times = interleaved_best({"forward": forward, "score": lambda det=det: det.score(batch)}, dev, repeat=reps)
        out[label] = {"layers": layers, "score_ms": times["score"] * 1e3, "forward_ms_same_turns": times["forward"] * 1e3,
                      "ratio": times["score"] / times["forward"]}
        say(f"[detector overhead] candidate {label}: {out[label]['ratio']:.2f}x forward")
    return out


def main(device: str = "cpu", *, quick: bool = False, batch_size: int = 256, repeat: int = 5,
         cache_dir: str = ".cache", candidates: bool | str = False, log: Any = None) -> dict[str, Any]:
    """Measure detector score time / model forward time on the MNIST default.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        quick: 1,000 training images, S1 only, 2 repeats (a smoke run).
        batch_size: images per timed batch.
        repeat: timed runs per function (the best is kept).
        cache_dir: the shared weights cache.
        candidates: also time :data:`CANDIDATES` (``"candidates": {label: {"layers", "score_ms", "ratio"}}``);
            ``"only"``: time them alone (no threshold configuration).
        log: a function receiving progress lines (default: stderr).

    Returns:
        ``{"machine", "batch_size", "settings", "configs": {config: {"library_sizes", "library_bytes",
        "forward_ms", "probe_ratio", "detectors": {label: {"method", "library_based", "score_ms", "ratio",
        "guard_ms", "guard_ratio", "memory_bytes"}}}}}`` where ``ratio`` is score time / forward time on the
        same batch and ``probe_ratio`` the share of that taken by the probe alone (the forward pass with the
        layer hooks, which every detector here pays, the plain max-softmax baseline included).
    """
    from libnet_plugin.experiments.data import load_mnist_default
    from libnet_plugin.experiments.models import MnistNet, load_state_dict_checked

    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    dev = resolve_device(device)
    n_train = 1000 if quick else 4000
    x_tr, y_tr, x_te, _ = load_mnist_default(seed=0, n_train=4000, cache_dir=cache_dir)
    net_norm, weights = mnist_model(x_tr, y_tr, seed=0, epochs=5, cache_dir=cache_dir, progress=False, log=say)
    model = load_state_dict_checked(MnistNet(normalize=True), net_norm.state_dict()).to(dev).eval()
    x_tr, y_tr = x_tr[:n_train].to(dev), y_tr[:n_train].to(dev)
    cal, batch = x_te[:500].to(dev), x_te[500:500 + batch_size].to(dev)
    reps = 2 if quick else repeat
    configs = {} if candidates == "only" else {"S1": CONFIGS["S1"]} if quick else CONFIGS
    out: dict[str, Any] = {"machine": machine_info(dev), "batch_size": int(batch.shape[0]),
                           "settings": {"n_train": n_train, "repeat": reps, "weights": weights, "quick": quick},
                           "configs": {}}

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return model(batch)

    for cname, (thresholds, auto) in configs.items():
        net = LibraryNetwork(model, LAYERS, thresholds=thresholds, auto_thresholds=auto, device=dev).fit(x_tr)
        say(f"[detector overhead] {cname}: library sizes {net.library_sizes_}")
        entry: dict[str, Any] = {"library_sizes": net.library_sizes_, "thresholds": net.thresholds_,
                                 "library_bytes": sum(t.numel() * t.element_size() for t in net.state_tensors().values()),
                                 "detectors": {}}
        probe_times = interleaved_best({"forward": forward, "probe": lambda net=net: net.probe.run(batch)}, dev, repeat=reps)
        entry["probe_ratio"] = probe_times["probe"] / probe_times["forward"]
        say(f"[detector overhead] {cname} probe alone (one forward pass with the layer hooks): "
            f"{entry['probe_ratio']:.2f}x forward")
        forward_best = probe_times["forward"]
        for label, (method, settings) in DETECTORS.items():
            det = ConsistencyDetector(net, method=method, settings=settings)
            if det.requires_training_data:
                det.fit((x_tr, y_tr))
            det.calibrate(cal)
            guard = det.guard()
            times = interleaved_best({"forward": forward, "score": lambda det=det: det.score(batch),
                                      "guard": lambda guard=guard: guard(batch)}, dev, repeat=reps)
            forward_best = min(forward_best, times["forward"])
            entry["detectors"][label] = {
                "method": method, "settings": settings, "library_based": det.scorer.uses_library,
                "score_ms": times["score"] * 1e3, "guard_ms": times["guard"] * 1e3,
                "forward_ms_same_turns": times["forward"] * 1e3,
                "ratio": times["score"] / times["forward"], "guard_ratio": times["guard"] / times["forward"],
                "memory_bytes": det.memory_bytes(),
            }
            say(f"[detector overhead] {cname} {label}: {entry['detectors'][label]['ratio']:.2f}x forward")
        entry["forward_ms"] = forward_best * 1e3
        out["configs"][cname] = entry
    if candidates:
        out["candidates"] = _time_candidates(model, (x_tr, y_tr), cal, batch, dev, reps, say)
    return out


def render(result: dict[str, Any]) -> str:
    """A markdown table of the ratios."""
    rows = []
    for cname, c in result["configs"].items():
        rows.append([cname, "(probe alone: forward with layer hooks)", None, None, round(c["probe_ratio"], 2), None])
        for label, d in c["detectors"].items():
            rows.append([cname, label, round(d["score_ms"], 2), round(d["forward_ms_same_turns"], 2),
                         round(d["ratio"], 2), round(d["guard_ratio"], 2)])
    for label, d in result.get("candidates", {}).items():
        rows.append(["auto:0.25", f"{label} (own layers)", round(d["score_ms"], 2), round(d["forward_ms_same_turns"], 2),
                     round(d["ratio"], 2), None])
    return markdown_table(["thresholds", "detector", "score ms", "forward ms", "score / forward",
                           "guard / forward"], rows, floatfmt=".2f")


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per function, best kept (default: 5)")
    parser.add_argument("--candidates", nargs="?", const=True, default=False, choices=[True, "only"],
                        help="also time the development candidates of issue 28 ('only': time them alone)")
    parser.add_argument("--out", metavar="FILE.json", help="also write the result as JSON")
    args = parser.parse_args(argv)
    res = main(device=args.device, quick=args.quick, repeat=args.repeat, candidates=args.candidates)
    print(render(res))
    print(f"\nbatch {res['batch_size']} on {res['machine']['device_name']}, torch threads "
          f"{res['machine']['torch_threads']}, load average at start {res['machine']['load_average_at_start']}")
    if args.out:
        write_json_atomic(args.out, res)
    else:
        print(json.dumps(to_jsonable(res["configs"]), indent=1)[:2000])
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_cli())
