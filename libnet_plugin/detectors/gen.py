"""The generalized-entropy score, ``"gen"`` (Liu et al., 2023, https://arxiv.org/abs/2303.03651)."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from .._validate import check_int
from ._posthoc import LogitScore

__all__ = ['GENScore']


class GENScore(LogitScore):
    """Generalized entropy of the softmax (Liu, Lochman & Zach, CVPR 2023, https://arxiv.org/abs/2303.03651), ``"gen"``.

    With ``p`` the softmax of the logits sorted in decreasing order, the score is
    ``G_gamma(p) = sum_{j <= M} p_j^gamma (1 - p_j)^gamma`` over the ``M`` largest probabilities (not
    renormalised, as in the paper); higher = more uncertain = more suspicious. Needs no fitting.

    Args:
        gamma: ``gamma`` (0.1, the paper's default).
        top_m: ``M`` (100, the paper's default; at most the number of classes).
        logits: ``"auto"``, ``"outputs"`` or a probed layer's name.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> r = ProbeResult(outputs=torch.tensor([[0., 0.], [30., 0.]]), haps={})
        >>> [round(v, 4) for v in GENScore(gamma=1.0, logits="outputs").fit(None).score(None, r).tolist()]
        [0.5, 0.0]
    """

    name: ClassVar[str] = "gen"

    def __init__(self, gamma: float = 0.1, top_m: int = 100, logits: str = "auto"):
        super().__init__(logits)
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0 < gamma):
            raise ValueError(f"gamma must be a positive number, got {gamma!r}")
        self.gamma = float(gamma)
        self.top_m = check_int(top_m, "top_m")

    def __repr__(self) -> str:
        return f"GENScore(gamma={self.gamma}, top_m={self.top_m}, logits={self.logits!r})"

    def from_logits(self, z: Tensor) -> Tensor:
        # in log space, log(1 - p_j) as the logsumexp of the other classes' log-probabilities: finite values and
        # gradients even where the softmax saturates (p_j = 1 or 0 in floating point)
        logp = torch.log_softmax(z.double(), dim=1)
        top, idx = logp.sort(dim=1, descending=True)
        m = min(self.top_m, z.shape[1])
        top, idx = top[:, :m], idx[:, :m]
        others = logp[:, None, :].expand(-1, m, -1)
        others = others.masked_fill(torch.nn.functional.one_hot(idx, z.shape[1]).bool(), float("-inf"))
        log_rest = torch.logsumexp(others, dim=2)
        return torch.exp(self.gamma * (top + log_rest)).sum(dim=1)

    def config(self) -> dict:
        return {**super().config(), "gamma": self.gamma, "top_m": self.top_m}
