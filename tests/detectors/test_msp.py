"""The maximum-softmax baseline ("msp")."""

from __future__ import annotations

import torch

import libnet_plugin as lnp
from libnet_plugin.detectors import (
    MaxSoftmaxScore,
)


def test_msp_equal_for_logits_and_log_probabilities(mlp, mlp_data):
    x, _ = mlp_data
    logits = mlp(x[:10]).detach()
    a = MaxSoftmaxScore().fit(None).score(None, lnp.ProbeResult(outputs=logits, haps={}))
    b = MaxSoftmaxScore().fit(None).score(None, lnp.ProbeResult(outputs=torch.log_softmax(logits, 1), haps={}))
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, 1 - torch.softmax(logits, 1).amax(1))
