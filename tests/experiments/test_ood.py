"""Tests of libnet_plugin.experiments.ood: the offline out-of-domain sets (shapes, ranges, determinism, sources)."""

from __future__ import annotations

import socket

import pytest
import torch

from libnet_plugin.experiments import ood
from libnet_plugin.experiments.data import load_digits_upscaled, load_mnist_default
from libnet_plugin.experiments.ood import OOD_SET_NAMES, gaussian_blur, ood_sets


@pytest.fixture(scope="module")
def mnist_test() -> torch.Tensor:
    return load_mnist_default(seed=0)[2][:300]


@pytest.fixture(scope="module")
def mnist_sets(mnist_test) -> dict[str, torch.Tensor]:
    return ood_sets(mnist_test, n=100, seed=0)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def _matches(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> torch.Tensor:
    """For each row of ``a``: whether it equals (within ``atol``) some row of ``b``."""
    return ((_rows(a)[:, None, :] - _rows(b)[None, :, :]).abs().amax(dim=2) <= atol).any(dim=1)


def test_names_shapes_ranges_and_dtype(mnist_sets):
    assert tuple(mnist_sets) == OOD_SET_NAMES
    for name, x in mnist_sets.items():
        assert x.shape == (100, 1, 28, 28), name
        assert x.dtype == torch.float32, name
        assert bool(torch.isfinite(x).all()) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0, name
        assert float(x.std()) > 0.01, name  # not a constant image


def test_deterministic_for_a_seed_and_different_for_another(mnist_test, mnist_sets):
    again = ood_sets(mnist_test, n=100, seed=0)
    other = ood_sets(mnist_test, n=100, seed=1)
    for name in OOD_SET_NAMES:
        assert torch.equal(mnist_sets[name], again[name]), name
        assert not torch.equal(mnist_sets[name], other[name]), name


def test_no_sample_equals_a_test_image(mnist_test, mnist_sets):
    for name, x in mnist_sets.items():
        assert not bool(_matches(x, mnist_test, atol=1e-6).any()), name


def test_derived_sets_come_from_the_given_test_images(mnist_test, mnist_sets):
    assert bool(_matches(torch.rot90(mnist_sets["rotated 90"], k=-1, dims=(2, 3)), mnist_test).all())
    assert bool(_matches(1.0 - mnist_sets["inverted"], mnist_test, atol=1e-6).all())
    # each derived set uses distinct test images
    back = torch.rot90(mnist_sets["rotated 90"], k=-1, dims=(2, 3))
    assert len(torch.unique(_rows(back), dim=0)) == 100
    # noise-added stays close to some test image, blurred keeps the mean brightness of one
    noisy = mnist_sets["noise-added"]
    dist = torch.cdist(_rows(noisy), _rows(mnist_test)).min(dim=1).values
    assert float(dist.max()) < 0.45 * 28  # sqrt(784) * 0.3 = 8.4 before clipping
    blurred_means = _rows(mnist_sets["blurred"]).mean(1)
    test_means = _rows(mnist_test).mean(1)
    assert bool(((blurred_means[:, None] - test_means[None, :]).abs().min(1).values < 0.02).all())


def test_blurred_is_smooth_and_noise_sets_are_noisy(mnist_test, mnist_sets):
    def roughness(x):
        return float((x[..., 1:] - x[..., :-1]).abs().mean())

    assert roughness(mnist_sets["blurred"]) < 0.4 * roughness(mnist_test)
    assert roughness(mnist_sets["noise-added"]) > 2 * roughness(mnist_test)
    u = mnist_sets["uniform noise"]
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005


def test_natural_patches_differ_from_each_other_and_from_digits(mnist_sets):
    patches = mnist_sets["natural patches"]
    assert len(torch.unique(_rows(patches), dim=0)) == len(patches)
    d = torch.cdist(_rows(patches), _rows(patches))
    off = d[~torch.eye(len(patches), dtype=torch.bool)]
    assert float(off.min()) > 0.05
    assert float(patches.mean()) > 0.15  # photographs, not a black MNIST background


def test_digits_set_is_drawn_from_the_upscaled_digits(mnist_sets):
    digits = load_digits_upscaled(size=28)
    assert bool(_matches(mnist_sets["digits 8x8 upscaled"], digits).all())
    assert len(torch.unique(_rows(mnist_sets["digits 8x8 upscaled"]), dim=0)) == 100


def test_three_channels_and_other_sizes():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 32, 32, generator=g)
    sets = ood_sets(x, n=20, seed=3)
    assert tuple(sets) == OOD_SET_NAMES
    for name, s in sets.items():
        assert s.shape == (20, 3, 32, 32), name
        assert float(s.min()) >= 0 and float(s.max()) <= 1, name
    # the digits are grey: replicated channels; the photographs are in colour
    d = sets["digits 8x8 upscaled"]
    assert torch.equal(d[:, 0], d[:, 1]) and torch.equal(d[:, 0], d[:, 2])
    assert not torch.equal(sets["natural patches"][:, 0], sets["natural patches"][:, 1])
    small = ood_sets(x, n=5, seed=0, size=16)
    assert all(s.shape == (5, 3, 16, 16) for s in small.values())
    grey = ood_sets(torch.rand(10, 1, 12, 12, generator=g), n=4, size=12)
    assert all(s.shape == (4, 1, 12, 12) for s in grey.values())


def test_dtype_follows_x_test():
    x = torch.rand(12, 1, 28, 28, dtype=torch.float64)
    assert all(s.dtype == torch.float64 for s in ood_sets(x, n=6).values())


def test_needs_no_network(monkeypatch, mnist_test):
    ood._sample_photos.cache_clear()

    def refuse(*args, **kwargs):
        raise AssertionError("ood_sets tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    sets = ood_sets(mnist_test[:20], n=10, seed=0)
    assert sets["natural patches"].shape == (10, 1, 28, 28)


def test_bad_inputs_give_clear_errors(mnist_test):
    with pytest.raises(ValueError, match="floating-point tensor"):
        ood_sets((mnist_test * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="floating-point tensor"):
        ood_sets(mnist_test[:, 0])
    with pytest.raises(ValueError, match="square images with 1 or 3 channels"):
        ood_sets(torch.rand(10, 2, 28, 28))
    with pytest.raises(ValueError, match="square images"):
        ood_sets(torch.rand(10, 1, 28, 20))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        ood_sets(mnist_test * 255)
    with pytest.raises(ValueError, match="pass a smaller n"):
        ood_sets(mnist_test, n=301)
    with pytest.raises(ValueError, match="n must be"):
        ood_sets(mnist_test, n=0)
    with pytest.raises(ValueError, match="size must be"):
        ood_sets(mnist_test, n=5, size=0)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(mnist_test[:2], 0.0)


def test_gaussian_blur_keeps_constants_and_mass():
    flat = torch.full((2, 3, 10, 10), 0.7)
    assert torch.allclose(gaussian_blur(flat, 2.0), flat, atol=1e-6)
    img = torch.zeros(1, 1, 31, 31)
    img[0, 0, 15, 15] = 1.0
    out = gaussian_blur(img, 2.0)
    assert abs(float(out.sum()) - 1.0) < 1e-5
    assert torch.allclose(out, out.flip(-1)) and torch.allclose(out, out.transpose(-1, -2))
    assert float(out.max()) == pytest.approx(1 / (2 * torch.pi * 4), rel=0.02)


def test_one_set_by_name_from_the_registry():
    """``ood_set``: the set the reproductions use, by the registry's name (old names accepted), seeded."""
    from libnet_plugin.experiments.ood import OOD_ALIASES, OOD_REGISTRY, ood_name, ood_set

    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert tuple(OOD_REGISTRY) == OOD_SET_NAMES and set(OOD_ALIASES.values()) <= set(OOD_SET_NAMES)
    assert ood_name("sklearn digits 8x8 upscaled") == "digits 8x8 upscaled"
    digits = ood_set("sklearn digits 8x8 upscaled", torch.rand(4, 1, 28, 28))
    # exact by construction: the same file read twice, the same seeded generator through the same function
    assert torch.equal(digits, load_digits_upscaled())  # n=None: every digit, in order
    noise = ood_set("uniform noise", x, seed=3)
    assert noise.shape == x.shape and torch.equal(noise, ood_set("uniform noise", x, seed=3))
    assert not torch.equal(noise, ood_set("uniform noise", x, seed=4))
    assert torch.equal(ood_set("inverted", x), 1.0 - x)  # n=None: every test image, in order
    assert ood_set("rotated 90", x, n=2).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown out-of-domain set 'nope'; choose among"):
        ood_set("nope", x)
