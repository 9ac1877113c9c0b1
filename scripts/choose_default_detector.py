"""Choose the settings of the recommended detector on development splits (other seeds), never on the reported run.

The reported run is ``libnet evaluate-detectors`` with ``--seed 0``. This script runs the same command
with other seeds (another data split, model, attacks and out-of-domain draws) and a few candidate
settings of ``"library-fusion"``, listed for the comparison through the ``libnet_detector_comparison``
hook of a small plugin registered here (the way any third-party plugin adds detectors), then prints,
for each candidate, the worst margin of its AUROC against the best baseline over every set.

Usage:
    python scripts/choose_default_detector.py --seeds 1 2 --out runs/dev-default
    python scripts/choose_default_detector.py --seeds 1 --quick          # a fast smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from libnet_plugin import cli
from libnet_plugin.builtins import PEERS
from libnet_plugin.hookspecs import hookimpl
from libnet_plugin.plugins import default_plugin_manager

#: Candidate settings of the recommended detector: {label: (name, settings)}.
CANDIDATES = {
    # round 1 (seeds 1 and 2): the output features
    "fusion: distance all + confidence": ("library-fusion", {"outputs": ["confidence"]}),
    "fusion: distance all + confidence + logit-margin": ("library-fusion", {"outputs": ["confidence", "logit-margin"]}),
    "fusion: distance all + logit-margin": ("library-fusion", {"outputs": ["logit-margin"]}),
    "fusion: distance conv + confidence": ("library-fusion", {"layers": ["conv1", "conv2"], "outputs": ["confidence"]}),
    "fusion: distance conv + confidence + logit-margin": ("library-fusion", {"layers": ["conv1", "conv2"],
                                                                            "outputs": ["confidence", "logit-margin"]}),
    # round 2: how the p-values are combined, and which layers
    "fusion: distance all + both outputs, min-p": ("library-fusion", {"outputs": ["confidence", "logit-margin"],
                                                                      "combine": "min"}),
    "fusion: distance conv + both outputs, min-p": ("library-fusion", {"layers": ["conv1", "conv2"], "combine": "min",
                                                                       "outputs": ["confidence", "logit-margin"]}),
    "fusion: distance conv1, conv2, fc1 + both outputs": ("library-fusion", {"layers": ["conv1", "conv2", "fc1"],
                                                                             "outputs": ["confidence", "logit-margin"]}),
    # round 3: the answer's standing among the classes per layer (distance-margin), and a Fisher sum
    # weighted by the correlation of the features on the clean calibration data
    "fusion: distance + distance-margin all + both outputs": ("library-fusion", {
        "features": ["distance", "distance-margin"], "outputs": ["confidence", "logit-margin"]}),
    "fusion: distance + distance-margin conv + both outputs": ("library-fusion", {
        "layers": ["conv1", "conv2"], "features": ["distance", "distance-margin"],
        "outputs": ["confidence", "logit-margin"]}),
    "fusion: distance all + both outputs, weighted Fisher": ("library-fusion", {
        "outputs": ["confidence", "logit-margin"], "combine": "weighted"}),
    "fusion: distance conv + both outputs, weighted Fisher": ("library-fusion", {
        "layers": ["conv1", "conv2"], "outputs": ["confidence", "logit-margin"], "combine": "weighted"}),
    # round 4: the residual from the library nodes' principal subspace, which keeps the positions that the
    # channel means of "distance" average away (rank 50 and 20)
    "fusion: distance + subspace conv + both outputs": ("library-fusion", {
        "layers": ["conv1", "conv2"], "features": ["distance", "subspace"], "outputs": ["confidence", "logit-margin"]}),
    "fusion: distance + subspace (rank 20) conv + both outputs": ("library-fusion", {
        "layers": ["conv1", "conv2"], "features": ["distance", "subspace"], "rank": 20,
        "outputs": ["confidence", "logit-margin"]}),
    "fusion: distance + subspace all + both outputs": ("library-fusion", {
        "features": ["distance", "subspace"], "outputs": ["confidence", "logit-margin"]}),
}
#: the current default (all layers) and its conv1, conv2 variant, which each round is compared with
CURRENT = ("fusion: distance all + confidence + logit-margin", "fusion: distance conv + confidence + logit-margin")
ROUNDS = {1: list(CANDIDATES)[:5], 2: list(CANDIDATES)[5:8], 3: [*CURRENT, *list(CANDIDATES)[8:12]],
          4: [*CURRENT, *list(CANDIDATES)[12:]]}
#: what the candidates are compared with: the baselines and today's post-hoc peers (libnet_plugin.builtins.PEERS)
BASELINES = ("msp", "mahalanobis", "knn", "cpl (paper, top_k 20)", *PEERS)


class Candidates:
    @hookimpl
    def libnet_detector_comparison(self):
        return CANDIDATES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--out", default="runs/dev-default")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--round", type=int, choices=sorted(ROUNDS), help="only this round's candidates")
    args = parser.parse_args(argv)
    if 0 in args.seeds:
        parser.error("seed 0 is the reported run: choose settings on other seeds")
    default_plugin_manager().register(Candidates(), name="dev-candidates")  # the one the command asks
    candidates = ROUNDS[args.round] if args.round else list(CANDIDATES)
    wanted = [*candidates, *BASELINES, "library-distance"]
    summary = {}
    for seed in args.seeds:
        out = Path(args.out) / f"seed{seed}"
        rc = cli.main(["evaluate-detectors", "--seed", str(seed), "--no-adaptive", "--out", str(out),
                       "--no-progress", *(["--quick"] if args.quick else []), "--detectors", *wanted])
        if rc:
            return rc
        res = json.loads((out / "detectors.json").read_text())
        dets = res["detectors"]
        base = [b for b in dets if b in BASELINES]
        for label in candidates:
            margins = {s: dets[label]["auroc"][s] - max(dets[b]["auroc"][s] for b in base) for s in res["sets"]}
            worst = min(margins, key=margins.get)
            summary.setdefault(label, {})[seed] = {"worst_set": worst, "worst_margin": margins[worst],
                                                   "mean_auroc": sum(dets[label]["auroc"].values()) / len(margins),
                                                   "time_ratio": dets[label]["time_ratio"]}
    for label, by_seed in summary.items():
        cells = "; ".join(f"seed {s}: worst {v['worst_set']} {v['worst_margin']:+.3f}, mean AUROC "
                          f"{v['mean_auroc']:.3f}, {v['time_ratio']:.2f}x forward" for s, v in by_seed.items())
        print(f"{label}: {cells}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
