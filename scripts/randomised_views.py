"""Does a detector that draws a random view per query resist an attacker who knows it? (a development run)

The issue of attacks that know the detector lists randomisation as an idea worth measuring, evaluated
with expectation over the randomness (Athalye et al. 2018: an attacker averages the gradient over the
random draws). This script measures it on a development seed (never the reported seed 0):

* ``K`` views: ``library-fusion`` on conv1, conv2 with ``pool=None`` and ``max_dim=D``, each view with
  its own Gaussian random projection (``seed=k``) of the whole normalised activation to ``D``
  dimensions, so that each view looks at different mixtures of positions and channels. Each view is a
  detector of its own, calibrated at the FPR on the same clean images.
* The randomised detector answers each query with one view drawn uniformly. Each view flags a clean
  input with probability at most the FPR, so the randomised one does too.
* Its **expected evasion** on an attacked image is the share of the ``K`` views that do not flag it
  while the model is fooled (the exact expectation over the draw, not a sample).
* Attacks (white-box PGD of ``adaptive_pgd``: the margin loss plus lambda times the detector term, the
  lambdas of the default grid, the best iterate per image): **EOT**, whose detector term is the mean of
  the ``K`` views' scores (the expectation of the score over the draw, with each view's surrogate
  gradient), and **one view**, which attacks view 0 only (an attacker who ignores the randomness). The
  pooled default ``library-fusion (conv1, conv2)``, attacked the same way, is the reference.

Usage:
    python scripts/randomised_views.py --seed 1 --out runs/dev-random-views
    python scripts/randomised_views.py --seed 1 --quick     # a fast smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import libnet_plugin as lnp
from libnet_plugin.consistency_detector import GuardOutput
from libnet_plugin.experiments.adaptive import adaptive_pgd, judge
from libnet_plugin.experiments.data import load_mnist_default
from libnet_plugin.experiments.evaluate_detectors import mnist_model
from libnet_plugin.experiments.mnist import LAYERS
from libnet_plugin.experiments.models import MnistNet, load_state_dict_checked
from libnet_plugin.experiments.protocols import auroc
from libnet_plugin.experiments.threat_models import DEFAULT_LAMBDAS, QUICK_LAMBDAS


class MeanOfViews:
    """The detector term of the EOT attack: the mean of the views' scores (what ``adaptive_pgd`` needs of a
    detector). Its threshold, the mean of the views' thresholds, only orders the attack's iterates; the
    evasion is judged view by view afterwards."""

    differentiable = True
    method = "mean of views"
    is_calibrated = True

    def __init__(self, views: list[lnp.ConsistencyDetector]):
        self.views = views
        self.net = views[0].net
        self.threshold_ = float(sum(v.threshold_ for v in views) / len(views))
        self.scorer = views[0].scorer  # a fused score: the attack scales its term by the surrogate's spread

    def score_and_output(self, x: Tensor) -> GuardOutput:
        outs = [v.score_and_output(x) for v in self.views]
        score = torch.stack([o.score for o in outs]).mean(dim=0)
        return GuardOutput(outs[0].output, score > self.threshold_, score)

    def score(self, x: Tensor) -> Tensor:
        return self.score_and_output(x).score

    def surrogate(self, x: Tensor) -> Tensor:
        return torch.stack([v.surrogate(x) for v in self.views]).mean(dim=0)


def expected_evasion(views: list[lnp.ConsistencyDetector], x_adv: Tensor, y: Tensor) -> tuple[float, float]:
    """(the expected evasion over a uniform draw of a view, the share that evades every view)."""
    evaded = torch.stack([judge(v, x_adv, y).evaded for v in views]).float()  # [K, N]
    return float(evaded.mean()), float(evaded.amin(dim=0).mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="a development seed (default 1; 0 is the reported run)")
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64, help="dimensions of each view's projection per layer")
    parser.add_argument("--n", type=int, default=48, help="correctly classified images attacked")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--fpr", type=float, default=0.05)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", default="runs/dev-random-views")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.seed == 0:
        parser.error("seed 0 is the reported run; choose a development seed")
    quick = args.quick
    n_train, epochs = (600, 1) if quick else (4000, 5)
    lambdas = QUICK_LAMBDAS if quick else DEFAULT_LAMBDAS
    steps, n, k = (5, 4, 2) if quick else (args.steps, args.n, args.views)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    torch.manual_seed(args.seed)
    x_tr, y_tr, x_te, y_te = load_mnist_default(seed=args.seed, n_train=n_train, cache_dir=args.cache_dir)
    half = x_te.shape[0] // 2
    x_cal, x_eval, y_eval = x_te[:half], x_te[half:], y_te[half:]
    net_norm, _ = mnist_model(x_tr, y_tr, args.seed, epochs, args.cache_dir, False, log)
    model = load_state_dict_checked(MnistNet(normalize=True), net_norm.state_dict()).eval()
    net = lnp.LibraryNetwork(model, list(LAYERS), thresholds="auto", auto_thresholds={"target": 0.25}).fit(x_tr)
    conv = ["conv1", "conv2"]
    pooled = lnp.ConsistencyDetector(net, method="library-fusion", settings={"layers": conv})
    pooled.fit(x_tr).calibrate(x_cal, fpr=args.fpr)
    views = [lnp.ConsistencyDetector(net, method="library-fusion",
                                     settings={"layers": conv, "pool": None, "max_dim": args.dim, "seed": s})
             for s in range(k)]
    for v in views:
        v.fit(x_tr).calibrate(x_cal, fpr=args.fpr)
    with torch.no_grad():
        correct = (model(x_eval).argmax(1) == y_eval).nonzero().flatten()[:n]
    x, y = x_eval[correct], y_eval[correct]

    # clean separation first: AUROC of each detector against the lambda-0 attack (PGD on the margin alone)
    results: dict[str, Any] = {"seed": args.seed, "views": k, "dim": args.dim, "n": int(x.shape[0]), "steps": steps,
                               "lambdas": list(lambdas), "fpr": args.fpr, "epsilons": {}}
    named = {"pooled": pooled, **{f"view {i}": v for i, v in enumerate(views)}}
    clean_scores = {name: det.score(x_eval[half // 2:]).detach() for name, det in named.items()}
    mean_view = MeanOfViews(views)
    for eps in args.epsilons:
        t0 = time.perf_counter()
        row: dict[str, Any] = {}
        plain = adaptive_pgd(pooled, x, y, eps=eps, steps=steps, restarts=1, lambdas=(0.0,), seed=args.seed)
        fooled = plain.misclassified
        row["fooled (margin only)"] = float(fooled.float().mean())
        if bool(fooled.any()):
            xa = plain.x_adv[fooled]
            row["auroc vs margin-only PGD"] = {name: auroc(clean_scores[name], det.score(xa).detach())
                                               for name, det in named.items()}
        ref = adaptive_pgd(pooled, x, y, eps=eps, steps=steps, restarts=1, lambdas=lambdas, seed=args.seed)
        row["pooled default, attacked directly"] = ref.summary()["evasion"]
        one = adaptive_pgd(views[0], x, y, eps=eps, steps=steps, restarts=1, lambdas=lambdas, seed=args.seed)
        row["view 0, attacked directly"] = one.summary()["evasion"]
        row["random view, attack on view 0"] = expected_evasion(views, one.x_adv, y)[0]
        eot = adaptive_pgd(mean_view, x, y, eps=eps, steps=steps, restarts=1, lambdas=lambdas, seed=args.seed)
        e_mean, e_all = expected_evasion(views, eot.x_adv, y)
        row["random view, EOT attack"] = e_mean
        row["every view at once, EOT attack"] = e_all
        row["fooled (EOT attack)"] = eot.summary()["fooled"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        results["epsilons"][f"{eps:g}"] = row
        log(f"eps={eps:g}: " + json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "random_views.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
