"""Conformal p-values and Fisher fusion, computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from libnet_plugin.detectors import (
    ConformalFusion,
)
from libnet_plugin.errors import NotFittedError, ShapeMismatchError


def test_conformal_fusion_hand_computed():
    f = ConformalFusion()
    ref = torch.tensor([[0.0, 5.0], [1.0, 5.0], [2.0, 1.0], [3.0, 0.0]])
    loo = f.fit(ref)
    # leave-one-out p-values: feature 0 -> 1, 3/4, 2/4, 1/4; feature 1 (ties count as >=) -> 2/4, 2/4, 3/4, 1
    expected = -np.log([1 * 0.5, 0.75 * 0.5, 0.5 * 0.75, 0.25 * 1.0])
    np.testing.assert_allclose(loo.numpy(), expected, rtol=1e-12)
    p = f.p_values(torch.tensor([[2.0, 6.0], [-1.0, 5.0]]))
    np.testing.assert_allclose(p.numpy(), [[3 / 5, 1 / 5], [5 / 5, 3 / 5]])
    np.testing.assert_allclose(f(torch.tensor([[2.0, 6.0]])).numpy(), [-math.log(3 / 25)])
    with pytest.raises(ShapeMismatchError, match=r"\[B, 2\]"):
        f.p_values(torch.zeros(3, 3))
    with pytest.raises(NotFittedError, match="calibrate"):
        ConformalFusion().p_values(torch.zeros(1, 1))
