"""ReAct + energy ("react-energy", Sun et al. 2021) against numpy, and how the penultimate layer is found."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import libnet_plugin as lnp
from libnet_plugin.detectors import ReActEnergyScore


def penultimate(mlp, x) -> np.ndarray:
    """The input of mlp.out: ReLU of fc2's output."""
    return torch.relu(mlp.fc2(torch.relu(mlp.fc1(x)))).detach().double().numpy()


def np_energy(z):
    m = z.max(axis=1, keepdims=True)
    return -(m[:, 0] + np.log(np.exp(z - m).sum(axis=1)))


@pytest.mark.parametrize("p", [90.0, 65.0])
def test_react_energy_clips_at_the_training_percentile(fitted, mlp, mlp_data, p):
    x_train = mlp_data[0]
    score = ReActEnergyScore(percentile=p).fit(fitted, mlp_data)
    pen = score.pen_
    assert (pen.layer, pen.activation, pen.classifier) == ("fc2", "relu", "out")
    h_train = penultimate(mlp, x_train)
    c = np.percentile(h_train, p)
    assert float(score.clip_) == pytest.approx(c, rel=1e-5)
    x = torch.randn(17, 10, generator=torch.Generator().manual_seed(5)) * 3
    w, b = mlp.out.weight.detach().double().numpy(), mlp.out.bias.detach().double().numpy()
    want = np_energy(np.minimum(penultimate(mlp, x), c) @ w.T + b)
    torch.testing.assert_close(score.score(fitted, fitted.run(x)), torch.tensor(want, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)


def test_no_probed_layer_feeding_the_classifier_is_refused(mlp, mlp_data):
    x = mlp_data[0]
    net = lnp.LibraryNetwork(mlp, ["fc1", "out"], thresholds=0.9).fit(x)
    with pytest.raises(ValueError, match="last linear layer 'out' .16 -> 4.*no probed layer has 16 features"):
        ReActEnergyScore().fit(net, mlp_data)


class PooledHead(nn.Module):
    """The classifier's input is a max-pool of the probed layer: no probed layer reproduces the outputs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(10, 16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.out(torch.maximum(h, h.roll(1, dims=1)))


def test_a_layer_that_does_not_reproduce_the_outputs_is_refused(mlp_data):
    x = mlp_data[0]
    net = lnp.LibraryNetwork(PooledHead().eval(), ["fc1", "out"], thresholds=0.9).fit(x)
    with pytest.raises(ValueError, match=r"none reproduces the model's outputs through it \(tried fc1 \(as is\), "
                                         r"fc1 \(after ReLU\)\)"):
        ReActEnergyScore().fit(net, x)
