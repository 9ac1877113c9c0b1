"""Minimal-perturbation L2 attacks: Carlini & Wagner L2 and DeepFool, in pixel space ``[0, 1]``.

Unlike L-inf PGD (:mod:`libnet_plugin.experiments.attacks`), which uses its whole budget ``eps``, these
attacks look for the *smallest* L2 perturbation that changes the model's decision, so their adversarial
inputs lie just across the decision boundary, close to the clean ones.

* :func:`cw_l2`: Carlini & Wagner's L2 attack (untargeted), through advertorch's
  ``CarliniWagnerL2Attack`` (made importable by
  :func:`libnet_plugin.experiments._advertorch_compat.ensure_advertorch`). The defaults are a short
  schedule, 2 binary-search steps of at most 80 Adam steps (learning rate 0.1, initial constant 1), instead
  of the paper's 9 x 10,000 steps: at most 160 forward-backward passes per input. How often it succeeds
  and its median L2 are measured by ``libnet evaluate-detectors`` (its report's attack table).
* :func:`deepfool`: DeepFool (Moosavi-Dezfooli et al., 2016), L2, batched in torch: each step linearises
  the model around the current point and moves to the nearest linearised decision boundary among the
  ``num_classes`` top classes; the accumulated step is scaled by ``1 + overshoot``.

Both take a classifier ``model`` mapping pixels in ``[0, 1]`` to ``[B, C]`` logits (or log-probabilities:
only differences of the outputs matter), run it in eval mode with its parameters frozen (mode and
``requires_grad`` flags restored afterwards, no parameter gradients left behind), keep every iterate in
``[0, 1]`` and return the adversarial inputs with the shape, dtype and device of ``x``. Neither uses
random numbers, so the result is the same on every run. An input the attack cannot fool is returned
unchanged by :func:`cw_l2` and as DeepFool's last iterate by :func:`deepfool`: check success with the
model's predictions (and keep only inputs it classified correctly) before using the result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .._validate import check_int
from .attacks import check_range, check_xy, finite_float, frozen_eval
from .data import batches
from .models import predict_labels

__all__ = ["cw_l2", "deepfool"]


def _check_common(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, batch_size: int) -> int:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_xy(x, y)
    check_range(x, 0.0, 1.0, "x")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x must be finite (no NaN or inf)")
    return check_int(batch_size, "batch_size")


def _run_batches(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, batch_size: int, progress: bool,
                 desc: str, attack: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``attack(xb, yb)`` over ``x`` batch by batch, in eval mode with frozen parameters and grad enabled."""
    from tqdm.auto import tqdm

    with frozen_eval(model), torch.enable_grad():
        y = predict_labels(model, x, batch_size=batch_size) if y is None else y.to(x.device).long()
        out = []
        with tqdm(total=len(x), disable=not progress, desc=desc, unit="img") as bar:
            for xb, yb in batches(x.detach(), y, batch_size=batch_size):
                out.append(attack(xb, yb).detach().to(dtype=x.dtype).clamp_(0.0, 1.0))
                bar.update(len(xb))
    return torch.cat(out) if out else x.detach().clone()


def _num_outputs(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None) -> int:
    """The model's number of classes (one forward pass on ``x[:1]``); ``y`` must index them."""
    with torch.no_grad(), frozen_eval(model):
        out = model(x[:1])
    if out.ndim != 2 or out.shape[1] < 2:
        raise ValueError(f"model must return [B, C] scores with C >= 2 classes, got shape {list(out.shape)}")
    n_out = int(out.shape[1])
    if y is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_out):
        raise ValueError(f"labels y must lie in 0..{n_out - 1} (the model has {n_out} outputs), "
                         f"got values in {int(y.min())}..{int(y.max())}")
    return n_out


# --------------------------------------------------------------------------------------------------
# Carlini & Wagner L2
# --------------------------------------------------------------------------------------------------


def cw_l2(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    confidence: float = 0.0,
    initial_const: float = 1.0,
    binary_search_steps: int = 2,
    max_iterations: int = 80,
    learning_rate: float = 0.1,
    abort_early: bool = True,
    batch_size: int = 500,
    progress: bool = False,
) -> torch.Tensor:
    """Untargeted Carlini & Wagner L2 attack (advertorch's ``CarliniWagnerL2Attack``), batched.

    For each input the attack minimises ``||x_adv - x||_2^2 + c * max(z_y - max_{k != y} z_k +
    confidence, 0)`` over ``x_adv = (tanh(w) + 1) / 2`` (so ``x_adv`` stays in ``[0, 1]``) with Adam, and
    adjusts ``c`` per input by binary search: a success halves the interval towards smaller ``c``, a
    failure multiplies ``c`` by 10 until an upper bound is known. The result is, per input, the successful
    iterate with the smallest L2 distance over all steps; an input never fooled is returned unchanged.
    ``abort_early`` stops a binary-search step when the batch's loss stops falling (checked every
    ``max_iterations // 10`` steps), so the outcome depends slightly on ``batch_size``.

    Args:
        model: classifier taking pixels in ``[0, 1]``, returning ``[B, C]`` logits or log-probabilities.
        x: inputs ``[N, ...]`` in ``[0, 1]``.
        y: true labels ``[N]``; if None, the model's own predictions are attacked.
        confidence: margin ``kappa >= 0`` by which the best other class must beat class ``y``.
        initial_const: first value of ``c`` (> 0).
        binary_search_steps: number of values of ``c`` tried (each restarts from ``x``).
        max_iterations: Adam steps per value of ``c``.
        learning_rate: Adam step size (> 0), in tanh space.
        abort_early: stop a step once the loss has stopped decreasing.
        batch_size: inputs attacked together.
        progress: show a tqdm bar.

    Returns:
        Adversarial inputs, same shape, dtype and device as ``x``, in ``[0, 1]``, detached.

    Raises:
        TypeError, ValueError: for a model that is not an ``nn.Module``, inputs of the wrong shape or
            outside ``[0, 1]``, or bad hyper-parameters.
        ImportError: if advertorch is not installed.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x = torch.rand(8, 1, 4, 4)
        >>> x_adv = cw_l2(model, x, None, max_iterations=20)
        >>> x_adv.shape, bool(x_adv.min() >= 0 and x_adv.max() <= 1)
        (torch.Size([8, 1, 4, 4]), True)
    """
    batch_size = _check_common(model, x, y, batch_size)
    confidence = finite_float("confidence", confidence)
    initial_const = finite_float("initial_const", initial_const)
    learning_rate = finite_float("learning_rate", learning_rate)
    if initial_const <= 0 or learning_rate <= 0:
        raise ValueError(f"initial_const and learning_rate must be > 0, got {initial_const} and {learning_rate}")
    binary_search_steps = check_int(binary_search_steps, "binary_search_steps")
    max_iterations = check_int(max_iterations, "max_iterations")
    if len(x) == 0:
        return x.detach().clone()
    num_classes = _num_outputs(model, x, y)
    from ._advertorch_compat import ensure_advertorch

    ensure_advertorch()
    from advertorch.attacks import CarliniWagnerL2Attack

    attack = CarliniWagnerL2Attack(model, num_classes, confidence=confidence, targeted=False,
                                   learning_rate=learning_rate, binary_search_steps=binary_search_steps,
                                   max_iterations=max_iterations, abort_early=bool(abort_early),
                                   initial_const=initial_const, clip_min=0.0, clip_max=1.0)
    return _run_batches(model, x, y, batch_size, progress, "CW-L2", attack.perturb)


# --------------------------------------------------------------------------------------------------
# DeepFool
# --------------------------------------------------------------------------------------------------


def _deepfool_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor, overshoot: float, max_iter: int,
                    num_classes: int) -> torch.Tensor:
    """DeepFool on one batch; only inputs still classified as ``y`` take further steps."""
    with torch.no_grad():
        scores = model(x)
    rows = torch.arange(len(x), device=x.device)
    ranked = scores.detach().clone()
    ranked[rows, y] = float("inf")
    candidates = ranked.argsort(dim=1, descending=True)[:, :num_classes]  # y first, then the top others
    active = scores.argmax(dim=1) == y
    x_adv = x.detach().clone()
    r_tot = torch.zeros_like(x)
    for step in range(max_iter + 1):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        xa = x_adv[idx].requires_grad_(True)
        out = model(xa)
        still = out.argmax(dim=1) == y[idx]
        active[idx[~still]] = False
        if step == max_iter or not bool(still.any()):
            break
        f = out.gather(1, candidates[idx])  # [b, K]
        grads = [torch.autograd.grad(f[:, k].sum(), xa, retain_graph=k < num_classes - 1)[0]
                 for k in range(num_classes)]
        with torch.no_grad():
            g = torch.stack(grads, dim=1)  # [b, K, ...]
            w = (g[:, 1:] - g[:, :1]).flatten(2)  # gradients of f_k - f_y
            gap = (f[:, 1:] - f[:, :1]).abs()
            w_norm = w.norm(dim=2).clamp_min(1e-12)
            k = (gap / w_norm).argmin(dim=1)
            b = torch.arange(len(idx), device=x.device)
            r = ((gap[b, k] + 1e-4) / w_norm[b, k] ** 2).view(-1, 1) * w[b, k]
            keep = idx[still]
            r_tot[keep] += r[still].view_as(x[keep])
            x_adv[keep] = torch.clamp(x[keep] + (1.0 + overshoot) * r_tot[keep], 0.0, 1.0)
    return x_adv


def deepfool(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    *,
    overshoot: float = 0.02,
    max_iter: int = 50,
    num_classes: int = 10,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """DeepFool, L2, untargeted (Moosavi-Dezfooli, Fawzi and Frossard, CVPR 2016), batched in torch.

    At each step, for an input still classified as ``y``, the candidate classes ``k`` (the ``num_classes``
    highest-scoring classes of the clean input, ``y`` included) give ``w_k = grad(f_k - f_y)`` and
    ``g_k = f_k - f_y``; the step ``r = (|g_l| + 1e-4) w_l / ||w_l||^2`` goes to the nearest linearised
    boundary ``l = argmin_k |g_k| / ||w_k||``. The steps add up to ``r_tot`` and the iterate is
    ``clip(x + (1 + overshoot) * r_tot, 0, 1)``. An input stops as soon as it is misclassified (inputs the
    model already misclassifies are returned unchanged), or after ``max_iter`` steps. Each step costs one
    forward and ``num_classes`` backward passes on the inputs still active.

    Args:
        model: classifier taking pixels in ``[0, 1]``, returning ``[B, C]`` logits or log-probabilities.
        x: inputs ``[N, ...]`` in ``[0, 1]``.
        y: true labels ``[N]``; if None, the model's own predictions are attacked.
        overshoot: relative overshoot (>= 0) applied to the accumulated step.
        max_iter: maximal number of steps per input (>= 1).
        num_classes: candidate classes per input (2 ..  number of model outputs), ``y`` included.
        batch_size: inputs attacked together.
        progress: show a tqdm bar.

    Returns:
        Adversarial inputs, same shape, dtype and device as ``x``, in ``[0, 1]``, detached (DeepFool's
        last iterate where it did not succeed within ``max_iter`` steps).

    Raises:
        TypeError, ValueError: for a model that is not an ``nn.Module``, inputs of the wrong shape or
            outside ``[0, 1]``, or bad hyper-parameters.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
        >>> x = torch.rand(8, 1, 4, 4)
        >>> x_adv = deepfool(model, x, None, num_classes=3)
        >>> bool((model(x_adv).argmax(1) != model(x).argmax(1)).float().mean() > 0.5)
        True
    """
    batch_size = _check_common(model, x, y, batch_size)
    overshoot = finite_float("overshoot", overshoot)
    max_iter = check_int(max_iter, "max_iter")
    num_classes = check_int(num_classes, "num_classes", minimum=2)
    if len(x) == 0:
        return x.detach().clone()
    n_out = _num_outputs(model, x, y)
    if num_classes > n_out:
        raise ValueError(f"num_classes={num_classes} exceeds the model's {n_out} outputs")
    return _run_batches(model, x, y, batch_size, progress, "DeepFool",
                        lambda xb, yb: _deepfool_batch(model, xb, yb, overshoot, max_iter, num_classes))
