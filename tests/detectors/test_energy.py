"""The energy score ("energy", Liu et al. 2020) against numpy, and where it reads the logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors import EnergyScore
from libnet_plugin.errors import ShapeMismatchError


def np_energy(z: np.ndarray, t: float = 1.0) -> np.ndarray:
    z = z.astype(np.float64) / t
    m = z.max(axis=1, keepdims=True)
    return -t * (m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


class LogSoftmaxModel(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.log_softmax(self.inner(x), dim=1)


@pytest.mark.parametrize("t", [1.0, 2.5])
def test_energy_is_minus_t_logsumexp_of_the_logits(fitted, mlp, mlp_data, t):
    x = mlp_data[0][:20]
    score = EnergyScore(temperature=t).fit(fitted)
    assert score.logits_ == "out"  # the last probed nn.Linear with one output per class
    got = score.score(fitted, fitted.run(x))
    want = np_energy(mlp(x).detach().numpy(), t)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32), rtol=1e-5, atol=1e-5)


def test_energy_reads_the_logits_layer_of_a_log_softmax_model(mlp, mlp_data):
    x = mlp_data[0]
    model = LogSoftmaxModel(mlp).eval()
    net = lnp.LibraryNetwork(model, ["inner.fc2", "inner.out"], thresholds=0.9).fit(x)
    det = lnp.ConsistencyDetector(net, method="energy").calibrate(x[:100], fpr=0.1)
    torch.testing.assert_close(det.score(x[:7]), torch.tensor(np_energy(mlp(x[:7]).detach().numpy()),
                                                                dtype=torch.float32), rtol=1e-5, atol=1e-5)
    # without the logits layer probed, log-probabilities are refused (energy would be 0 for every input)
    net2 = lnp.LibraryNetwork(model, ["inner.fc2"], thresholds=0.9).fit(x)
    score = EnergyScore().fit(net2)
    assert score.logits_ == "outputs"
    with pytest.raises(ValueError, match="log-probabilities"):
        score.score(net2, net2.run(x[:5]))


def test_a_logits_layer_that_is_not_the_outputs_is_refused(fitted, mlp_data):
    with pytest.raises(ShapeMismatchError, match="'fc2'"):
        EnergyScore(logits="fc2").fit(fitted).score(fitted, fitted.run(mlp_data[0][:4]))
    with pytest.raises(ValueError, match="temperature"):
        EnergyScore(temperature=0)


def test_auto_finds_a_probed_logits_layer_when_the_probe_cannot_tell_module_types():
    """An ONNX model, say: the outputs are log-probabilities, a probed layer of their shape has their softmax."""
    from libnet_plugin.detectors import PeerNotApplicableError, logits_of

    z = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]])
    r = lnp.ProbeResult(outputs=torch.log_softmax(z, 1), haps={"fc1": torch.randn(2, 5), "fc2": z,
                                                                 "other": torch.zeros(2, 3)})
    torch.testing.assert_close(logits_of(r, "outputs", "energy", auto=True), z)
    with pytest.raises(PeerNotApplicableError, match="log-probabilities"):
        logits_of(r, "outputs", "energy")  # logits="outputs" named: no search
