"""The Hebbian readout's pass (Eq. 2): the same weights however the work is split, no subnormal gains."""

from __future__ import annotations

import math

import torch

from libnet_plugin.readout import HebbianReadout, hebbian_gain


def test_gain_equals_the_formula_except_below_the_smallest_normal():
    h = torch.linspace(-1.0, 1.0, 20001)
    ref = torch.exp(-(1.0 - h) / 0.01)
    g = hebbian_gain(h)
    tiny = torch.finfo(torch.float32).tiny
    kept = ref > tiny
    assert torch.equal(g[kept], ref[kept])  # bit for bit where g is a normal number
    assert bool((g[~kept] == 0).all())  # and 0 (never subnormal) where it is not
    assert not bool(((g > 0) & (g < tiny)).any())
    # the cut sits where exp((h - 1) / w) leaves the normal range
    assert abs(float(h[kept][0]) - (1 + 0.01 * math.log(tiny))) < 2e-4


def test_gain_keeps_float64():
    h = torch.linspace(-1.0, 1.0, 101, dtype=torch.float64)
    assert torch.equal(hebbian_gain(h, 0.05), torch.exp(-(1.0 - h) / 0.05))


def test_accumulate_unchanged_by_the_subnormal_cut():
    g = torch.Generator().manual_seed(0)
    h = torch.rand(64, 7, generator=g) * 2 - 1
    h[::5, 2] = 0.999  # some near-duplicates, so that every row has gains near 1
    ans = torch.randint(0, 3, (64,), generator=g)
    r = HebbianReadout(3)
    r.reset(7)
    r.accumulate(h, ans)
    gain = torch.exp(-(1.0 - h) / 0.01)  # the float32 gains of Eq. 2, subnormal ones included
    assert bool(((gain > 0) & (gain < torch.finfo(torch.float32).tiny)).any())
    onehot = torch.nn.functional.one_hot(ans, 3).float()
    ref = 2.0 * (gain.T @ onehot) - gain.sum(dim=0, keepdim=True).T
    assert torch.equal(r.weight, ref)  # the subnormal terms vanish in the rounding of the sums
