"""The max-logit score ("maxlogit", Hendrycks et al. 2022) against numpy."""

from __future__ import annotations

import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import MaxLogitScore


def test_maxlogit_is_minus_the_largest_logit(fitted, mlp, mlp_data):
    x = mlp_data[0][:20]
    score = MaxLogitScore().fit(fitted)
    want = -mlp(x).detach().numpy().max(axis=1)
    torch.testing.assert_close(score.score(fitted, fitted.run(x)), torch.tensor(want), rtol=1e-6, atol=1e-6)


def test_maxlogit_through_the_detector_flags_low_logits(fitted, mlp_data):
    x = mlp_data[0]
    det = lnp.ConsistencyDetector(fitted, method="maxlogit").calibrate(x[:100], fpr=0.1)
    assert det.differentiable
    s = det.score(torch.cat([x[:5], 0.0 * x[:1]]))
    assert s.shape == (6,)
