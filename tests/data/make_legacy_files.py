"""Writes the saved files that tests/test_legacy_files.py loads: files of the format before a change.

Run once with the code whose files must keep loading (here: main before the package layout moved, so
the files prove that a network and a detector saved by the old layout still load and score the same).
It uses only the public API, so it keeps running after later changes; re-running it overwrites the files
with the current code's, which defeats their purpose: keep the committed ones. A method added to
``METHODS`` later gets its file alone (``--only METHOD``), the others are left as they are.

    .venv/bin/python tests/data/make_legacy_files.py tests/data/legacy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

import libnet_plugin as lnp

#: detector methods saved, with their settings
METHODS = {
    "cpl": {"top_k": 5},
    "library-margin": {},
    "library-distance": {},
    "msp": {},
    "mahalanobis": {"max_dim": 16},
    "knn": {"k": 3},
    "library-fusion": {},
}


def build() -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    train = torch.randn(240, 6, generator=g)
    clean = torch.randn(60, 6, generator=g)
    probe = torch.cat([torch.randn(12, 6, generator=g), 6.0 * torch.randn(4, 6, generator=g)])
    return model, train, clean, probe


def main(out: Path, only: str | None = None) -> None:
    if only is not None:
        return add_one(out, only)
    out.mkdir(parents=True, exist_ok=True)
    model, train, clean, probe = build()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    save_file({"train": train, "clean": clean, "probe": probe}, str(out / "inputs.safetensors"))
    net = lnp.LibraryNetwork(model, ["0", "2", "4"], thresholds=0.8, top_k=3).fit(train)
    net.save(out / "network.safetensors")
    expected: dict = {"network": {l: s.tolist() for l, s in net.predict_scores(probe).items()},
                      "consistency": net.consistency(probe).tolist(), "detectors": {}}
    for method, settings in METHODS.items():
        det = lnp.ConsistencyDetector(net, method=method, settings=settings)
        if det.requires_training_data:
            det.fit(train)
        det.calibrate(clean, fpr=0.1)
        det.save(out / f"detector-{method}.safetensors")
        expected["detectors"][method] = {"score": det.score(probe).tolist(), "threshold": det.threshold_}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


def add_one(out: Path, method: str) -> None:
    """Write the file of one detector ``method`` into ``out`` and add its scores to ``expected.json``."""
    model, train, clean, probe = build()
    net = lnp.LibraryNetwork(model, ["0", "2", "4"], thresholds=0.8, top_k=3).fit(train)
    det = lnp.ConsistencyDetector(net, method=method, settings=METHODS[method])
    if det.requires_training_data:
        det.fit(train)
    det.calibrate(clean, fpr=0.1)
    det.save(out / f"detector-{method}.safetensors")
    expected = json.loads((out / "expected.json").read_text())
    expected["detectors"][method] = {"score": det.score(probe).tolist(), "threshold": det.threshold_}
    (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[3] if sys.argv[2:3] == ["--only"] else None)
