"""Shared fixtures: tiny seeded models and data (no training, no downloads)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import libnet_plugin as lnp


class TwoLayer(nn.Module):
    """Two identity linear layers: the HAPs of both layers equal the input, so everything is hand-computable."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(2, 2, bias=False)
        self.b = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.eye(2))
            self.b.weight.copy_(torch.eye(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class SmallMLP(nn.Module):
    def __init__(self, d_in: int = 10, n_classes: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, 32)
        self.fc2 = nn.Linear(32, 16)
        self.out = nn.Linear(16, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


@pytest.fixture
def two_layer() -> TwoLayer:
    return TwoLayer().eval()


@pytest.fixture
def mlp() -> SmallMLP:
    torch.manual_seed(0)
    return SmallMLP().eval()


@pytest.fixture
def mlp_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 10, generator=g)
    y = torch.randint(0, 4, (300,), generator=g)
    return x, y


#: The suite's one rule for floats (see the test guide in docs/design.md): two float32 results of the same
#: computation along different code paths (batch sizes, shard sizes, thread counts, CPU kernels, math libraries)
#: agree within ``F32_ULPS`` units of float32 rounding relative to the largest magnitude compared; only results
#: exact by construction (copies, integer indices under a stated tie rule) are compared with ``torch.equal``.
F32_ULPS = 64
F32_RTOL = F32_ULPS * torch.finfo(torch.float32).eps  # 7.6e-6


def assert_close_f32(actual: torch.Tensor, expected: torch.Tensor, msg: object = None) -> None:
    """Assert ``actual`` equals ``expected`` to float32 rounding (the rule above), scaled by ``expected``'s magnitude."""
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    finite = expected[torch.isfinite(expected)]
    scale = float(finite.abs().max()) if finite.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=F32_RTOL, atol=F32_RTOL * max(scale, 1.0),
                               msg=None if msg is None else lambda m: f"{msg}: {m}")


def forward_hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def fitted(mlp, mlp_data):
    """A LibraryNetwork fitted on the MLP's three layers at theta 0.9 (test modules may define their own)."""
    x, _ = mlp_data
    return lnp.LibraryNetwork(mlp, ["fc1", "fc2", "out"], thresholds=0.9).fit(x)
