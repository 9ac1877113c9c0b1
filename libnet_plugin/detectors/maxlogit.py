"""The maximum-logit score, ``"maxlogit"`` (Hendrycks et al., 2022, https://arxiv.org/abs/1911.11132)."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ._posthoc import LogitScore

__all__ = ['MaxLogitScore']


class MaxLogitScore(LogitScore):
    """Maximum logit (Hendrycks et al., ICML 2022, https://arxiv.org/abs/1911.11132), ``"maxlogit"``.

    The score is ``-max_c z_c`` of the logits ``z`` (higher = more suspicious). Needs no fitting; the
    logits are read as :mod:`._posthoc` describes.

    Args:
        logits: ``"auto"``, ``"outputs"`` or a probed layer's name.

    Example:
        >>> import torch
        >>> from libnet_plugin.probe import ProbeResult
        >>> r = ProbeResult(outputs=torch.tensor([[0., 1.], [10., 0.]]), haps={})
        >>> MaxLogitScore(logits="outputs").fit(None).score(None, r).tolist()
        [-1.0, -10.0]
    """

    name: ClassVar[str] = "maxlogit"

    def __repr__(self) -> str:
        return f"MaxLogitScore(logits={self.logits!r})"

    def from_logits(self, z: Tensor) -> Tensor:
        return -z.amax(dim=1)
