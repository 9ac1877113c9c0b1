"""Training recipe for the CIFAR-10 ResNet-44, written in plain torch (no torchvision).

The recipe is the standard one of He et al. (2016, section 4.2) as used by the public
``pytorch_resnet_cifar10`` checkpoints: SGD with momentum 0.9, learning rate 0.1, weight decay 1e-4,
batch 128, random crop (zero padding 4) and horizontal flip, and a step schedule (learning rate / 10 at
50 % and 75 % of the epochs) or a cosine one. Inputs are pixels in ``[0, 1]``; the net normalises them
with ``CIFAR_MEAN`` / ``CIFAR_STD`` inside ``forward`` during training, and the saved weights fit both
``ResNet44(normalize=True)`` (pixel input) and ``ResNet44()`` (normalised input), since the normalisation
buffers are not part of the ``state_dict``.

* :func:`random_crop_flip`: the augmentation, vectorised over a batch, on any device.
* :func:`train_resnet44`: train a ResNet-44 from scratch, deterministically for a seed on the CPU.
* :func:`load_or_train_resnet44`: the same, cached in a weights file keyed by data and settings.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from .._validate import check_int
from ..serialization import atomic_write_bytes
from .models import ResNet44, load_state_dict_checked, predict_labels

__all__ = [
    "TrainConfig",
    "random_crop_flip",
    "train_resnet44",
    "evaluate_accuracy",
    "weights_cache_path",
    "save_weights",
    "load_or_train_resnet44",
]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train_resnet44` (defaults: the standard CIFAR ResNet recipe).

    Attributes:
        epochs: passes over the training data (the public checkpoints used 200).
        batch_size: images per SGD step.
        lr: initial learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty on all parameters.
        schedule: ``"step"`` (learning rate divided by 10 at 50 % and 75 % of the steps) or ``"cosine"``
            (cosine annealing to 0 over all steps).
        warmup_epochs: epochs of linear warm-up from ``lr / 10`` (0 = none; the original recipe used a
            0.01 warm-up only for ResNet-110).
        crop_padding: zero padding of the random crop, in pixels (0 turns cropping off).
        flip: random horizontal flips.
        seed: seed of initialisation, shuffling and augmentation.
    """

    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: Literal["step", "cosine"] = "step"
    warmup_epochs: int = 0
    crop_padding: int = 4
    flip: bool = True
    seed: int = 0

    def validate(self) -> TrainConfig:
        """Raise ``ValueError`` naming the first bad setting; return ``self``."""
        ints = {"epochs": 1, "batch_size": 1, "warmup_epochs": 0, "crop_padding": 0}
        for name, low in ints.items():
            check_int(getattr(self, name), name, minimum=low)
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.schedule not in ("step", "cosine"):
            raise ValueError(f"schedule must be 'step' or 'cosine', got {self.schedule!r}")
        if self.warmup_epochs >= self.epochs and self.warmup_epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be below epochs ({self.epochs})")
        return self


def random_crop_flip(
    x: torch.Tensor,
    padding: int = 4,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, independently per image.

    The same as torchvision's ``RandomCrop(size, padding=padding)`` followed by
    ``RandomHorizontalFlip()`` on pixel tensors (zero fill), done for the whole batch at once with
    gathers, on the batch's device. Random numbers are drawn on the CPU from ``generator``, so the
    result for a seed does not depend on the device.

    Args:
        x: images ``[B, C, H, W]``.
        padding: zero padding on each side before cropping back to ``H x W``; 0 disables cropping.
        flip: mirror each image left-right with probability 1/2.
        generator: CPU generator for the offsets and flips (default: torch's global one).

    Returns:
        A new tensor of the same shape, dtype and device as ``x``.

    Raises:
        ValueError: if ``x`` is not 4-dimensional or ``padding`` is negative.

    Example:
        >>> x = torch.arange(16.).reshape(1, 1, 4, 4)
        >>> out = random_crop_flip(x, padding=1, generator=torch.Generator().manual_seed(0))
        >>> out.shape
        torch.Size([1, 1, 4, 4])
    """
    if x.dim() != 4:
        raise ValueError(f"expected images of shape [B, C, H, W], got {list(x.shape)}")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding!r}")
    b, _, h, w = x.shape
    out = x
    if padding and b:
        padded = F.pad(x, (padding, padding, padding, padding))
        off = torch.randint(0, 2 * padding + 1, (2, b), generator=generator).to(x.device)
        rows = off[0, :, None] + torch.arange(h, device=x.device)  # [B, H]
        cols = off[1, :, None] + torch.arange(w, device=x.device)  # [B, W]
        batch_idx = torch.arange(b, device=x.device)[:, None, None]
        # advanced indexing around the channel slice puts the channel dimension last: [B, H, W, C]
        out = padded.permute(0, 2, 3, 1)[batch_idx, rows[:, :, None], cols[:, None, :]]
        out = out.permute(0, 3, 1, 2).contiguous()
    if flip and b:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(mask[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()


def _lr_at(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Learning rate of SGD step ``step`` (0-based) out of ``total``."""
    warm = cfg.warmup_epochs * steps_per_epoch
    if step < warm:
        return cfg.lr * (0.1 + 0.9 * step / warm)
    if cfg.schedule == "cosine":
        t = (step - warm) / max(1, total - warm)
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * t))
    frac = step / total
    return cfg.lr * (0.1 ** (int(frac >= 0.5) + int(frac >= 0.75)))


def _check_cifar_inputs(x: torch.Tensor, y: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != (3, 32, 32):
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x_{what} must be CIFAR images shaped [N, 3, 32, 32], got {shape}")
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],):
        shape = list(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y_{what} must be labels shaped [{x.shape[0]}], got {shape}")
    if x.shape[0] == 0:
        raise ValueError(f"x_{what} holds no images")
    if float(x.min()) < 0.0 or float(x.max()) > 1.0:
        raise ValueError(f"x_{what} must hold pixels in [0, 1] (normalisation happens inside the net)")


def train_resnet44(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    config: TrainConfig | None = None,
    *,
    device: torch.device | str | None = None,
    progress: bool | None = True,
) -> ResNet44:
    """Train a :class:`~libnet_plugin.experiments.models.ResNet44` on CIFAR-10 pixels with the standard recipe.

    The whole training set is moved to ``device`` once (50,000 images are 600 MB as float32) and
    augmented there batch by batch with :func:`random_crop_flip`, so no DataLoader or torchvision is
    needed. On the CPU the result is deterministic for ``config.seed``; on a GPU cuDNN may add small
    run-to-run differences.

    Args:
        x_train: pixels ``[N, 3, 32, 32]`` in ``[0, 1]``, in any order.
        y_train: labels ``[N]`` in ``0..9``.
        config: hyper-parameters (default :class:`TrainConfig`, i.e. 200 epochs).
        device: where to train (default: ``x_train``'s device).
        progress: show a tqdm bar with the running loss (``None``: only on a terminal).

    Returns:
        The trained net, ``normalize=True`` (it takes pixels), in eval mode, on ``device``.

    Raises:
        ValueError: for inputs of the wrong shape or range, labels outside 0..9, or bad settings.

    Example:
        >>> from libnet_plugin.experiments.data import load_cifar10
        >>> x_tr, y_tr, x_te, y_te = load_cifar10("~/data")  # doctest: +SKIP
        >>> net = train_resnet44(x_tr, y_tr, TrainConfig(epochs=200), device="cuda")  # doctest: +SKIP
    """
    cfg = (config or TrainConfig()).validate()
    _check_cifar_inputs(x_train, y_train, "train")
    if int(y_train.min()) < 0 or int(y_train.max()) > 9:
        raise ValueError(f"y_train must hold labels in 0..9, got range [{int(y_train.min())}, "
                         f"{int(y_train.max())}]")
    from tqdm.auto import tqdm

    dev = torch.device(device) if device is not None else x_train.device
    torch.manual_seed(cfg.seed)
    net = ResNet44(normalize=True).to(dev)
    x_all = x_train.to(dev, torch.float32)
    y_all = y_train.to(dev, torch.long)
    # no weight decay on batch-norm parameters and biases would be a modern tweak; the public recipe
    # decays every parameter, so this does too
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = x_all.shape[0]
    steps_per_epoch = (n + cfg.batch_size - 1) // cfg.batch_size
    total = cfg.epochs * steps_per_epoch
    step = 0
    net.train()
    with tqdm(total=total, disable=None if progress is None else not progress,
              desc="train ResNet44", unit="step") as bar:
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=gen).to(dev)
            for start in range(0, n, cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                xb = random_crop_flip(x_all[idx], cfg.crop_padding, cfg.flip, generator=gen)
                for group in opt.param_groups:
                    group["lr"] = _lr_at(cfg, step, total, steps_per_epoch)
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(net(xb), y_all[idx])
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training diverged at epoch {epoch + 1}, step {step} "
                                             f"(loss {loss.item()}); lower lr")
                loss.backward()
                opt.step()
                step += 1
                bar.update(1)
                if step % 20 == 0 or step == total:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return net.eval()


@torch.no_grad()
def evaluate_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y`` (eval mode, batched, on the model's device).

    Args:
        model: a classifier taking ``x`` as it is (pixels for ``normalize=True`` nets).
        x: inputs ``[N, ...]``.
        y: labels ``[N]``.
        batch_size: items per forward pass.

    Returns:
        Accuracy in ``[0, 1]``; ``nan`` for empty inputs.

    Example:
        >>> evaluate_accuracy(ResNet44(normalize=True), torch.zeros(0, 3, 32, 32), torch.zeros(0))
        nan
    """
    if x.shape[0] == 0:
        return float("nan")
    dev = next(model.parameters()).device
    pred = predict_labels(model, x.to(dev), batch_size=batch_size)
    return float((pred.cpu() == y.cpu()).float().mean())


def _fingerprint(x: torch.Tensor, y: torch.Tensor) -> str:
    """A short content hash of the training data (order included: it changes the SGD path)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_cache_path(cache_dir: str | os.PathLike, x_train: torch.Tensor, y_train: torch.Tensor,
                       config: TrainConfig) -> Path:
    """The cache file for weights trained on this data with these settings.

    The name holds the number of epochs, the seed and a hash of the data and all settings, e.g.
    ``resnet44_e200_s0_3f2a...pt``; any change to data or recipe gives another file.

    Args:
        cache_dir: folder of cached weights.
        x_train, y_train: the training data as passed to :func:`train_resnet44`.
        config: the recipe.

    Returns:
        The path (which may not exist yet).
    """
    key = hashlib.blake2b(digest_size=6)
    key.update(_fingerprint(x_train, y_train).encode())
    key.update(json.dumps(asdict(config), sort_keys=True).encode())
    return Path(cache_dir) / f"resnet44_e{config.epochs}_s{config.seed}_{key.hexdigest()}.pt"


def save_weights(model: torch.nn.Module, path: str | os.PathLike, **info: float | int | str) -> Path:
    """Save ``{"state_dict": ..., **info}`` with ``torch.save``, atomically (temp file + rename).

    The layout is that of the public ``pytorch_resnet_cifar10`` checkpoints (which add ``epoch`` and
    ``best_prec1``); :func:`~libnet_plugin.experiments.models.load_state_dict_checked` reads it, and so does
    ``torch.load(path, weights_only=True)``.

    Args:
        model: the net to save (moved to the CPU in the file).
        path: destination; its folder is created if needed.
        info: plain numbers or strings stored beside the weights (e.g. ``epochs=200``).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, **info}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_or_train_resnet44(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    config: TrainConfig,
    cache_dir: str | os.PathLike,
    *,
    x_test: torch.Tensor | None = None,
    y_test: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool | None = True,
) -> tuple[ResNet44, Path, dict[str, float | int | str]]:
    """Load cached weights for this data and recipe, or train them and write the cache.

    Args:
        x_train, y_train: training pixels ``[N, 3, 32, 32]`` in ``[0, 1]`` and labels.
        config: the recipe (see :class:`TrainConfig`).
        cache_dir: folder of cached weights (see :func:`weights_cache_path`).
        x_test, y_test: optional test data; its accuracy is stored with fresh weights.
        device: where to train and where the returned net lives.
        progress: show a progress bar while training (``None``: only on a terminal).

    Returns:
        ``(net, path, info)``: the net (``normalize=True``, eval mode, on ``device``), the weights file
        and what is stored beside the weights (``epochs``, ``seed``, ``schedule``, ``n_train``,
        ``test_accuracy`` when test data was given, ``cached``: 1 when read from the cache).

    Example:
        >>> net, path, info = load_or_train_resnet44(x_tr, y_tr, TrainConfig(epochs=1), "runs/cache")  # doctest: +SKIP
    """
    cfg = config.validate()
    dev = torch.device(device) if device is not None else x_train.device
    path = weights_cache_path(cache_dir, x_train, y_train, cfg)
    if path.is_file():
        net = load_state_dict_checked(ResNet44(normalize=True), path).to(dev).eval()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        info = {k: v for k, v in raw.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        return net, path, {**info, "cached": 1}
    net = train_resnet44(x_train, y_train, cfg, device=dev, progress=progress)
    info: dict[str, float | int | str] = {"epochs": cfg.epochs, "seed": cfg.seed, "schedule": cfg.schedule,
                                          "n_train": int(x_train.shape[0])}
    if x_test is not None and y_test is not None:
        info["test_accuracy"] = evaluate_accuracy(net, x_test, y_test)
    save_weights(net, path, **info)
    return net, path, {**info, "cached": 0}
