"""Make advertorch 0.2.3 importable on current PyTorch, without torchvision if need be.

advertorch 0.2.3 fails to import here for two reasons (docs/design.md section 5):

1. ``advertorch.attacks.fast_adaptive_boundary`` does ``from torch.autograd.gradcheck import
   zero_gradients``, a helper PyTorch removed. :func:`ensure_advertorch` puts an equivalent function back
   on the module object ``torch.autograd.gradcheck`` (obtained with :func:`importlib.import_module`, so
   the attribute lands on the real module, not on a local alias).
2. ``advertorch.functional`` does ``from torchvision import transforms`` at import time, only to build
   ``transforms.ToPILImage()`` and ``transforms.ToTensor()`` for its JPEG filter. torchvision does not
   work beside the CPU torch build here. Only when ``import torchvision`` fails, a minimal stand-in
   (``__libnet_stub__ = True``) providing just those two transforms, implemented with PIL, is placed in
   ``sys.modules`` *while advertorch is imported* and removed right after. advertorch keeps its references
   to the two transform objects, so its JPEG filter works, while other code that probes for torchvision
   (``try: import torchvision``) still sees that it is absent.

Nothing here is imported by ``libnet_plugin`` at import time; :mod:`libnet_plugin.experiments.attacks` calls
:func:`ensure_advertorch` only when an advertorch-backed attack is requested.
"""

from __future__ import annotations

import importlib
import sys
import threading
import types
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

__all__ = ["ensure_advertorch", "zero_gradients", "make_torchvision_stub"]

_LOCK = threading.Lock()
_ADVERTORCH: types.ModuleType | None = None
#: Whether the last successful :func:`ensure_advertorch` needed the torchvision stand-in.
USED_TORCHVISION_STUB: bool = False


def zero_gradients(x: torch.Tensor | Iterable[Any]) -> None:
    """Zero the ``.grad`` of a tensor, or of every tensor in a (nested) iterable, in place.

    The helper PyTorch removed from ``torch.autograd.gradcheck``, with its original semantics.

    Args:
        x: a tensor, or an iterable of tensors / iterables.

    Example:
        >>> t = torch.ones(2, requires_grad=True); t.sum().backward(); zero_gradients(t)
        >>> t.grad.tolist()
        [0.0, 0.0]
    """
    if isinstance(x, torch.Tensor):
        if x.grad is not None:
            x.grad.detach_()
            x.grad.zero_()
    elif isinstance(x, Iterable):
        for elem in x:
            zero_gradients(elem)


class _StubToPILImage:
    """Stand-in for ``torchvision.transforms.ToPILImage`` on ``[C, H, W]`` float tensors in [0, 1]."""

    def __call__(self, pic: torch.Tensor):
        from PIL import Image

        if not isinstance(pic, torch.Tensor) or pic.ndim != 3 or pic.shape[0] not in (1, 3, 4):
            raise TypeError(
                "libnet-plugin's torchvision stand-in converts only [C, H, W] tensors with 1, 3 or 4 "
                "channels; install a working torchvision for anything else"
            )
        if pic.is_floating_point():
            pic = pic.mul(255).byte()  # truncation, as torchvision does
        arr = pic.detach().cpu().numpy().transpose(1, 2, 0)
        mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[2]]
        return Image.fromarray(arr[:, :, 0] if mode == "L" else arr, mode=mode)


class _StubToTensor:
    """Stand-in for ``torchvision.transforms.ToTensor`` on PIL images: ``[C, H, W]`` float in [0, 1]."""

    def __call__(self, pic) -> torch.Tensor:
        arr = np.array(pic, dtype=np.uint8, copy=True)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.transpose(2, 0, 1).copy()).float().div(255)


def _stub_getattr(name: str) -> Any:
    raise AttributeError(
        f"torchvision is not importable here; libnet-plugin's stand-in provides only "
        f"transforms.ToPILImage and transforms.ToTensor (for advertorch's JPEG filter), not {name!r}"
    )


def make_torchvision_stub() -> tuple[types.ModuleType, types.ModuleType]:
    """Build (without installing) the stand-in ``torchvision`` and ``torchvision.transforms`` modules.

    Both carry ``__libnet_stub__ = True``; any attribute other than the two transforms raises an
    ``AttributeError`` that says what the stand-in is.

    Returns:
        ``(torchvision_module, transforms_module)``.

    Example:
        >>> tv, tf = make_torchvision_stub()
        >>> tv.__libnet_stub__, hasattr(tf, "ToTensor")
        (True, True)
    """
    tv = types.ModuleType("torchvision", "libnet-plugin stand-in for torchvision (not the real one)")
    tf = types.ModuleType("torchvision.transforms", "libnet-plugin stand-in: ToPILImage, ToTensor only")
    tf.ToPILImage = _StubToPILImage  # type: ignore[attr-defined]
    tf.ToTensor = _StubToTensor  # type: ignore[attr-defined]
    for mod in (tv, tf):
        mod.__libnet_stub__ = True  # type: ignore[attr-defined]
        mod.__getattr__ = _stub_getattr  # type: ignore[attr-defined]
    tv.transforms = tf  # type: ignore[attr-defined]
    return tv, tf


def _torchvision_importable() -> bool:
    try:
        importlib.import_module("torchvision")
    except Exception:  # ImportError, or OSError/RuntimeError from a build missing CUDA libraries
        return False
    return True


def _restore_zero_gradients() -> None:
    gradcheck = importlib.import_module("torch.autograd.gradcheck")
    if not hasattr(gradcheck, "zero_gradients"):
        gradcheck.zero_gradients = zero_gradients  # type: ignore[attr-defined]


def _import_advertorch() -> types.ModuleType:
    modules = ("advertorch", "advertorch.attacks", "advertorch.functional")
    try:
        for name in modules:
            importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "advertorch":
            raise ImportError(
                "advertorch is not installed; install it with `pip install libnet-plugin[attacks]` "
                "(advertorch==0.2.3), or use the torch-only attacks (pgd_torch)"
            ) from exc
        raise
    return sys.modules["advertorch"]


def ensure_advertorch() -> types.ModuleType:
    """Patch the environment so advertorch 0.2.3 imports, import it, and return the module.

    Idempotent and thread-safe: later calls return the cached module. Restores
    ``torch.autograd.gradcheck.zero_gradients`` if missing (it stays restored) and, only if
    ``import torchvision`` fails, imports advertorch under a temporary torchvision stand-in (see the
    module docstring). ``advertorch.attacks`` and ``advertorch.functional`` are imported too.

    Returns:
        The ``advertorch`` module.

    Raises:
        ImportError: if advertorch itself is not installed (with the install command).

    Example:
        >>> advertorch = ensure_advertorch()
        >>> from advertorch.attacks import LinfPGDAttack
    """
    global _ADVERTORCH, USED_TORCHVISION_STUB
    with _LOCK:
        if _ADVERTORCH is not None:
            return _ADVERTORCH
        _restore_zero_gradients()
        if _torchvision_importable():
            _ADVERTORCH = _import_advertorch()
            USED_TORCHVISION_STUB = False
            return _ADVERTORCH
        # leftovers of a failed real import would shadow the stand-in: set them aside, restore after
        saved = {k: sys.modules.pop(k) for k in list(sys.modules)
                 if k == "torchvision" or k.startswith("torchvision.")}
        tv, tf = make_torchvision_stub()
        sys.modules["torchvision"] = tv
        sys.modules["torchvision.transforms"] = tf
        try:
            module = _import_advertorch()
        finally:
            for name in ("torchvision", "torchvision.transforms"):
                if sys.modules.get(name) in (tv, tf):
                    del sys.modules[name]
            sys.modules.update(saved)
        _ADVERTORCH = module
        USED_TORCHVISION_STUB = True
        return module
