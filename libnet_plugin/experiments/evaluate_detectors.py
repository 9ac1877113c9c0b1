"""``libnet evaluate-detectors``: every registered detector on the same clean, attacked and out-of-domain sets.

The MNIST default (the paper's net trained on 4,000 of the 5,000 embedded images with a fixed seed, the
weights cached in ``--cache-dir`` and shared with ``libnet reproduce mnist``): the 1,000 test images are
split in two halves; the first half is the clean CALIBRATION set (detector thresholds and the clean
reference of fused scores), the second half the clean EVALUATION set, whose correctly classified images
are attacked with the standard protocol of docs/method.md section 9 (L-inf PGD-40 in pixel space, random
start, step ``2.5 eps / 40``, eps 0.1 / 0.2 / 0.3; only successful attacks are kept), FGSM at the same
epsilons, CW-L2 and DeepFool (``--attacks``). Out-of-domain sets: the seven of
:func:`~libnet_plugin.experiments.ood.ood_sets` (``--ood``). Every detector listed by the
registered plugins (the ``libnet_detector_comparison`` hook), plus the MNIST variants of
:data:`~libnet_plugin.experiments.comparison.MNIST_VARIANTS` (the library-based scores on the convolution layers), is calibrated on the same clean
images at 5% FPR and scored on the same sets; none sees an attacked input before the test. Then every
detector (or those of ``--adaptive-detectors``) is attacked by attackers who know it
(:mod:`~libnet_plugin.experiments.threat_models`: white-box adaptive PGD and a score-only search), and
its evasion rate is reported (``--no-adaptive`` skips this, the longest part of the run).

Output (``--out``, default ``runs/detectors``): ``detectors.json`` (everything
:func:`~libnet_plugin.experiments.comparison.evaluate_detectors` returns), ``detectors.md`` (the tables) and ``roc.png`` (ROC curves, one panel
per set), and ``evasion.png`` (evasion against epsilon and against the FPR).

Example:
    libnet evaluate-detectors                  # the MNIST default (the attacks on every detector take the
                                               # longest; --adaptive-detectors attacks fewer, --no-adaptive none)
    libnet evaluate-detectors --quick          # a small run for tests
    libnet evaluate-detectors --thresholds S1  # the seed's hand-picked set S1 instead of "auto"
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..builtins import DETECTORS
from ..errors import LibnetError
from ..network import LibraryNetwork
from ..plugins import registered_detectors
from .comparison import MNIST_VARIANTS, evaluate_detectors
from .protocols import AttackSet, load_attack_sets, save_attack_sets
from .report import (
    ExperimentError,
    StageTimer,
    check_run_folder,
    environment_info,
    relocate,
    staged_output,
    to_jsonable,
    write_json_atomic,
    write_text_atomic,
)
from .threat_models import DEFAULT_LAMBDAS as DEFAULT_LAMBDAS  # re-exported: it used to be defined here
from .threat_models import (
    AdaptiveBudget,
    ThreatModels,
    adaptive_budget,
    add_budget_arguments,
    check_budget_detectors,
    comparison_evasion_markdown,
)

__all__ = ['DEFAULT_THRESHOLDS', 'EvaluateDetectorsSettings', 'add_arguments', 'run']


#: The default ``--thresholds``: each layer's theta chosen so that its library holds about a quarter of
#: the training inputs (:func:`libnet_plugin.thresholds.choose_thresholds`).
DEFAULT_THRESHOLDS = "auto:0.25"


#: Attacks on the classifier alone (they do not know the detector).
ATTACK_FAMILIES = ("pgd", "fgsm", "cw-l2", "deepfool")

def _parse_thresholds(spec: str, layers: Sequence[str]) -> tuple[Any, dict[str, Any] | None]:
    """``"S1".."S7"`` | ``"auto"`` | ``"auto:<target>"`` | four comma-separated numbers."""
    from .mnist import CPL_SETS

    if spec in CPL_SETS:
        return dict(CPL_SETS[spec]), None
    if spec == "auto" or spec.startswith("auto:"):
        target_text = spec.partition(":")[2] or "0.1"
        try:
            target: float | int = int(target_text) if target_text.isdigit() else float(target_text)
        except ValueError:
            raise ExperimentError(f"--thresholds auto:<target>: the target must be a fraction or a number of nodes, "
                                  f"got {target_text!r}") from None
        return "auto", {"target": target}
    parts = spec.split(",")
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != len(layers):
        raise ExperimentError(f"--thresholds must be one of {sorted(CPL_SETS)}, 'auto', 'auto:<target>' or "
                              f"{len(layers)} comma-separated numbers for {list(layers)}, got {spec!r}")
    return dict(zip(layers, values)), None

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``libnet evaluate-detectors``."""
    parser.add_argument("--out", default=os.path.join("runs", "detectors"), metavar="DIR",
                        help="folder receiving detectors.json, detectors.md and roc.png (default: %(default)s): new, "
                             "empty or an earlier run's holding only what that run wrote (anything else is refused)")
    parser.add_argument("--thresholds", default=DEFAULT_THRESHOLDS, metavar="SPEC",
                        help="library thresholds: a seed set S1..S7, 'auto', 'auto:<fraction or nodes>', or "
                             "four numbers for conv1,conv2,fc1,fc2 (default: %(default)s)")
    parser.add_argument("--detectors", nargs="+", metavar="LABEL",
                        help="only these detectors (labels of the table, or detector names); default: all registered")
    parser.add_argument("--epsilons", nargs="+", type=float, metavar="EPS",
                        help="PGD budgets in pixel units (default 0.1 0.2 0.3)")
    parser.add_argument("--n-attack", type=int, metavar="N",
                        help="clean evaluation images attacked (default all 500; 48 with --quick)")
    parser.add_argument("--fpr", type=float, default=0.05, help="calibrated false-positive rate (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data split, training and attacks")
    parser.add_argument("--cache-dir", default=".cache", metavar="DIR",
                        help="cache of the embedded data and the trained weights, shared with `libnet reproduce "
                             "mnist` (default: %(default)s)")
    parser.add_argument("--attacks", nargs="+", choices=ATTACK_FAMILIES, default=list(ATTACK_FAMILIES), metavar="NAME",
                        help="attack families that ignore the detector: " + ", ".join(ATTACK_FAMILIES)
                             + " (default: all)")
    parser.add_argument("--ood", nargs="+", metavar="NAME",
                        help="out-of-domain sets by name (default: all of experiments.ood.OOD_REGISTRY)")
    parser.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                        help="attack every detector with the attacks that know it (default: on)")
    add_budget_arguments(parser, detectors_help="attack only these detectors (labels of the table) with the attacks "
                                                "that know them (default: every detector)")
    parser.add_argument("--adversarial-training", type=float, default=0.0, metavar="EPS",
                        help="train the net adversarially at this L-inf radius in pixels (e.g. 0.3; default 0: "
                             "standard training); the libraries and detectors are fitted on that net")
    parser.add_argument("--adversarial-steps", type=int, default=1, metavar="N",
                        help="steps of the training attack: 1 is FGSM from a random start, more is PGD "
                             "(default: %(default)s)")
    parser.add_argument("--adversarial-epochs", type=int, default=10, metavar="N",
                        help="training epochs with --adversarial-training (default: %(default)s; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="a small run for tests: 600 training images, 1 epoch, 10-step PGD on 48 images")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: only on a terminal)")

def mnist_model(x_tr: Tensor, y_tr: Tensor, seed: int, epochs: int, cache_dir: str | None,
                 progress: bool | None, log: Callable[[str], None], *, adversarial_eps: float = 0.0,
                 adversarial_steps: int = 1) -> tuple[Any, dict[str, Any]]:
    """The paper's net trained with ``seed`` (adversarially when ``adversarial_eps > 0``), from (or into) the
    cache shared with ``reproduce mnist``."""
    from .mnist import MnistSettings, cached_or_trained_mnist_net

    settings = MnistSettings.default_run(seed=seed, epochs=epochs, n_train=int(x_tr.shape[0]),
                                         adversarial_eps=adversarial_eps, adversarial_steps=adversarial_steps)
    cache = Path(cache_dir).expanduser() if cache_dir else None
    return cached_or_trained_mnist_net(x_tr, y_tr, settings, cache, progress, log)

def _cached_attacks(model: torch.nn.Module, x: Tensor, y: Tensor, epsilons: Sequence[float], nb_iter: int, seed: int,
                    cache_dir: str | None, progress: bool, log: Callable[[str], None]) -> dict[float, tuple[Tensor, str]]:
    """Standard-protocol PGD (pixel space) at each epsilon, read from / written to ``cache_dir`` when given.

    The cache file is keyed by a digest of the model's weights, the attacked images and labels, and the
    attack settings, so a different model or data never reuses it.
    """

    from .attacks import attack_standard_protocol

    h = hashlib.sha256(f"standard|{nb_iter}|{seed}".encode())
    for t in [*model.state_dict().values(), x, y]:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    path = Path(cache_dir).expanduser() / f"detector-attacks-{h.hexdigest()[:16]}.safetensors" if cache_dir else None
    cached: dict[float, Tensor] = {}
    if path is not None and path.is_file():
        try:
            cached = {round(s.epsilon, 6): s.x_adv for s in load_attack_sets(path)[0]}
        except (LibnetError, OSError) as exc:
            log(f"the cached attacks {str(path)!r} are unreadable ({exc}); attacking again")
    out: dict[float, tuple[Tensor, str]] = {}
    for eps in epsilons:
        key = round(float(eps), 6)
        if key in cached and cached[key].shape == x.shape:
            out[eps] = (cached[key], "cache")
        else:
            x_adv, _ = attack_standard_protocol(model, x, y, eps=eps, nb_iter=nb_iter, seed=seed, backend="torch",
                                                progress=progress)
            cached[key] = x_adv.detach().cpu()
            out[eps] = (cached[key], "computed")
    if path is not None and any(src == "computed" for _, src in out.values()):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_attack_sets(path, [AttackSet("standard", e, xa, "pixels", torch.arange(x.shape[0]))
                                    for e, xa in sorted(cached.items())],
                             {"nb_iter": nb_iter, "seed": seed, "n_images": int(x.shape[0])})
        except OSError as exc:
            log(f"could not cache the attacks in {str(path)!r}: {exc}")
    return out

def _other_attacks(model: torch.nn.Module, x: Tensor, y: Tensor, epsilons: Sequence[float], families: Sequence[str],
                   progress: bool) -> list[tuple[str, Tensor, dict[str, Any]]]:
    """FGSM at each epsilon, CW-L2 and DeepFool (minimal perturbations, no epsilon) on the same images."""
    from .attacks import pgd_torch
    from .minimal_attacks import cw_l2, deepfool

    out = []
    if "fgsm" in families:
        for eps in epsilons:
            out.append((f"FGSM eps={eps:g}", pgd_torch(model, x, y, eps, nb_iter=1, eps_iter=eps, rand_init=False),
                        {"epsilon": eps}))
    if "cw-l2" in families:
        x_adv = cw_l2(model, x, y, progress=progress)
        out.append(("CW-L2", x_adv, {"median_l2": _median_l2(x_adv, x)}))
    if "deepfool" in families:
        x_adv = deepfool(model, x, y, progress=progress)
        out.append(("DeepFool", x_adv, {"median_l2": _median_l2(x_adv, x)}))
    return out


def _median_l2(x_adv: Tensor, x: Tensor) -> float:
    return float((x_adv - x).flatten(1).norm(dim=1).median())


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run (options that differ from their defaults)."""
    parts = ["libnet", "evaluate-detectors"]
    if args.quick:
        parts.append("--quick")
    if args.thresholds != DEFAULT_THRESHOLDS:
        parts += ["--thresholds", args.thresholds]
    if args.detectors:
        parts += ["--detectors", *(repr(d) if " " in d else d for d in args.detectors)]
    if args.epsilons:
        parts += ["--epsilons", *(f"{e:g}" for e in args.epsilons)]
    if list(args.attacks) != list(ATTACK_FAMILIES):
        parts += ["--attacks", *args.attacks]
    if args.ood:
        parts += ["--ood", *(repr(o) if " " in o else o for o in args.ood)]
    if not args.adaptive:
        parts.append("--no-adaptive")
    if args.adaptive_lambdas is not None:
        parts += ["--adaptive-lambdas", *(f"{v:g}" for v in args.adaptive_lambdas)]
    if args.adaptive_detectors:
        parts += ["--adaptive-detectors", *(repr(d) if " " in d else d for d in args.adaptive_detectors)]
    for flag, value in (("--adaptive-n", args.adaptive_n), ("--adaptive-steps", args.adaptive_steps),
                        ("--black-box-queries", args.black_box_queries)):
        if value is not None:
            parts += [flag, str(value)]
    if [float(v) for v in args.adaptive_kappas] != [0.0]:
        parts += ["--adaptive-kappas", *(f"{v:g}" for v in args.adaptive_kappas)]
    if args.adaptive_restarts != 1:
        parts += ["--adaptive-restarts", str(args.adaptive_restarts)]
    for flag, value, default in (("--n-attack", args.n_attack, None), ("--fpr", args.fpr, 0.05),
                                 ("--seed", args.seed, 0), ("--cache-dir", args.cache_dir, ".cache"),
                                 ("--out", args.out, os.path.join("runs", "detectors"))):
        if value != default:
            parts += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return " ".join(parts)

def _chosen_detectors(wanted: Sequence[str] | None) -> dict[str, tuple[str, dict[str, Any]]]:
    """The registered detectors plus the MNIST variants, restricted to ``--detectors`` (checked before any work)."""
    specs = registered_detectors(None)
    # the MNIST-specific variants: the convolution layers, where the evidence sits at large epsilon
    specs.update({label: (name, dict(settings)) for label, (name, settings) in MNIST_VARIANTS.items()})
    if not wanted:
        return specs
    from ..detectors import MNIST_CANDIDATES  # development candidates (issue 28): only by name

    specs.update({label: (name, dict(settings)) for label, (name, settings) in MNIST_CANDIDATES.items()})
    chosen = {}
    for want in wanted:
        hits = {l: s for l, s in specs.items() if l == want or (s[0] == want and l not in MNIST_CANDIDATES)}
        if not hits:
            raise ExperimentError(f"--detectors: no registered detector has the label or name {want!r}; "
                                  f"labels: {sorted(specs)}")
        chosen.update(hits)
    return chosen


def run(args: argparse.Namespace) -> int:
    """Run the MNIST default comparison (see the module docstring); bad arguments exit 2 before any work."""
    try:
        plan = _plan(args)
    except (LibnetError, OSError, ValueError) as exc:
        print(f"libnet evaluate-detectors: error: {exc}", file=sys.stderr)
        return 2
    return _run(args, plan)


@dataclass(frozen=True)
class EvaluateDetectorsSettings:
    """One ``libnet evaluate-detectors`` run, checked once when made (:class:`ExperimentError` naming the
    option), made from the command line by ``_plan``.

    Attributes:
        quick: the small run of ``--quick``.
        n_train / epochs: training images and epochs of the net; nb_iter: PGD steps.
        n_attack: clean evaluation images attacked; epsilons: the PGD budgets (pixels).
        fpr: the calibrated false-positive rate.
        thresholds / auto: the library thresholds and ``auto_thresholds`` (:func:`_parse_thresholds`).
        specs: the detectors compared, ``{label: (name, settings)}``.
        budget: the attacks that know the detector (``None``: none).
        adversarial_eps / adversarial_steps / adversarial_epochs: adversarial training (eps 0: none).
        out_dir: the checked run folder.
    """

    quick: bool
    n_train: int
    epochs: int
    nb_iter: int
    n_attack: int
    epsilons: tuple[float, ...]
    fpr: float
    thresholds: Any
    auto: dict[str, Any] | None
    specs: dict[str, tuple[str, dict[str, Any]]]
    budget: AdaptiveBudget | None
    out_dir: Path
    adversarial_eps: float = 0.0
    adversarial_steps: int = 1
    adversarial_epochs: int = 10

    def __post_init__(self) -> None:
        if not (0.0 <= self.adversarial_eps <= 1.0) or self.adversarial_steps < 1 or self.adversarial_epochs < 1:
            raise ExperimentError(f"--adversarial-training must lie in [0, 1], --adversarial-steps and "
                                  f"--adversarial-epochs be >= 1; got {self.adversarial_eps}, "
                                  f"{self.adversarial_steps}, {self.adversarial_epochs}")
        if self.n_attack < 1 or any(not (0 < e <= 1) for e in self.epsilons):
            raise ExperimentError(f"--n-attack must be >= 1 and --epsilons in (0, 1], got {self.n_attack}, "
                                  f"{list(self.epsilons)}")
        if not 0.0 < self.fpr < 1.0:
            raise ExperimentError(f"--fpr must lie in the open interval (0, 1), got {self.fpr}")
        check_budget_detectors(self.budget, list(self.specs))


def _plan(args: argparse.Namespace) -> EvaluateDetectorsSettings:
    """Every argument checked, before any data is read or any model trained."""
    from .mnist import LAYERS, STANDARD_EPSILONS

    quick = bool(args.quick)
    n_train, epochs, nb_iter = (600, 1, 10) if quick else (4000, 5, 40)
    if args.adversarial_training > 0 and not quick:
        epochs = args.adversarial_epochs
    n_attack = args.n_attack if args.n_attack is not None else (48 if quick else 500)
    epsilons = tuple(args.epsilons) if args.epsilons else ((0.1, 0.3) if quick else tuple(STANDARD_EPSILONS))
    adversarial = {"adversarial_eps": args.adversarial_training, "adversarial_steps": args.adversarial_steps,
                   "adversarial_epochs": args.adversarial_epochs}
    thresholds, auto = _parse_thresholds(args.thresholds, LAYERS)
    specs = _chosen_detectors(args.detectors)
    budget = _budget(args, quick)
    from .ood import OOD_ALIASES, OOD_SET_NAMES

    unknown = sorted(set(args.ood or ()) - set(OOD_SET_NAMES) - set(OOD_ALIASES))
    if unknown:
        raise ExperimentError(f"unknown --ood sets {unknown}; choose among {list(OOD_SET_NAMES)}")
    if args.ood:  # the registry's names (an old name is accepted)
        args.ood = list(dict.fromkeys(OOD_ALIASES.get(name, name) for name in args.ood))
    settings = EvaluateDetectorsSettings(quick, n_train, epochs, nb_iter, n_attack, epsilons, args.fpr, thresholds,
                                         auto, specs, budget, Path(args.out), **adversarial)
    # the run is staged beside the folder and swapped in when complete
    return replace(settings, out_dir=check_run_folder(args.out))


def _budget(args: argparse.Namespace, quick: bool) -> AdaptiveBudget | None:
    """The sizes of the attacks that know the detector, checked
    (:func:`~libnet_plugin.experiments.threat_models.adaptive_budget`); None with ``--no-adaptive``."""
    return adaptive_budget(args, quick=quick, enabled=bool(args.adaptive),
                           off="size the attacks that know the detector, which --no-adaptive skips; drop one or "
                               "the other")


def _run(args: argparse.Namespace, plan: EvaluateDetectorsSettings) -> int:
    quick, n_train, epochs, nb_iter, n_attack = plan.quick, plan.n_train, plan.epochs, plan.nb_iter, plan.n_attack
    epsilons, thresholds, auto, budget = list(plan.epsilons), plan.thresholds, plan.auto, plan.budget
    out_dir = plan.out_dir
    from .data import load_mnist_default
    from .mnist import LAYERS
    from .models import MnistNet, load_state_dict_checked

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    timer = StageTimer(log)
    torch.manual_seed(args.seed)
    with timer.stage("data"):
        x_tr, y_tr, x_te, y_te = load_mnist_default(seed=args.seed, n_train=n_train, cache_dir=args.cache_dir)
        if quick:
            x_te, y_te = x_te[:200], y_te[:200]
        half = x_te.shape[0] // 2
        x_cal, x_eval, y_eval = x_te[:half], x_te[half:], y_te[half:]
    with timer.stage("model"):
        net_norm, model_info = mnist_model(x_tr, y_tr, args.seed, epochs, args.cache_dir, args.progress, log,
                                           adversarial_eps=args.adversarial_training,
                                           adversarial_steps=args.adversarial_steps)
        if args.adversarial_training > 0:
            model_info = {**model_info, "adversarial_training": {"eps": args.adversarial_training,
                                                                 "steps": args.adversarial_steps, "epochs": epochs}}
        model = load_state_dict_checked(MnistNet(normalize=True), net_norm.state_dict()).eval()
        accuracy = float((model(x_eval).argmax(1) == y_eval).float().mean())
    attacked: dict[str, Tensor] = {}
    attack_info: dict[str, Any] = {}
    with timer.stage("attacks"):
        xa, ya = x_eval[:n_attack], y_eval[:n_attack]
        with torch.no_grad():
            correct = model(xa).argmax(1) == ya  # the attacked images a successful attack starts from
        # PGD is also the non-adaptive attacker of the threat models, so it runs when either needs it
        need_pgd = "pgd" in args.attacks or budget is not None
        adv = (_cached_attacks(model, xa, ya, epsilons, nb_iter, args.seed, args.cache_dir, bool(args.progress), log)
               if need_pgd else {})
        for eps in epsilons if "pgd" in args.attacks else ():
            x_adv, source = adv[eps]
            with torch.no_grad():
                keep = correct & (model(x_adv).argmax(1) != ya)
            name = f"PGD eps={eps:g}"
            attacked[name] = x_adv[keep]
            attack_info[name] = {"attacked": int(xa.shape[0]), "successful": int(keep.sum()), "nb_iter": nb_iter,
                                 "source": source}
            log(f"{name}: {int(keep.sum())} successful attacks of {xa.shape[0]} ({source})")
        for name, x_adv, info in _other_attacks(model, xa, ya, epsilons, args.attacks, bool(args.progress)):
            with torch.no_grad():
                keep = correct & (model(x_adv).argmax(1) != ya)
            attacked[name] = x_adv[keep]
            attack_info[name] = {"attacked": int(xa.shape[0]), "successful": int(keep.sum()), **info}
            log(f"{name}: {int(keep.sum())} successful attacks of {xa.shape[0]}")
    from .ood import ood_sets

    n_ood = 100 if quick else 500
    ood = ood_sets(x_eval, n=n_ood, seed=args.seed)
    if args.ood:
        ood = {k: v for k, v in ood.items() if k in args.ood}
    threats = None
    if budget is not None:
        ok = correct.nonzero().flatten()[:budget.n]
        plain = {eps: adv[eps][0][ok] for eps in epsilons}
        threats = ThreatModels(xa[ok], ya[ok], plain, x_tr[:2000], budget, log)
    with timer.stage("library network"):
        # layers a chosen detector names besides the net's own (layer specs such as "fc1:input") are probed too;
        # every other detector keeps to the net's own layers
        specs = plan.specs
        extra = _extra_layers(specs)
        if extra:
            if isinstance(thresholds, dict):
                raise ExperimentError(f"detectors name layers {extra} besides {list(LAYERS)}: use --thresholds auto")
            specs = {k: (n, s if "layers" in s or n not in DETECTORS
                         or "layers" not in inspect.signature(DETECTORS[n]).parameters
                         else {**s, "layers": list(LAYERS)}) for k, (n, s) in specs.items()}
        net = LibraryNetwork(model, list(LAYERS) + extra, thresholds=thresholds, auto_thresholds=auto).fit(
            x_tr, progress=args.progress)
    with staged_output(out_dir) as stage:
        with timer.stage("detectors"):
            res = evaluate_detectors(net, (x_tr, y_tr), x_eval, attacked, ood, detectors=specs, calibration=x_cal,
                                     out_dir=stage, fpr=args.fpr, log=log, attack_detector=threats)
        note = _write_report(args, res, stage, plan, accuracy, model_info, attack_info, net, timer)
    print(res["table_markdown"])
    print("\n" + note)
    print(f"best library-based detector: {res['best_library_based']}; files in {out_dir}")
    return 0


def _extra_layers(specs: Mapping[str, tuple[str, Mapping[str, Any]]]) -> list[str]:
    """The layers the chosen detectors name (``layers``, ``gaussian_layers``) besides the MNIST net's own.

    Example:
        >>> _extra_layers({"x": ("library-gaussian-fusion", {"layers": ["conv1"], "gaussian_layers": ["fc1:input"]})})
        ['fc1:input']
    """
    from .mnist import LAYERS

    return list(dict.fromkeys(layer for _, settings in specs.values() for key in ("layers", "gaussian_layers")
                              for layer in settings.get(key) or () if layer not in LAYERS))


def _write_report(args: argparse.Namespace, res: dict[str, Any], stage: Path, plan: EvaluateDetectorsSettings,
                  accuracy: float, model_info: Any, attack_info: dict[str, Any], net: LibraryNetwork,
                  timer: StageTimer) -> str:
    """Write detectors.md and detectors.json into the staging folder; return the run's one-paragraph note."""
    out_dir, quick, n_train, epochs = plan.out_dir, plan.quick, plan.n_train, plan.epochs
    command = _command(args)
    res["run"] = {"command": command, "quick": quick, "seed": args.seed, "n_train": n_train, "epochs": epochs,
                  "model_accuracy_eval_half": accuracy, "model": model_info, "attacks": attack_info,
                  "thresholds_spec": args.thresholds, "auto_thresholds": getattr(net, "auto_thresholds_report_", None),
                  "timings_s": timer.as_dict(), "environment": environment_info()}
    s = res["settings"]
    adv = model_info.get("adversarial_training") if isinstance(model_info, dict) else None
    trained = ""
    if adv:
        how = "FGSM from a random start" if adv["steps"] == 1 else f"{adv['steps']}-step PGD"
        epochs = f"{adv['epochs']} epoch" + ("s" if adv["epochs"] != 1 else "")
        trained = f" The net was trained adversarially ({how} at eps {adv['eps']:g}, {epochs})."
    note = (f"Command: `{command}`.{trained} Calibration: {s['n_calibration']} clean images at FPR {s['fpr']:g}; held-out "
            f"clean images: {s['n_clean']}; model accuracy on them {accuracy:.3f}. Library sizes: {s['library_sizes']} "
            f"({s['n_train']} training images). Model forward: {res['forward_ms_per_1000']:.1f} ms per 1,000 inputs "
            f"(batch {s['batch_size']}). Successful attacks: "
            + ", ".join(f"{k} {v['successful']}/{v['attacked']}" for k, v in attack_info.items()) + ".")
    res.update(relocate(to_jsonable(res), stage, out_dir))  # paths name the folder the run is swapped into
    titles = {"auroc": "AUROC", "tpr_at_fpr": f"TPR at {s['fpr']:g} FPR", "fpr_at_95tpr": "FPR at 95% TPR (lower is "
              "better)", "aupr": "AUPR (attacked / out-of-domain inputs positive)",
              "auroc_vs_best_baseline": "AUROC minus the best baseline's (the best on each set of: "
              + ", ".join(label for label, e in res["detectors"].items() if not e.get("library_based"))
              + "), with its paired 95% bootstrap interval, for the library-based detectors"}
    parts = [res["table_markdown"], note]
    parts += [f"### {titles[m]}\n\n{t}" for m, t in res["metric_tables"].items()]
    evasion = comparison_evasion_markdown(res)
    if evasion is not None:
        parts.append(evasion)
    write_text_atomic(stage / "detectors.md", "\n\n".join(parts) + "\n")
    write_json_atomic(stage / "detectors.json", res)
    return note
