"""L-infinity PGD attacks and the two evaluation protocols of docs/method.md section 9.

* :func:`pgd_torch`: a torch-only untargeted L-inf PGD with exactly the semantics of advertorch's
  ``LinfPGDAttack`` (same random start, same order of projection and clipping), so both give the same
  adversarial examples from the same start. No advertorch needed.
* :func:`pgd_advertorch`: advertorch's ``LinfPGDAttack`` itself, made importable by
  :func:`libnet_plugin.experiments._advertorch_compat.ensure_advertorch`.
* :func:`attack_paper_protocol`: the seed's protocol, reproduced for comparison only: the attack runs on
  *normalised* tensors but clips to ``[0, 1]`` there (which zeroes the MNIST background), epsilon in
  normalised units, step 0.01, 40 iterations, random start, seed 1.
* :func:`attack_standard_protocol`: the honest protocol: pixel space ``[0, 1]`` with normalisation inside
  the model, step ``2.5 * eps / nb_iter``, random start; keeps only inputs that are classified correctly
  and whose attack succeeds.

All attacks run the model in eval mode with its parameters frozen; the model's mode and its parameters'
``requires_grad`` flags are restored afterwards and no parameter gradients are left behind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._validate import check_int
from .data import batches
from .models import Normalize, predict_labels

__all__ = [
    "PGDSettings",
    "pgd_torch",
    "pgd_advertorch",
    "attack_paper_protocol",
    "attack_standard_protocol",
]

LossSpec = Literal["ce_sum", "ce_mean"] | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Backend = Literal["auto", "torch", "advertorch"]


# --------------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and ``requires_grad=False`` on all parameters for the duration; both restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _loss_fn(loss: LossSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if callable(loss):
        return loss
    if loss == "ce_sum":
        return lambda out, y: F.cross_entropy(out, y, reduction="sum")
    if loss == "ce_mean":
        return lambda out, y: F.cross_entropy(out, y, reduction="mean")
    raise ValueError(f"loss must be 'ce_sum', 'ce_mean' or a callable, got {loss!r}")


def finite_float(name: str, value: float, minimum: float | None = 0.0) -> float:
    """``value`` as a finite float of at least ``minimum`` (None: no bound); TypeError/ValueError naming it."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}") from None
    if not math.isfinite(out) or (minimum is not None and out < minimum):
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return out


def check_xy(x: torch.Tensor, y: torch.Tensor | None, need_y: bool = False) -> None:
    """Check ``x`` is a float tensor ``[N, ...]`` and ``y`` (if given, or required) an int tensor ``[N]``."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor shaped [N, ...]")
    if y is None:
        if need_y:
            raise ValueError("labels y are required")
        return
    if not isinstance(y, torch.Tensor) or y.shape != (x.shape[0],) or y.is_floating_point():
        raise ValueError(
            f"y must be an integer tensor shaped [{x.shape[0]}], got "
            f"{getattr(y, 'dtype', type(y).__name__)} {list(getattr(y, 'shape', []))}"
        )


def check_range(x: torch.Tensor, lo: float, hi: float, what: str) -> None:
    """Raise a ValueError naming ``what`` if ``x`` has values outside ``[lo, hi]`` (1e-6 tolerance)."""
    if x.numel() and (float(x.min()) < lo - 1e-6 or float(x.max()) > hi + 1e-6):
        raise ValueError(f"{what} must lie in [{lo:g}, {hi:g}], got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="img")


def _labels_or_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None,
                           batch_size: int) -> torch.Tensor:
    """Untargeted attacks on ``y=None`` use the model's predictions (as advertorch does)."""
    return predict_labels(model, x, batch_size=batch_size) if y is None else y.to(x.device).long()


def _check_pgd_args(x: torch.Tensor, y: torch.Tensor | None, eps: float, nb_iter: int, batch_size: int,
                    clip_min: float, clip_max: float) -> tuple[float, int, int, float, float]:
    """Validate the arguments both PGD implementations share; return them converted."""
    check_xy(x, y)
    eps = finite_float("eps", eps)
    nb_iter = check_int(nb_iter, "nb_iter", minimum=0)
    batch_size = check_int(batch_size, "batch_size")
    clip_min, clip_max = finite_float("clip_min", clip_min, None), finite_float("clip_max", clip_max, None)
    if not clip_min < clip_max:
        raise ValueError(f"need clip_min < clip_max, got {clip_min} and {clip_max}")
    return eps, nb_iter, batch_size, clip_min, clip_max


def _attack_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, batch_size: int,
                    progress: bool, desc: str,
                    attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Run ``attack(xb, yb)`` over ``x`` batch by batch (``y=None``: the model's predictions), concatenated."""
    y = _labels_or_predictions(model, x, y, batch_size)
    out = []
    with _progress(len(x), progress, desc) as bar:
        for xb, yb in batches(x.detach(), y, batch_size=batch_size):
            out.append(attack(xb, yb))
            bar.update(len(xb))
    return torch.cat(out) if out else x.detach().clone()


def _random_start(x: torch.Tensor, eps: float, clip_min: float, clip_max: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """advertorch's L-inf ``rand_init``: uniform in the eps box, clipped to the data range (twice)."""
    noise = torch.empty(x.shape, dtype=x.dtype).uniform_(-1, 1, generator=generator).to(x.device)
    delta = noise * eps
    delta = torch.clamp(x + delta, clip_min, clip_max) - x  # advertorch.attacks.utils.rand_init_delta
    return torch.clamp(x + delta, clip_min, clip_max) - x  # and again in PGDAttack.perturb


def _pgd_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, eps: float,
               nb_iter: int, eps_iter: float, clip_min: float, clip_max: float,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """advertorch's ``perturb_iterative`` for ord=inf, untargeted, with ``autograd.grad``."""
    delta = delta.detach().clone()
    for _ in range(nb_iter):
        delta.requires_grad_(True)
        loss = loss_fn(model(x + delta), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = delta + grad.sign() * eps_iter
            delta = torch.clamp(delta, -eps, eps)
            delta = torch.clamp(x + delta, clip_min, clip_max) - x
    with torch.no_grad():
        return torch.clamp(x + delta, clip_min, clip_max)


# --------------------------------------------------------------------------------------------------
# The two PGD implementations
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PGDSettings:
    """The settings of :func:`pgd_torch`, checked once when made (``ValueError`` / ``TypeError`` naming the
    field).

    Attributes:
        eps: L-inf radius, ``>= 0``, in the units of ``x``.
        nb_iter: number of steps (0 returns the clipped start).
        eps_iter: step size; default ``2.5 * eps / nb_iter``.
        rand_init: start from a random point of the eps box (ignored if ``delta_init`` is given).
        clip_min, clip_max: data range.
        loss: ``"ce_sum"`` (cross-entropy summed over the batch, as the seed), ``"ce_mean"``, or a
            callable ``loss(outputs, y) -> scalar`` to maximise.
        seed: seed of the random start; None draws from the global torch generator.
        batch_size: inputs attacked together.
        progress: show a tqdm bar.

    Example:
        >>> PGDSettings(eps=0.3, nb_iter=40).step
        0.01875
    """

    eps: float
    nb_iter: int = 40
    eps_iter: float | None = None
    rand_init: bool = True
    clip_min: float = 0.0
    clip_max: float = 1.0
    loss: LossSpec = "ce_sum"
    seed: int | None = None
    batch_size: int = 256
    progress: bool = False

    def __post_init__(self) -> None:
        eps = finite_float("eps", self.eps)
        nb_iter = check_int(self.nb_iter, "nb_iter", minimum=0)
        batch_size = check_int(self.batch_size, "batch_size")
        clip_min = finite_float("clip_min", self.clip_min, None)
        clip_max = finite_float("clip_max", self.clip_max, None)
        if not clip_min < clip_max:
            raise ValueError(f"need clip_min < clip_max, got {clip_min} and {clip_max}")
        step = 2.5 * eps / max(nb_iter, 1) if self.eps_iter is None else self.eps_iter
        finite_float("eps_iter", step)
        _loss_fn(self.loss)
        for name, value in (("eps", eps), ("nb_iter", nb_iter), ("batch_size", batch_size), ("clip_min", clip_min),
                            ("clip_max", clip_max)):
            object.__setattr__(self, name, value)

    @property
    def step(self) -> float:
        """The step size: ``eps_iter``, else ``2.5 * eps / nb_iter``."""
        return finite_float("eps_iter", 2.5 * self.eps / max(self.nb_iter, 1) if self.eps_iter is None
                            else self.eps_iter)


def pgd_torch(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, eps: float | None = None,
              settings: PGDSettings | None = None, *, delta_init: torch.Tensor | None = None,
              **options: Any) -> torch.Tensor:
    """Untargeted L-inf PGD in plain torch, step for step the same as advertorch's ``LinfPGDAttack``.

    Each of ``nb_iter`` steps adds ``eps_iter * sign(grad of the loss)``, clamps the perturbation to
    ``[-eps, eps]`` and clips ``x + delta`` to ``[clip_min, clip_max]``. The random start draws
    ``uniform(-1, 1) * eps`` and clips it to the data range, drawing batch after batch from one
    ``torch.Generator`` seeded with ``seed`` (on CPU this is the same stream as
    ``torch.manual_seed(seed)`` followed by advertorch). ``delta_init`` replaces the random start.

    Args:
        model: classifier returning ``[B, C]`` scores (logits or log-probabilities) for inputs like ``x``.
        x: inputs ``[N, ...]`` in ``[clip_min, clip_max]``.
        y: true labels ``[N]``; if None, the model's own predictions are attacked.
        eps: L-inf radius, ``>= 0``, in the units of ``x`` (or ``settings.eps``).
        settings: the attack's settings (:class:`PGDSettings`); ``options`` are its other fields given as
            keywords instead (``nb_iter``, ``eps_iter``, ``rand_init``, ``clip_min``, ``clip_max``,
            ``loss``, ``seed``, ``batch_size``, ``progress``), or replace some of ``settings``'.
        delta_init: explicit start ``[N, ...]`` used as is (advertorch's ``delta_init``).

    Returns:
        Adversarial inputs, same shape, dtype and device as ``x``, detached.

    Raises:
        ValueError: for bad shapes or hyper-parameters.

    Example:
        >>> x_adv = pgd_torch(net, x, y, eps=0.3, nb_iter=40, seed=0)  # doctest: +SKIP
        >>> bool(((x_adv - x).abs() <= 0.3 + 1e-6).all())  # doctest: +SKIP
        True
    """
    check_xy(x, y)
    if settings is not None and not isinstance(settings, PGDSettings):
        raise TypeError(f"pgd_torch's fifth argument is a PGDSettings, got {type(settings).__name__}: pass "
                        "nb_iter= and the other settings by keyword")
    if eps is not None:
        options["eps"] = eps
    s = PGDSettings(**options) if settings is None else replace(settings, **options)
    if delta_init is not None and delta_init.shape != x.shape:
        raise ValueError(f"delta_init must have the shape of x {list(x.shape)}, "
                         f"got {list(delta_init.shape)}")
    loss_fn = _loss_fn(s.loss)
    generator = None if s.seed is None else torch.Generator().manual_seed(int(s.seed))
    starts = batches(delta_init, batch_size=s.batch_size) if delta_init is not None else None

    def attack(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        if starts is not None:
            delta = next(starts)[0].to(device=xb.device, dtype=xb.dtype)
        elif s.rand_init:
            delta = _random_start(xb, s.eps, s.clip_min, s.clip_max, generator)
        else:
            delta = torch.zeros_like(xb)
        return _pgd_batch(model, xb, yb, delta, s.eps, s.nb_iter, s.step, s.clip_min, s.clip_max, loss_fn)

    with frozen_eval(model):
        return _attack_batches(model, x, y, s.batch_size, s.progress, "PGD (torch)", attack)


def pgd_advertorch(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float,
    nb_iter: int = 40,
    eps_iter: float = 0.01,
    rand_init: bool = True,
    clip_min: float = 0.0,
    clip_max: float = 1.0,
    seed: int | None = 1,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """advertorch's ``LinfPGDAttack`` (untargeted, ``nn.CrossEntropyLoss(reduction="sum")``), batched.

    With ``seed`` set, the global torch generator is seeded with it inside
    :func:`torch.random.fork_rng`, so the caller's random state is left untouched; with ``seed=None`` the
    global generator is used as is. The model runs in eval mode with frozen parameters (advertorch would
    otherwise accumulate parameter gradients).

    Args:
        model: classifier returning ``[B, C]`` scores.
        x: inputs ``[N, ...]`` in ``[clip_min, clip_max]``.
        y: true labels ``[N]``; if None, the model's predictions.
        eps: L-inf radius.
        nb_iter: number of steps.
        eps_iter: step size.
        rand_init: random start in the eps box.
        clip_min, clip_max: data range.
        seed: seed of the random start, or None.
        batch_size: inputs attacked together.
        progress: show a tqdm bar.

    Returns:
        Adversarial inputs, same shape as ``x``, detached.

    Raises:
        ImportError: if advertorch is not installed.
        ValueError: for bad shapes or hyper-parameters.

    Example:
        >>> x_adv = pgd_advertorch(net, x, y, eps=0.3, seed=1)  # doctest: +SKIP
    """
    eps, nb_iter, batch_size, clip_min, clip_max = _check_pgd_args(x, y, eps, nb_iter, batch_size,
                                                                   clip_min, clip_max)
    eps_iter = finite_float("eps_iter", eps_iter)
    from ._advertorch_compat import ensure_advertorch

    ensure_advertorch()
    from advertorch.attacks import LinfPGDAttack

    attack = LinfPGDAttack(model, loss_fn=nn.CrossEntropyLoss(reduction="sum"), eps=eps,
                           nb_iter=nb_iter, eps_iter=eps_iter, rand_init=rand_init,
                           clip_min=clip_min, clip_max=clip_max, targeted=False)
    devices = [x.device.index or 0] if x.is_cuda else []
    rng = torch.random.fork_rng(devices=devices) if seed is not None else contextlib.nullcontext()
    with frozen_eval(model), rng:
        if seed is not None:
            torch.manual_seed(int(seed))
        return _attack_batches(model, x, y, batch_size, progress, "PGD (advertorch)",
                               lambda xb, yb: attack.perturb(xb, yb).detach())


def _run_pgd(backend: Backend, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
             nb_iter: int, eps_iter: float, clip_min: float, clip_max: float, seed: int | None,
             batch_size: int, progress: bool) -> torch.Tensor:
    """Dispatch to :func:`pgd_advertorch` or :func:`pgd_torch` (same result from the same seed)."""
    if backend not in ("auto", "torch", "advertorch"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'advertorch', got {backend!r}")
    kwargs: dict[str, Any] = dict(eps=eps, nb_iter=nb_iter, eps_iter=eps_iter, rand_init=True, clip_min=clip_min,
                                   clip_max=clip_max, seed=seed, batch_size=batch_size, progress=progress)
    if backend == "auto":
        try:
            from ._advertorch_compat import ensure_advertorch

            ensure_advertorch()
            backend = "advertorch"
        except ImportError:
            backend = "torch"
    if backend == "advertorch":
        return pgd_advertorch(model, x, y, **kwargs)
    return pgd_torch(model, x, y, loss="ce_sum", **kwargs)


# --------------------------------------------------------------------------------------------------
# Protocols (docs/method.md section 9)
# --------------------------------------------------------------------------------------------------


def attack_paper_protocol(
    net: nn.Module,
    x_pixels: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    seed: int = 1,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    nb_iter: int = 40,
    eps_iter: float = 0.01,
    batch_size: int = 200,
    backend: Backend = "auto",
    progress: bool = False,
) -> torch.Tensor:
    """The seed paper's attack protocol, reproduced for comparison only (not a sound evaluation).

    The pixels are normalised with ``mean`` / ``std`` and advertorch's ``LinfPGDAttack`` (cross-entropy
    summed, ``nb_iter`` 40, ``eps_iter`` 0.01, random start, seed 1) attacks the *normalised* tensors
    while clipping them to ``[0, 1]``, as the seed did. On MNIST this clipping zeroes the background
    (normalised background is about -0.42), so the "adversarial" images differ from the clean ones far
    beyond epsilon. ``eps`` is in normalised units (MNIST grid 0.1-1.0, ResNet 0.01-1.0). The seed used
    the first 200 test images, all of them, in one batch (``batch_size=200``).

    Args:
        net: a net taking *normalised* input (``MnistNet()`` / ``ResNet44()``, not ``normalize=True``).
        x_pixels: pixels ``[N, C, H, W]`` in ``[0, 1]``.
        y: true labels ``[N]``.
        eps: L-inf radius in normalised units.
        seed: seed of the random start (the seed paper used 1).
        mean, std: normalisation; default the net's ``input_mean`` / ``input_std`` buffers (MNIST
            statistics for ``MnistNet``, CIFAR-10 for ``ResNet44``).
        nb_iter, eps_iter: PGD steps and step size.
        batch_size: inputs attacked together (the random start depends on the batching).
        backend: ``"advertorch"``, ``"torch"`` (:func:`pgd_torch`, the same result from the same seed) or
            ``"auto"`` (advertorch when importable).
        progress: show a tqdm bar.

    Returns:
        The adversarial *normalised* tensors ``[N, C, H, W]``, to be fed to ``net`` directly.

    Raises:
        ValueError: if the net normalises internally, if no mean/std is known, or for bad inputs.

    Example:
        >>> x_adv_norm = attack_paper_protocol(net, x_te[:200], y_te[:200], eps=0.3)  # doctest: +SKIP
        >>> net(x_adv_norm).argmax(1)  # doctest: +SKIP
    """
    check_xy(x_pixels, y, need_y=True)
    check_range(x_pixels, 0.0, 1.0, "x_pixels")
    if getattr(net, "normalize", False) is True:
        raise ValueError("the paper protocol attacks normalised tensors: pass a net built with "
                         "normalize=False (it expects normalised input)")
    if mean is None or std is None:
        if not (hasattr(net, "input_mean") and hasattr(net, "input_std")):
            raise ValueError("pass mean= and std= (the net has no input_mean/input_std buffers)")
        mean = net.input_mean.flatten().tolist() if mean is None else mean
        std = net.input_std.flatten().tolist() if std is None else std
    x_norm = Normalize(mean, std).to(x_pixels.device)(x_pixels)
    return _run_pgd(backend, net, x_norm, y, eps=eps, nb_iter=nb_iter, eps_iter=eps_iter,
                    clip_min=0.0, clip_max=1.0, seed=seed, batch_size=batch_size, progress=progress)


def attack_standard_protocol(
    pixel_model: nn.Module,
    x_pixels: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    nb_iter: int = 40,
    seed: int = 0,
    batch_size: int = 256,
    backend: Backend = "torch",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard (honest) protocol: L-inf PGD in ``[0, 1]`` pixel space, keep only real successes.

    ``nb_iter`` steps of size ``2.5 * eps / nb_iter`` from a random start, clipping to ``[0, 1]``; the
    model normalises internally (``MnistNet(normalize=True)``, ``ResNet44(normalize=True)`` or
    ``nn.Sequential(Normalize(...), net)``). MNIST epsilons 0.1 / 0.2 / 0.3; CIFAR-10 2, 4, 8, 16 / 255.

    Args:
        pixel_model: classifier taking pixels in ``[0, 1]``.
        x_pixels: pixels ``[N, C, H, W]`` in ``[0, 1]``.
        y: true labels ``[N]``.
        eps: L-inf radius in pixel units.
        nb_iter: number of steps (step ``2.5 * eps / nb_iter``).
        seed: seed of the random start.
        batch_size: inputs attacked together.
        backend: ``"torch"`` (default, :func:`pgd_torch`), ``"advertorch"`` or ``"auto"``.
        progress: show a tqdm bar.

    Returns:
        ``(x_adv, keep_mask)``: adversarial pixels ``[N, C, H, W]`` for every input, and a
        ``BoolTensor[N]`` that is True where the model classified the clean input correctly AND
        misclassifies the adversarial one. Report detection only on ``x_adv[keep_mask]`` against clean
        inputs.

    Raises:
        ValueError: for pixels outside ``[0, 1]`` or bad inputs.

    Example:
        >>> x_adv, keep = attack_standard_protocol(MnistNet(normalize=True), x, y, eps=0.3)  # doctest: +SKIP
        >>> x_adv[keep].shape[0] <= x.shape[0]  # doctest: +SKIP
        True
    """
    check_xy(x_pixels, y, need_y=True)
    check_range(x_pixels, 0.0, 1.0, "x_pixels")
    eps = finite_float("eps", eps)
    nb_iter = check_int(nb_iter, "nb_iter")
    y = y.to(x_pixels.device).long()
    x_adv = _run_pgd(backend, pixel_model, x_pixels, y, eps=eps, nb_iter=nb_iter,
                     eps_iter=2.5 * eps / nb_iter, clip_min=0.0, clip_max=1.0, seed=seed,
                     batch_size=batch_size, progress=progress)
    clean_ok = predict_labels(pixel_model, x_pixels, batch_size=batch_size) == y
    fooled = predict_labels(pixel_model, x_adv, batch_size=batch_size) != y
    return x_adv, clean_ok & fooled
