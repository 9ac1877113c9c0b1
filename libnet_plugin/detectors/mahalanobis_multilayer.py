"""Lee et al.'s multi-layer Mahalanobis score, ``"mahalanobis-multilayer"`` (Lee et al., 2018,
https://arxiv.org/abs/1807.03888), without input pre-processing and without the regression on attacks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._batches import iter_batches, n_rows
from ..distributed import sum_over_ranks
from ..errors import NotFittedError
from ..probe import ProbeResult
from ._features import require_tensor
from .api import FittedNetwork
from .mahalanobis import MahalanobisScore

__all__ = ['MultiLayerMahalanobisScore']


class MultiLayerMahalanobisScore(MahalanobisScore):
    """Multi-layer Mahalanobis (Lee, Lee, Lee & Shin, NeurIPS 2018, https://arxiv.org/abs/1807.03888), ``"mahalanobis-multilayer"``.

    Per layer, as in the paper: class-conditional Gaussians with one covariance tied across the classes,
    on the channel means over positions of convolution outputs (the flattened activation otherwise,
    randomly projected beyond ``max_dim`` as ``"mahalanobis"`` does), the classes given by the training
    LABELS (as the paper; the model's answers when the data has none or with ``labels="model"``), and
    the layer's score ``M_l = min_c (f - mu_c)^T S^+ (f - mu_c)``. Left out: the input pre-processing
    (it needs gradients and a step size tuned on OOD data) and the logistic regression that weights the
    layers (it is trained on attacks or OOD data). The layers are combined instead by **z-scores on the
    training inputs**: ``sum_l (M_l - mean_l) / sd_l`` with each layer's mean and standard deviation over
    the training inputs (a second pass over them); higher = more suspicious. (``"mahalanobis"`` fuses the
    same per-layer distances with conformal p-values, classes by the model's answers.)

    Args:
        layers: layers to use (default: every probed layer).
        pool / max_dim / seed / shrinkage: as for ``"mahalanobis"``.
        labels: ``"auto"`` (the training labels when the data carries them, else the model's answers),
            ``"true"`` (require labels) or ``"model"``.

    Example:
        >>> MultiLayerMahalanobisScore(labels="model").labels
        'model'
    """

    name: ClassVar[str] = "mahalanobis-multilayer"
    fuses: ClassVar[bool] = False

    #: fitted attributes (set by fit and load; None before)
    z_mean_: Tensor | None = None
    z_sd_: Tensor | None = None

    def __init__(self, layers: Sequence[str] | None = None, pool: Any = "auto", max_dim: int = 1024,
                 seed: int = 0, shrinkage: float = 0.0, labels: str = "auto"):
        super().__init__(layers, pool=pool, max_dim=max_dim, seed=seed, shrinkage=shrinkage)
        if labels not in ("auto", "true", "model"):
            raise ValueError(f"labels must be 'auto', 'true' or 'model', got {labels!r}")
        self.labels = labels

    def __repr__(self) -> str:
        return f"MultiLayerMahalanobisScore(layers={self.layers}, pool={self.pool!r}, labels={self.labels!r})"

    def _classes(self, result: ProbeResult, labels: Tensor | None, net: FittedNetwork) -> Tensor:
        if self.labels == "model" or (self.labels == "auto" and labels is None):
            return result.answers.to(net.device)
        if labels is None:
            raise ValueError("labels='true' needs training data with labels: pass (X, y) or a labelled loader")
        labels = labels.to(net.device, torch.long)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= net.n_classes_):
            raise ValueError(f"the {self.name!r} detector got training labels outside 0..{net.n_classes_ - 1}")
        return labels

    def _fit(self, net: FittedNetwork, data: Any) -> None:
        self.z_mean_, self.z_sd_ = None, None
        super()._fit(net, data)
        layers = self.fitted_layers()
        s = torch.zeros(len(layers), dtype=torch.float64, device=net.device)
        s2 = torch.zeros_like(s)
        n = 0
        for x, _ in iter_batches(data, net.batch_size):
            if n_rows(x) == 0:
                continue
            d = self.features(net, net.run(x)).detach().to(net.device)
            s += d.sum(dim=0)
            s2 += (d * d).sum(dim=0)
            n += n_rows(x)
        total, n = sum_over_ranks({"s": s, "s2": s2}, n, net.device, f"training inputs for the {self.name!r} detector")
        mean = total["s"] / n
        var = (total["s2"] / n - mean * mean).clamp(min=0)
        self.z_mean_, self.z_sd_ = mean, var.sqrt().clamp(min=1e-12)

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """``sum_l (M_l - mean_l) / sd_l``, the per-layer distances as z-scores on the training inputs.

        Args:
            net: the fitted library network.
            result: one probe run of the batch.

        Returns:
            float32 ``Tensor[B]``.
        """
        self.check_is_fitted()
        if self.z_mean_ is None or self.z_sd_ is None:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net, train) first")
        d = self.features(net, result)
        return ((d - self.z_mean_.to(d.device)) / self.z_sd_.to(d.device)).sum(dim=1).float()

    def surrogate(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        return self.score(net, result)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "labels": self.labels}

    def _state(self) -> dict[str, Tensor]:
        out = super()._state()
        if self.z_mean_ is not None and self.z_sd_ is not None:
            out["z/mean"], out["z/sd"] = self.z_mean_, self.z_sd_
        return out

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        super()._load_state(state, net)
        self.z_mean_ = require_tensor(state, "z/mean", self.name).double().to(net.device)
        self.z_sd_ = require_tensor(state, "z/sd", self.name).double().to(net.device)
