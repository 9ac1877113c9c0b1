"""Virtual-logit matching ("vim", Wang et al. 2022) against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from libnet_plugin.detectors import ViMScore
from libnet_plugin.errors import ShapeMismatchError


def penultimate(mlp, x) -> np.ndarray:
    return torch.relu(mlp.fc2(torch.relu(mlp.fc1(x)))).detach().double().numpy()


def np_vim(mlp, x_train, x, dim):
    w, b = mlp.out.weight.detach().double().numpy(), mlp.out.bias.detach().double().numpy()
    u = -np.linalg.pinv(w) @ b
    h_tr = penultimate(mlp, x_train)
    c = h_tr - u
    vals, vecs = np.linalg.eigh(c.T @ c / len(c))
    ns = vecs[:, np.argsort(-vals)[dim:]]
    alpha = (h_tr @ w.T + b).max(axis=1).mean() / np.linalg.norm(c @ ns, axis=1).mean()
    h = penultimate(mlp, x)
    z = h @ w.T + b
    m = z.max(axis=1, keepdims=True)
    energy = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return alpha * np.linalg.norm((h - u) @ ns, axis=1) - energy


@pytest.mark.parametrize("dim", [None, 5])
def test_vim_matches_the_papers_formula(fitted, mlp, mlp_data, dim):
    score = ViMScore(dim=dim).fit(fitted, mlp_data)
    assert score.dim_ == (8 if dim is None else dim)  # half of the 16 features by default
    x = torch.randn(19, 10, generator=torch.Generator().manual_seed(6)) * 2
    want = np_vim(mlp, mlp_data[0], x, score.dim_)
    torch.testing.assert_close(score.score(fitted, fitted.run(x)), torch.tensor(want, dtype=torch.float32),
                               rtol=1e-4, atol=1e-4)


def test_vim_dim_must_leave_a_residual(fitted, mlp_data):
    with pytest.raises(ShapeMismatchError, match="between 1 and the feature width - 1 .15."):
        ViMScore(dim=16).fit(fitted, mlp_data)
    assert ViMScore(dim=16).pen_ is None
