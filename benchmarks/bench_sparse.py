"""Sparse sampling on the MNIST default: library size, agreement, CPL AUROC, fitting and scoring time.

For the exact library and for sparse / projected libraries at a few sizes, one library network per
configuration is fitted at the seed's threshold set S1 on the 4,000 training images, then measured:

- library sizes per layer and the bytes they hold (plus the projection matrix, if any);
- top-1 agreement with the model per layer on the 1,000 test images (``evaluate``), and the points lost
  against the exact library;
- CPL AUROC (top_k 20) of the standard protocol at each epsilon (clean versions vs attacked inputs the
  model got right before and wrong after);
- fitting time, and the inference overhead at batch 256, measured in turns: ``net.consistency(x)``
  (probe + library scoring + CPL) over the model's own forward (``inference_ratio``), split into the
  probe's share (forward with hooks and its finite checks, ``probe_ratio``) and the libraries' share
  (forward + scoring from the HAPs, ``library_scoring_ratio``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

import libnet_plugin as lnp
from libnet_plugin.experiments.protocols import detection_metrics
from libnet_plugin.metrics import cpl

from ._util import interleaved_best, sync
from .mnist_setup import LAYERS, S1, MnistBench

__all__ = ["CONFIGS", "QUICK_CONFIGS", "run"]

#: score the two conv layers' cosines in bfloat16 (fc1 and fc2 are small: float32 costs nothing there)
BF16_CONV = {"conv1": "bfloat16", "conv2": "bfloat16"}

#: (label, library, library_options)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("exact", "exact", {}),
    *[(f"sparse {n}", "sparse", {"n_units": n, "seed": 0}) for n in (256, 1024, 4096)],
    *[(f"projected-hashing {n}", "projected", {"n_components": n, "seed": 0, "method": "hashing"})
      for n in (256, 1024, 4096)],
    *[(f"projected-gaussian {n}", "projected", {"n_components": n, "seed": 0, "method": "gaussian"})
      for n in (256, 1024)],
    # the wide layers only ({layer: size}); fc1 (500 units) and fc2 are used whole
    ("projected-hashing conv-only 256", "projected",
     {"n_components": {"conv1": 256, "conv2": 256}, "seed": 0, "method": "hashing"}),
    # bfloat16 products for the wide layers' cosines (score_dtype); the nodes are the same as in float32
    ("exact, bf16 conv", "exact", {"score_dtype": BF16_CONV}),
    ("sparse 1024, bf16 conv", "sparse", {"n_units": 1024, "seed": 0, "score_dtype": BF16_CONV}),
]
QUICK_CONFIGS = [c for c in CONFIGS if c[0] in ("exact", "sparse 256", "sparse 1024", "projected-hashing 1024",
                                                "projected-gaussian 256", "projected-hashing conv-only 256",
                                                "sparse 1024, bf16 conv")]


def _library_bytes(net: lnp.LibraryNetwork) -> int:
    total = 0
    for lib in net.libraries_.values():
        total += lib.nodes.numel() * lib.nodes.element_size()
        proj = getattr(lib, "_projection", None)
        if isinstance(proj, torch.Tensor):
            total += proj.numel() * proj.element_size()
    return total


def run(mb: MnistBench, device: torch.device, *, quick: bool = False, repeat: int = 40,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Fit and measure every configuration; returns ``{"rows": [...], "settings": {...}}``."""
    x256 = mb.x_test[:256]
    n_att = next(iter(mb.attacks.values()))[0].shape[0]
    x_clean_att = mb.x_test[:n_att]

    @torch.no_grad()
    def forward():
        return mb.model(x256)

    rows = []
    exact_agreement: dict[str, float] | None = None
    for label, library, options in (QUICK_CONFIGS if quick else CONFIGS):
        net = lnp.LibraryNetwork(mb.model, list(LAYERS), thresholds=S1, top_k=3, device=device, library=library,
                                 library_options=options, batch_size=256)
        sync(device)
        t0 = time.perf_counter()
        net.fit(mb.x_train, progress=False)
        sync(device)
        fit_s = time.perf_counter() - t0
        ev = net.evaluate((mb.x_test, mb.y_test), progress=False)
        agreement = {l: ev[l]["top1_agreement"] for l in LAYERS}
        if exact_agreement is None:
            exact_agreement = agreement
        clean_cpl = net.consistency(x_clean_att, top_k=20)
        aurocs = {}
        for eps, (x_adv, keep) in sorted(mb.attacks.items()):
            adv_cpl = net.consistency(x_adv, top_k=20)
            aurocs[eps] = detection_metrics(clean_cpl[keep], adv_cpl[keep])["auroc"]
        haps = net.probe.run(x256).haps
        times = interleaved_best({"forward": forward, "probe": lambda net=net: net.probe.run(x256),
                                  "scoring": lambda net=net, haps=haps: cpl(net.scores_from_haps(haps, top_k=20)),
                                  "consistency": lambda net=net: net.consistency(x256, top_k=20)},
                                 device, repeat=repeat, warmup=2)
        row = {"label": label, "library": library, "options": options, "sizes": net.library_sizes_,
               "library_mb": _library_bytes(net) / 2**20, "top1_agreement": agreement,
               "agreement_lost_points": {l: 100 * (exact_agreement[l] - agreement[l]) for l in LAYERS},
               "cpl_auroc": aurocs, "fit_seconds": fit_s, "seconds": times,
               "inference_ratio": times["consistency"] / times["forward"],
               "probe_ratio": times["probe"] / times["forward"],
               "library_scoring_ratio": (times["forward"] + times["scoring"]) / times["forward"]}
        rows.append(row)
        log(f"[sparse] {label:24s} sizes {list(row['sizes'].values())} agreement "
            f"{[round(100 * a, 1) for a in agreement.values()]} AUROC {[round(a, 3) for a in aurocs.values()]} "
            f"fit {fit_s:.1f} s, inference x{row['inference_ratio']:.2f} (probe x{row['probe_ratio']:.2f}, "
            f"forward + scoring x{row['library_scoring_ratio']:.2f})")
    return {"thresholds": S1, "top_k_agreement": 3, "top_k_cpl": 20, "batch_size": 256,
            "n_test": int(mb.x_test.shape[0]), "rows": rows,
            "timing": f"best of {repeat} turns of: the model's forward; the probe (forward + hooks + its finite "
                      "checks); scoring from the HAPs (libraries + readouts + CPL); net.consistency (all of it)"}
