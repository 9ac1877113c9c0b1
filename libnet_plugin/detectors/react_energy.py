"""ReAct with the energy score, ``"react-energy"`` (Sun, Guo & Li, 2021, https://arxiv.org/abs/2111.12797)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import NonFiniteError
from ._features import require_tensor
from ._posthoc import Penultimate, PenultimateScore, percentile

__all__ = ['ReActEnergyScore']


class ReActEnergyScore(PenultimateScore):
    """ReAct (Sun, Guo & Li, NeurIPS 2021, https://arxiv.org/abs/2111.12797) with energy, ``"react-energy"``.

    The penultimate activations ``h`` (the input of the model's last linear layer, found as
    :mod:`._posthoc` describes: a probed layer's output, with ReLU when the model applies one, checked to
    reproduce the outputs through the classifier's ``W``, ``b``) are clipped at ``c``, the ``percentile``-th
    percentile of all training activation values (every unit of every training input, linear interpolation as
    ``numpy.percentile``); the score is the energy of the recomputed logits,
    ``-T logsumexp((min(h, c) W^T + b) / T)`` (higher = more suspicious). Fitting refuses, naming what
    it tried, when no probed layer is the classifier's input or the model is not a torch module.

    Args:
        percentile: ``p`` (90, the paper's default).
        temperature: ``T`` of the energy (1).
        layer: the probed layer whose output feeds the classifier (default: found).
        activation: ``"auto"`` (found), ``"none"`` or ``"relu"`` applied to that layer's output.
        classifier: the model's last linear layer (default: the last ``nn.Linear`` with one output per class).

    Example:
        >>> ReActEnergyScore(percentile=95).percentile
        95.0
    """

    differentiable: ClassVar[bool] = True
    name: ClassVar[str] = "react-energy"

    #: fitted attributes (set by fit and load; None before)
    clip_: Tensor | None = None

    def __init__(self, percentile: float = 90.0, temperature: float = 1.0, layer: str | None = None,
                 activation: str = "auto", classifier: str | None = None):
        super().__init__(layer, activation, classifier)
        if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
            raise ValueError(f"percentile must be a number in (0, 100], got {percentile!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        self.percentile = float(percentile)
        self.temperature = float(temperature)

    def __repr__(self) -> str:
        return f"ReActEnergyScore(percentile={self.percentile}, temperature={self.temperature}, layer={self.layer!r})"

    def _fit_features(self, net: Any, pen: Penultimate, feats: Tensor) -> None:
        clip = percentile(feats, self.percentile).float()
        if not torch.isfinite(clip):
            raise NonFiniteError(f"the 'react-energy' clip of layer {pen.layer!r} is not finite")
        self.clip_ = clip.to(net.device)

    def from_features(self, pen: Penultimate, h: Tensor) -> Tensor:
        assert self.clip_ is not None
        z = pen.logits(torch.minimum(h, self.clip_.to(h.device)))
        return -self.temperature * torch.logsumexp(z / self.temperature, dim=1)

    def _config(self) -> dict[str, Any]:
        return {"percentile": self.percentile, "temperature": self.temperature}

    def _state(self) -> dict[str, Tensor]:
        return {} if self.clip_ is None else {"clip": self.clip_.reshape(1)}

    def _load_state(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        self.clip_ = require_tensor(state, "clip", self.name).float().reshape(()).to(net.device)
