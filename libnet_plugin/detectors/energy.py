"""The energy score, ``"energy"`` (Liu et al., 2020, https://arxiv.org/abs/2010.03759)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from ._posthoc import LogitScore

__all__ = ['EnergyScore']


class EnergyScore(LogitScore):
    """Free energy of the logits (Liu et al., NeurIPS 2020, https://arxiv.org/abs/2010.03759), ``"energy"``.

    The score is ``E(x) = -T logsumexp(z / T)`` of the logits ``z`` (higher = more suspicious: in-domain
    inputs have low energy). Needs no fitting; the logits are read as :mod:`._posthoc` describes (the last
    probed ``nn.Linear`` with one output per class, else the model's outputs; log-probability outputs are
    refused).

    Args:
        temperature: ``T`` (1 in the paper).
        logits: ``"auto"``, ``"outputs"`` or a probed layer's name.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> r = ProbeResult(outputs=torch.tensor([[0., 0.], [10., 0.]]), haps={})
        >>> [round(v, 4) for v in EnergyScore(logits="outputs").fit(None).score(None, r).tolist()]
        [-0.6931, -10.0]
    """

    name: ClassVar[str] = "energy"

    def __init__(self, temperature: float = 1.0, logits: str = "auto"):
        super().__init__(logits)
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"EnergyScore(temperature={self.temperature}, logits={self.logits!r})"

    def from_logits(self, z: Tensor) -> Tensor:
        return -self.temperature * torch.logsumexp(z / self.temperature, dim=1)

    def config(self) -> dict:
        return {**super().config(), "temperature": self.temperature}
