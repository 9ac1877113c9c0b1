"""The generalized-entropy score ("gen", Liu et al. 2023) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libnet_plugin.detectors import GENScore
from libnet_plugin.probe import ProbeResult


def np_gen(z: np.ndarray, gamma: float, m: int) -> np.ndarray:
    z = z.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p = -np.sort(-p, axis=1)[:, :m]
    return (p ** gamma * (1 - p) ** gamma).sum(axis=1)


@pytest.mark.parametrize(("gamma", "m"), [(0.1, 100), (0.5, 2), (1.0, 4)])
def test_gen_is_the_generalized_entropy_of_the_top_m(fitted, mlp, mlp_data, gamma, m):
    x = mlp_data[0][:30]
    got = GENScore(gamma=gamma, top_m=m).fit(fitted).score(fitted, fitted.run(x))
    want = np_gen(mlp(x).detach().numpy(), gamma, m)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_gen_saturated_softmax_has_finite_value_and_gradient():
    z = torch.tensor([[80.0, 0.0, -5.0], [0.0, 0.0, 0.0]], requires_grad=True)
    s = GENScore(logits="outputs").fit(None).from_logits(z)
    s.sum().backward()
    assert bool(torch.isfinite(s).all()) and bool(torch.isfinite(z.grad).all())
    assert float(s[1].detach()) == pytest.approx(np_gen(np.zeros((1, 3)), 0.1, 100)[0], rel=1e-9)
    assert float(s[0].detach()) < float(s[1].detach())  # a confident answer is less suspicious than a uniform one
    r = ProbeResult(outputs=z.detach(), haps={})
    assert GENScore(logits="outputs").fit(None).score(None, r).shape == (2,)
