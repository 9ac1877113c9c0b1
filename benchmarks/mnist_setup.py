"""The MNIST default for the benchmarks: data, the trained net (cached), standard-protocol attacks (cached).

The net is the one ``libnet reproduce mnist`` uses (the same training settings and the same cache file
in ``.cache/``), so the numbers here describe the model of the MNIST report. The attacks are L-inf PGD in
pixel space (docs/method.md section 9, standard protocol) on the first test images, cached beside it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from libnet_plugin.errors import LibnetError
from libnet_plugin.experiments.data import MNIST_MEAN, MNIST_STD, load_mnist_default
from libnet_plugin.experiments.mnist import (
    CPL_SETS,
    LAYERS,
    STANDARD_EPSILONS,
    MnistSettings,
    cached_or_trained_mnist_net,
)
from libnet_plugin.experiments.models import MnistNet, predict_labels
from libnet_plugin.experiments.protocols import (
    AttackSet,
    ProtocolSettings,
    generate_attack_sets,
    load_attack_sets,
    save_attack_sets,
)

__all__ = ["MnistBench", "prepare_mnist", "S1", "LAYERS"]

#: the seed's CPL threshold set S1 (CN1 .55, CN2 .70, FC1 .75, FC2 .80)
S1: dict[str, float] = dict(CPL_SETS["S1"])


@dataclass
class MnistBench:
    """Everything the MNIST benchmarks need, on ``device``.

    Attributes:
        model: ``MnistNet(normalize=True)``: takes pixels in [0, 1], evaluation mode.
        x_train / y_train / x_test / y_test: the MNIST default split (4,000 / 1,000 images).
        attacks: ``{epsilon: (x_adv, keep)}`` for the first ``n_attack`` test images; ``keep`` marks the
            inputs the model gets right whose attack succeeds (the standard protocol's selection).
        info: where the weights and attacks came from, and the settings.
    """

    model: torch.nn.Module
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    attacks: dict[float, tuple[Tensor, Tensor]]
    info: dict


def _digest(*tensors: Tensor, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def prepare_mnist(device: torch.device, *, quick: bool = False, cache_dir: str | Path = ".cache",
                  log: Callable[[str], None] = print) -> MnistBench:
    """Load the data, the cached (or freshly trained) net and the cached (or fresh) attacks.

    Args:
        device: where the model and tensors go.
        quick: 2 training epochs instead of 5, 100 attacked images and 10 PGD steps instead of 500 and 40.
        cache_dir: the weights and attack cache (created if needed).
        log: progress messages.
    """
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    settings = MnistSettings.default_run(seed=0, epochs=2 if quick else 5)
    x_tr, y_tr, x_te, y_te = load_mnist_default(seed=settings.seed, n_train=4000, cache_dir=cache)
    net, weights_info = cached_or_trained_mnist_net(x_tr, y_tr, settings, cache, False, log)
    model = MnistNet(normalize=True)
    model.load_state_dict(net.state_dict())
    model = model.to(device).eval()
    n_attack, nb_iter = (100, 10) if quick else (500, 40)
    x_att, y_att = x_te[:n_attack], y_te[:n_attack]
    key = _digest(*net.state_dict().values(), x_att, extra=f"standard-{nb_iter}-{STANDARD_EPSILONS}-seed1")
    path = cache / f"bench-attacks-{key}.safetensors"
    sets: list[AttackSet] | None = None
    if path.is_file():
        try:
            sets, _ = load_attack_sets(path)
            attack_source = "cache"
        except (LibnetError, OSError) as exc:
            log(f"the cached attacks {str(path)!r} are unreadable ({exc}); attacking again")
    if sets is None:
        log(f"[mnist] standard-protocol PGD-{nb_iter} on {n_attack} test images at epsilon {STANDARD_EPSILONS} ...")
        protocol = ProtocolSettings("standard", list(STANDARD_EPSILONS), n_attack, nb_iter=nb_iter, seed=1,
                                    backend="torch")
        sets = generate_attack_sets(protocol, net.to(device), x_att, y_att, mean=MNIST_MEAN, std=MNIST_STD,
                                    progress=False)
        save_attack_sets(path, sets, {"n_images": n_attack, "nb_iter": nb_iter, "seed": 1})
        attack_source = "computed"
    clean_ok = predict_labels(model, x_att.to(device), batch_size=500).cpu() == y_att
    attacks = {}
    for s in sets:
        x_adv = s.x_adv.to(device)
        attacks[s.epsilon] = (x_adv, clean_ok & (predict_labels(model, x_adv, batch_size=500).cpu() != y_att))
    info = {"weights": weights_info, "epochs": settings.epochs, "n_train": int(x_tr.shape[0]),
            "n_test": int(x_te.shape[0]), "attacks": {"protocol": "standard", "n_images": n_attack, "nb_iter": nb_iter,
                                                      "epsilons": list(STANDARD_EPSILONS), "source": attack_source,
                                                      "kept": {e: int(k.sum()) for e, (_, k) in attacks.items()}}}
    return MnistBench(model, x_tr.to(device), y_tr.to(device), x_te.to(device), y_te.to(device), attacks, info)
