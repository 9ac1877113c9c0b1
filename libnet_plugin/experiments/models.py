"""The two models of the seed paper, written for libnet-plugin, plus loading and training helpers.

* :class:`MnistNet`: the 2019 PyTorch MNIST example net (conv1, conv2, fc1, fc2).
* :class:`ResNet44`: the CIFAR-10 ResNet-44 with option-A (zero-padding) shortcuts, whose module names
  and ``state_dict`` keys match the widely used public ``pytorch_resnet_cifar10`` checkpoints.
* :class:`Normalize`: per-channel input normalisation as a module.

Both nets take *normalised* inputs by default, like the seed. With ``normalize=True`` they take pixels in
``[0, 1]`` and normalise inside ``forward`` using non-persistent buffers, so module names (``conv1`` ...)
and ``state_dict`` keys are the same either way and weights move freely between the two variants.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LibnetError, SaveFormatError
from .data import CIFAR_MEAN, CIFAR_STD, MNIST_MEAN, MNIST_STD, batches

__all__ = [
    "Normalize",
    "MnistNet",
    "CifarResNet",
    "ResNet44",
    "StateDictMismatchError",
    "load_state_dict_checked",
    "train_mnist_net",
    "check_adversarial",
    "predict_labels",
]


class StateDictMismatchError(LibnetError, ValueError):
    """A state_dict does not fit a model: missing or unexpected keys, or a tensor of the wrong shape."""


def _stats_tensor(values: float | Sequence[float], name: str) -> torch.Tensor:
    """Mean / std values as a float32 tensor shaped ``[1, C, 1, 1]`` for broadcasting over NCHW."""
    t = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ValueError(f"{name} must be a non-empty sequence of finite numbers, got {values!r}")
    if name == "std" and (t <= 0).any():
        raise ValueError(f"std must be positive, got {values!r}")
    return t.reshape(1, -1, 1, 1)


def _register_input_stats(module: nn.Module, mean, std) -> None:
    """Give ``module`` non-persistent ``input_mean`` / ``input_std`` buffers (not in its state_dict)."""
    module.register_buffer("input_mean", _stats_tensor(mean, "mean"), persistent=False)
    module.register_buffer("input_std", _stats_tensor(std, "std"), persistent=False)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with ``mean`` and ``std`` held as buffers.

    Lets a model that expects normalised input be fed pixels in ``[0, 1]``, for example
    ``nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), net)``. The buffers are not persistent, so the
    module adds nothing to a ``state_dict``.

    Args:
        mean: one value, or one per channel.
        std: one positive value, or one per channel.

    Example:
        >>> norm = Normalize(0.5, 0.25)
        >>> norm(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
    """

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        super().__init__()
        _register_input_stats(self, mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std

    def extra_repr(self) -> str:
        return f"mean={self.input_mean.flatten().tolist()}, std={self.input_std.flatten().tolist()}"


class _InputStatsMixin:
    """Shared by the nets: optional normalisation of pixel inputs inside ``forward``."""

    normalize: bool
    input_mean: torch.Tensor
    input_std: torch.Tensor

    def _init_input_stats(self, normalize: bool, mean, std) -> None:
        self.normalize = bool(normalize)
        _register_input_stats(self, mean, std)  # type: ignore[arg-type]

    def _maybe_normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) / self.input_std if self.normalize else x


class MnistNet(_InputStatsMixin, nn.Module):
    """The 2019 PyTorch-example MNIST net used by the seed paper.

    ``conv1`` (1->20, 5x5) -> ReLU -> 2x2 max-pool -> ``conv2`` (20->50, 5x5) -> ReLU -> 2x2 max-pool ->
    flatten (800) -> ``fc1`` (800->500) -> ReLU -> ``fc2`` (500->10) -> log-softmax. ReLU and pooling are
    functions, so the probed modules are exactly ``conv1``, ``conv2``, ``fc1``, ``fc2`` (HAP sizes 11520,
    3200, 500, 10).

    Args:
        normalize: if True, ``forward`` takes pixels in ``[0, 1]`` and normalises them with
            ``MNIST_MEAN`` / ``MNIST_STD``; if False (the seed's convention) it takes normalised input.

    Shape:
        input ``[B, 1, 28, 28]``, output ``[B, 10]`` log-probabilities.

    Example:
        >>> net = MnistNet()
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, normalize: bool = False) -> None:
        super().__init__()
        self._init_input_stats(normalize, MNIST_MEAN, MNIST_STD)
        self.conv1 = nn.Conv2d(1, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.fc1 = nn.Linear(4 * 4 * 50, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._maybe_normalize(x)
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        return F.log_softmax(self.fc2(x), dim=1)


class _PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (no parameters)."""

    def __init__(self, extra_channels: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = self.extra_channels // 2
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, self.extra_channels - pad))


class _BasicBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers with an identity or option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            if stride != 2 or planes < in_planes:
                raise ValueError("option-A shortcuts only halve the resolution and add channels")
            self.shortcut: nn.Module = _PadShortcut(planes - in_planes)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(_InputStatsMixin, nn.Module):
    """CIFAR ResNet (He et al. 2016, section 4.2) with option-A shortcuts: depth ``6 n + 2``.

    Module names follow the public ``pytorch_resnet_cifar10`` implementation, so its checkpoints load
    (after :func:`load_state_dict_checked` strips DataParallel's ``module.`` prefix): ``conv1``, ``bn1``,
    ``layer1`` .. ``layer3`` (each a sequence of blocks with ``conv1``/``bn1``/``conv2``/``bn2``), and
    ``linear``.

    Args:
        num_blocks: blocks per stage (16, 32 and 64 channels).
        num_classes: size of the output.
        normalize: if True, ``forward`` takes pixels in ``[0, 1]`` and normalises them with ``CIFAR_MEAN``
            / ``CIFAR_STD``; if False it takes normalised input.

    Shape:
        input ``[B, 3, 32, 32]``, output ``[B, num_classes]`` logits.
    """

    def __init__(
        self,
        num_blocks: Sequence[int] = (7, 7, 7),
        num_classes: int = 10,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if len(num_blocks) != 3 or any(int(n) < 1 for n in num_blocks):
            raise ValueError(f"num_blocks must be three positive ints, got {num_blocks!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self._init_input_stats(normalize, CIFAR_MEAN, CIFAR_STD)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        planes_in = 16
        stages = []
        for planes, stride, n in zip((16, 32, 64), (1, 2, 2), num_blocks):
            blocks = []
            for i in range(int(n)):
                blocks.append(_BasicBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._maybe_normalize(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


class ResNet44(CifarResNet):
    """ResNet-44 for CIFAR-10: 3 stages of 7 basic blocks (16/32/64 channels), about 0.66 M parameters.

    Probed layers in the seed: ``conv1`` (before its batch norm), ``layer1``, ``layer2``, ``layer3`` and
    ``linear`` (HAP sizes 16384, 16384, 8192, 4096, 10).

    Args:
        num_classes: size of the output.
        normalize: if True, take pixels in ``[0, 1]`` and normalise inside ``forward``.

    Example:
        >>> net = ResNet44().eval()
        >>> net(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """

    def __init__(self, num_classes: int = 10, normalize: bool = False) -> None:
        super().__init__((7, 7, 7), num_classes=num_classes, normalize=normalize)


def _read_state_dict(path_or_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(path_or_dict, Mapping):
        obj = path_or_dict
    elif isinstance(path_or_dict, (str, os.PathLike)):
        if not os.path.isfile(path_or_dict):
            raise FileNotFoundError(f"no weights file at {os.fspath(path_or_dict)!r}")
        try:
            obj = torch.load(path_or_dict, map_location="cpu", weights_only=True)
        except Exception as exc:  # a junk file makes torch.load raise almost anything (IndexError, KeyError...)
            raise SaveFormatError(
                f"cannot read a state_dict from {os.fspath(path_or_dict)!r} (not a torch.save file of weights, "
                f"or corrupted): {type(exc).__name__}: {exc}"
            ) from exc
    else:
        raise TypeError(
            f"expected a file path or a state_dict mapping, got {type(path_or_dict).__name__}"
        )
    if not isinstance(obj, Mapping):
        raise SaveFormatError(f"not a state_dict: the file holds a {type(obj).__name__}, not a mapping of names to "
                              "tensors")
    # training checkpoints often wrap the weights: {"state_dict": {...}, "epoch": ...}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise StateDictMismatchError(f"not a state_dict: entry {bad[0]!r} is not a named tensor")
    return obj


def load_state_dict_checked(model: nn.Module, path_or_dict) -> nn.Module:
    """Load weights into ``model`` strictly, with a readable error when they do not fit.

    Accepts a file saved with ``torch.save`` (read with ``torch.load(weights_only=True)``), a state_dict,
    or a checkpoint dict holding one under ``"state_dict"``. A ``module.`` prefix on every key (saved from
    ``nn.DataParallel``) is stripped. Missing batch-norm ``num_batches_tracked`` counters (checkpoints
    from old PyTorch versions) are tolerated, as ``torch`` itself does.

    Args:
        model: the module to load into (modified in place).
        path_or_dict: path to a ``.pt``/``.th`` file, or a mapping of names to tensors.

    Returns:
        ``model``, for chaining.

    Raises:
        StateDictMismatchError: (a ``ValueError``) naming the first missing or unexpected key (with the
            counts), or the first key whose shape differs, with both shapes.
        SaveFormatError: (a ``ValueError``) if the file cannot be read as weights.
        FileNotFoundError: if the path does not exist.

    Example:
        >>> net = load_state_dict_checked(ResNet44(), "resnet44-014dd654.th")  # doctest: +SKIP
    """
    state = dict(_read_state_dict(path_or_dict))
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}")
        raise StateDictMismatchError(
            f"state_dict does not match {type(model).__name__}: " + "; ".join(parts)
        )
    for key, tensor in expected.items():
        if key in state and state[key].shape != tensor.shape:
            raise StateDictMismatchError(
                f"state_dict does not match {type(model).__name__}: {key!r} has shape "
                f"{list(state[key].shape)} in the weights but {list(tensor.shape)} in the model"
            )
    model.load_state_dict(state, strict=True)
    return model


@torch.no_grad()
def predict_labels(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Arg-max class of ``model`` on ``x``, in eval mode, batched. The model's mode is restored.

    Args:
        model: a classifier returning ``[B, C]`` scores.
        x: inputs ``[N, ...]`` in whatever space the model expects.
        batch_size: items per forward pass.

    Returns:
        ``LongTensor[N]`` on ``x``'s device.

    Example:
        >>> predict_labels(MnistNet(), torch.zeros(3, 1, 28, 28)).shape
        torch.Size([3])
    """
    was_training = model.training
    model.eval()
    try:
        out = [model(xb).argmax(dim=1) for xb, _ in batches(x, batch_size=batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def train_mnist_net(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 1e-3,
    optimizer: Literal["adam", "sgd"] = "adam",
    progress: bool = True,
    adversarial_eps: float = 0.0,
    adversarial_steps: int = 1,
) -> MnistNet:
    """Train :class:`MnistNet` on MNIST pixels, deterministically for a given seed.

    The inputs are normalised with ``MNIST_MEAN`` / ``MNIST_STD`` before training, and the returned net
    takes normalised input (``normalize=False``, the seed's convention); its weights also fit
    ``MnistNet(normalize=True)`` for pixel input. Initialisation uses ``torch.manual_seed(seed)`` and
    the per-epoch shuffling a separate ``torch.Generator`` seeded with ``seed``.

    Args:
        x_train: pixels ``[N, 1, 28, 28]`` in ``[0, 1]``.
        y_train: int labels ``[N]`` in 0..9.
        epochs: passes over the data.
        seed: seed of initialisation and shuffling.
        batch_size: mini-batch size.
        lr: learning rate.
        optimizer: ``"adam"`` (default) or ``"sgd"`` (momentum 0.5, as the PyTorch example).
        progress: show a tqdm progress bar.
        adversarial_eps: ``> 0`` trains adversarially (Madry et al. 2018): every batch is replaced by an
            L-inf attack of radius ``adversarial_eps`` (pixel units) on the current net. The radius grows
            linearly from 0 over the first half of the epochs (small nets diverge when started at the
            full radius), then stays.
        adversarial_steps: steps of that attack from a uniform random start: ``1`` is FGSM with step
            ``1.25 * eps`` (Wong et al. 2020, "Fast is better than free"), more is PGD with step
            ``2.5 * eps / steps``.

    Returns:
        The trained net, in eval mode, on CPU or ``x_train``'s device.

    Raises:
        ValueError: for inputs of the wrong shape, outside ``[0, 1]``, or bad hyper-parameters.

    Example:
        >>> from libnet_plugin.experiments.data import load_mnist_default
        >>> x_tr, y_tr, x_te, y_te = load_mnist_default()
        >>> net = train_mnist_net(x_tr, y_tr, epochs=3, progress=False)  # doctest: +SKIP
    """
    if x_train.ndim != 4 or tuple(x_train.shape[1:]) != (1, 28, 28):
        raise ValueError(f"x_train must be shaped [N, 1, 28, 28], got {list(x_train.shape)}")
    if y_train.shape != (x_train.shape[0],):
        raise ValueError(f"y_train must be shaped [{x_train.shape[0]}], got {list(y_train.shape)}")
    if x_train.numel() and (float(x_train.min()) < 0.0 or float(x_train.max()) > 1.0):
        raise ValueError("x_train must hold pixels in [0, 1] (normalisation is applied here)")
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(f"need epochs >= 1, batch_size >= 1, lr > 0; got {epochs}, {batch_size}, {lr}")
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    check_adversarial(adversarial_eps, adversarial_steps)
    from tqdm.auto import tqdm

    device = x_train.device
    torch.manual_seed(seed)
    net = MnistNet().to(device)
    x_norm = (x_train.float() - MNIST_MEAN) / MNIST_STD
    y_all = y_train.to(device=device, dtype=torch.long)
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(net.parameters(), lr=lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    gen = torch.Generator().manual_seed(seed)
    n = x_norm.shape[0]
    steps = (n + batch_size - 1) // batch_size
    net.train()
    ramp = max(1, (epochs * steps) // 2)  # batches over which the adversarial radius grows to its value
    with tqdm(total=epochs * steps, disable=not progress, desc="train MnistNet", unit="batch") as bar:
        for epoch in range(epochs):
            order = torch.randperm(n, generator=gen).to(device)
            for b, (xb, yb) in enumerate(batches(x_norm[order], y_all[order], batch_size=batch_size)):
                if adversarial_eps > 0:
                    eps = adversarial_eps * min(1.0, (epoch * steps + b + 1) / ramp)
                    xb = _linf_attack(net, xb, yb, eps / MNIST_STD, adversarial_steps, gen)
                opt.zero_grad(set_to_none=True)
                loss = F.nll_loss(net(xb), yb)
                loss.backward()
                opt.step()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return net.eval()


def check_adversarial(eps: float, steps: int) -> None:
    """Raise ``ValueError`` unless ``eps`` (the adversarial training radius, pixels) lies in ``[0, 1]`` and
    ``steps`` is an integer >= 1 (the settings of :func:`train_mnist_net`'s adversarial training)."""
    if not (isinstance(eps, (int, float)) and 0.0 <= eps <= 1.0) or isinstance(steps, bool) or \
            not isinstance(steps, int) or steps < 1:
        raise ValueError(f"need adversarial_eps in [0, 1] and adversarial_steps an integer >= 1; got {eps!r}, "
                         f"{steps!r}")


def _linf_attack(net: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int,
                 gen: torch.Generator) -> torch.Tensor:
    """L-inf attack of radius ``eps`` on normalised inputs ``x`` (the pixel box mapped through the
    normalisation) from a uniform random start: FGSM with step ``1.25 eps`` for one step, else PGD."""
    lo, hi = (0.0 - MNIST_MEAN) / MNIST_STD, (1.0 - MNIST_MEAN) / MNIST_STD
    step = 1.25 * eps if steps == 1 else 2.5 * eps / steps
    start = (torch.rand(x.shape, generator=gen) * 2.0 - 1.0).to(x) * eps
    adv = (x + start).clamp(lo, hi)
    for _ in range(steps):
        adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.nll_loss(net(adv), y), adv)
        adv = torch.minimum(torch.maximum(adv.detach() + step * grad.sign(), x - eps), x + eps).clamp(lo, hi)
    return adv.detach()
