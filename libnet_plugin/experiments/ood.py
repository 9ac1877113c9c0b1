"""Out-of-domain input sets built offline from the test images and from data that ships with the packages.

:func:`ood_sets` returns, for held-out test images ``x_test`` (``[N, C, S, S]`` in ``[0, 1]``, 1 or 3
channels, any square size: MNIST as CIFAR-10), seven sets of ``n`` images each, in pixel space ``[0, 1]``
and with the channels and size of ``x_test`` (or ``size``). Nothing is downloaded. The sets, in order:

* ``"rotated 90"``: test images rotated by 90 degrees counter-clockwise (``torch.rot90``). Some classes
  stay plausible (an MNIST ``0`` or ``8``), most do not.
* ``"blurred"``: test images smoothed by a Gaussian of standard deviation ``BLUR_SIGMA * S / 28`` pixels
  (3 px on 28x28 MNIST, where strokes merge into blobs; about 3.4 px on 32x32 CIFAR-10), replicate
  padding.
* ``"inverted"``: ``1 - x`` of test images (white background, dark strokes on MNIST).
* ``"noise-added"``: test images plus Gaussian noise of standard deviation ``NOISE_STD`` (0.3), clipped to
  ``[0, 1]``; a near-distribution corruption (most strokes stay readable).
* ``"uniform noise"``: independent uniform ``[0, 1]`` pixels.
* ``"natural patches"``: random square crops of the two photographs bundled inside scikit-learn
  (``sklearn.datasets.load_sample_images()``: ``china.jpg`` and ``flower.jpg``, 427x640 RGB, read from the
  installed package), side drawn uniformly between ``S`` and ``4 S`` pixels (at most 427), resized to
  ``S x S`` (bilinear, antialiased) and, for 1 channel, converted to grey with the ITU-R BT.601 weights
  0.299, 0.587, 0.114.
* ``"digits 8x8 upscaled"``: scikit-learn's 8x8 digits as
  :func:`libnet_plugin.experiments.data.load_digits_upscaled` gives them (bilinear to ``S x S``),
  replicated over the channels for 3-channel images.

Each derived set (the first four) draws its own ``n`` distinct test images from ``x_test``, so the caller
decides which images are used (pass images held out from training and calibration). All random draws come
from one ``torch.Generator`` seeded with ``seed``: the same arguments always give the same sets.

The sets are the registry :data:`OOD_REGISTRY`, by these names; every command that scores out-of-domain
inputs draws from it by name (``libnet evaluate-detectors --ood``, ``libnet reproduce mnist``'s
``"digits 8x8 upscaled"``, ``libnet reproduce cifar10``'s ``"uniform noise"``), :func:`ood_set` building
one set alone from its own generator. An older name of a set is still accepted (:data:`OOD_ALIASES`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._validate import check_int
from .attacks import check_range
from .data import load_digits_upscaled

__all__ = ["OOD_REGISTRY", "OOD_SET_NAMES", "OOD_ALIASES", "BLUR_SIGMA", "NOISE_STD", "ood_name", "ood_set", "ood_sets",
           "gaussian_blur"]

#: Standard deviation of the ``"blurred"`` set's Gaussian, in pixels of a 28-pixel image (scaled with size).
BLUR_SIGMA: float = 3.0
#: Standard deviation of the Gaussian noise of the ``"noise-added"`` set, in pixel units.
NOISE_STD: float = 0.3
_N_DIGITS = 1797


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur images ``[N, C, H, W]`` channel by channel with a Gaussian of ``sigma`` pixels.

    A separable kernel of radius ``ceil(3 sigma)`` (normalised to sum 1) is applied as two depthwise
    convolutions with replicate padding, so a constant image stays constant and values stay in the input's
    range.

    Args:
        x: images ``[N, C, H, W]`` (floating point).
        sigma: standard deviation in pixels, > 0.

    Returns:
        The blurred images, same shape, dtype and device.

    Example:
        >>> img = torch.zeros(1, 1, 9, 9); img[0, 0, 4, 4] = 1.0
        >>> out = gaussian_blur(img, 1.0)
        >>> round(float(out.sum()), 4), bool(out[0, 0, 4, 4] < 1.0)
        (1.0, True)
    """
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor [N, C, H, W], got {getattr(x, 'shape', type(x))}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma!r}")
    radius = max(1, math.ceil(3.0 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = (kernel / kernel.sum()).to(dtype=x.dtype, device=x.device)
    c = x.shape[1]
    out = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


@functools.lru_cache(maxsize=1)
def _sample_photos() -> tuple[torch.Tensor, ...]:
    """scikit-learn's two bundled photographs as float32 ``[3, H, W]`` tensors in ``[0, 1]`` (read once)."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: read from the installed package
    return tuple(torch.from_numpy(np.asarray(p, dtype=np.float32) / np.float32(255.0)).permute(2, 0, 1)
                 .contiguous() for p in photos)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``[N, 3 or 1, H, W]`` to ``channels`` (1: BT.601 grey; 3 from 1: replicated)."""
    if x.shape[1] == channels:
        return x
    if channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * weights).sum(dim=1, keepdim=True)
    return x.expand(-1, channels, -1, -1).contiguous()


def _natural_patches(n: int, size: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    photos = _sample_photos()
    out = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=gen))]
        _, h, w = photo.shape
        high = min(4 * size, h, w)
        low = min(size, high)
        side = int(torch.randint(low, high + 1, (1,), generator=gen))
        top = int(torch.randint(h - side + 1, (1,), generator=gen))
        left = int(torch.randint(w - side + 1, (1,), generator=gen))
        out.append(_resize(photo[None, :, top:top + side, left:left + side], size))
    return _to_channels(torch.cat(out), channels)


def _derived(transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor]) -> _Builder:
    """A set made from test images: ``n`` distinct ones drawn from ``x`` (all of them in order when ``n`` is
    ``None``), resized to the side asked for, then ``transform(images, gen)``."""

    def build(x: torch.Tensor, n: int | None, side: int, channels: int, gen: torch.Generator) -> torch.Tensor:
        picked = x if n is None else x[torch.randperm(len(x), generator=gen)[:n]]
        return transform(_resize(picked, side), gen)

    return build


def _uniform_noise(x: torch.Tensor, n: int | None, side: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    return torch.rand((len(x) if n is None else n, channels, side, side), generator=gen)


def _patches(x: torch.Tensor, n: int | None, side: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    return _natural_patches(len(x) if n is None else n, side, channels, gen)


def _digits(x: torch.Tensor, n: int | None, side: int, channels: int, gen: torch.Generator) -> torch.Tensor:
    digits = load_digits_upscaled(size=side)
    picked = digits if n is None else digits[torch.randperm(len(digits), generator=gen)[:n]]
    return _to_channels(picked, channels)


_Builder = Callable[[torch.Tensor, "int | None", int, int, torch.Generator], torch.Tensor]

#: The out-of-domain registry: ``{name: builder}`` in the order :func:`ood_sets` returns them. Every
#: command that scores out-of-domain inputs (``libnet reproduce mnist`` / ``cifar10``, ``libnet
#: evaluate-detectors``) takes its sets from here by these names.
OOD_REGISTRY: dict[str, _Builder] = {
    "rotated 90": _derived(lambda x, gen: torch.rot90(x, k=1, dims=(2, 3))),
    "blurred": _derived(lambda x, gen: gaussian_blur(x, BLUR_SIGMA * x.shape[-1] / 28.0)),
    "inverted": _derived(lambda x, gen: 1.0 - x),
    "noise-added": _derived(lambda x, gen: x + NOISE_STD * torch.randn(x.shape, generator=gen)),
    "uniform noise": _uniform_noise,
    "natural patches": _patches,
    "digits 8x8 upscaled": _digits,
}
#: The names of the sets :func:`ood_sets` returns, in order.
OOD_SET_NAMES: tuple[str, ...] = tuple(OOD_REGISTRY)
#: Names the commands used to take for a set of :data:`OOD_REGISTRY`: ``{old name: name}``.
OOD_ALIASES: dict[str, str] = {"sklearn digits 8x8 upscaled": "digits 8x8 upscaled"}


def ood_name(name: str) -> str:
    """The registry's name of an out-of-domain set (an old name of :data:`OOD_ALIASES` is accepted).

    Example:
        >>> ood_name("sklearn digits 8x8 upscaled")
        'digits 8x8 upscaled'
    """
    name = OOD_ALIASES.get(name, name)
    if name not in OOD_REGISTRY:
        raise ValueError(f"unknown out-of-domain set {name!r}; choose among {list(OOD_SET_NAMES)}")
    return name


def _checked(x_test: torch.Tensor, size: int | None) -> tuple[torch.Tensor, int, int]:
    """``x_test`` on the CPU in float32, its channels and the output side; ``ValueError`` for bad images."""
    if not isinstance(x_test, torch.Tensor) or not x_test.is_floating_point() or x_test.ndim != 4:
        raise ValueError(f"x_test must be a floating-point tensor [N, C, S, S], got "
                         f"{list(getattr(x_test, 'shape', [])) or type(x_test).__name__}")
    _, channels, height, width = x_test.shape
    if channels not in (1, 3) or height != width:
        raise ValueError(f"x_test must hold square images with 1 or 3 channels, got {list(x_test.shape[1:])}")
    check_range(x_test, 0.0, 1.0, "x_test")
    side = height if size is None else check_int(size, "size")
    return x_test.detach().to(device="cpu", dtype=torch.float32), channels, side


def _finish(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return x.clamp_(0.0, 1.0).to(device=like.device, dtype=like.dtype)


def ood_set(name: str, x_test: torch.Tensor, *, n: int | None = None, seed: int = 0,
            size: int | None = None) -> torch.Tensor:
    """One out-of-domain set of the registry by name, from its own generator seeded with ``seed``.

    Args:
        name: a name of :data:`OOD_SET_NAMES` (or an old name of :data:`OOD_ALIASES`).
        x_test: held-out test images ``[N, C, S, S]`` in ``[0, 1]`` (the derived sets are made from them;
            the others take their channels and size).
        n: images drawn; ``None``: the whole set in its order (every test image for the derived sets, all
            1797 digits, ``N`` images of noise or patches).
        seed: seed of the set's random draws.
        size: side of the output images; default ``S``.

    Returns:
        ``Tensor[n, C, size, size]`` in ``[0, 1]`` with ``x_test``'s dtype and device.

    Example:
        >>> ood_set("uniform noise", torch.rand(6, 1, 28, 28), seed=1).shape
        torch.Size([6, 1, 28, 28])
    """
    build = OOD_REGISTRY[ood_name(name)]
    x, channels, side = _checked(x_test, size)
    if n is not None:
        n = check_int(n, "n")
    gen = torch.Generator().manual_seed(check_int(seed, "seed", minimum=0))
    return _finish(build(x, n, side, channels, gen), x_test)


def ood_sets(x_test: torch.Tensor, *, n: int = 500, seed: int = 0, size: int | None = None) -> dict[str, torch.Tensor]:
    """Seven out-of-domain sets of ``n`` images each, shaped like ``x_test``'s images (see the module doc).

    Args:
        x_test: held-out test images ``[N, C, S, S]`` in ``[0, 1]``, ``C`` 1 or 3, ``N >= n``; the four
            derived sets are made from images drawn from it.
        n: images per set, ``1 <= n <= min(N, 1797)`` (1797 digits exist).
        seed: seed of every random draw (which test images, noise, crops, digits).
        size: side of the output images; default ``S`` (derived sets are then resized when it differs).

    Returns:
        ``{name: Tensor[n, C, size, size]}`` in the order of :data:`OOD_SET_NAMES`, values in ``[0, 1]``,
        with ``x_test``'s dtype and device.

    Raises:
        ValueError: for images that are not ``[N, 1 or 3, S, S]`` in ``[0, 1]``, or ``n`` / ``size`` out
            of range.

    Example:
        >>> sets = ood_sets(torch.rand(20, 1, 28, 28), n=10, seed=0)
        >>> list(sets)[:3], tuple(sets["natural patches"].shape)
        (['rotated 90', 'blurred', 'inverted'], (10, 1, 28, 28))
    """
    x, channels, side = _checked(x_test, size)
    n = check_int(n, "n")
    seed = check_int(seed, "seed", minimum=0)
    if n > len(x_test) or n > _N_DIGITS:
        raise ValueError(f"n={n} needs at least n test images (got {len(x_test)}) and at most {_N_DIGITS} "
                         "(the scikit-learn digits); pass a smaller n")
    gen = torch.Generator().manual_seed(seed)  # one generator, drawn from in the registry's order
    return {name: _finish(build(x, n, side, channels, gen), x_test) for name, build in OOD_REGISTRY.items()}
