"""The recommended detector, ``"library-fusion"``: library distances per layer and the model's confidence, fused.

No single score wins everywhere: distances to the library's class statistics catch large perturbations
and inputs from elsewhere, whose activations leave the answer class's region layer after layer; the
model's own confidence catches minimal perturbations (CW, DeepFool), which stop just across a decision
boundary where the softmax is flat. This score puts both kinds of evidence side by side as conformal
p-values on clean data and fuses them (docs/method.md section 16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import NotFittedError, ShapeMismatchError
from ..metrics import stable_softmax
from ..probe import ProbeResult
from .api import FittedNetwork
from .library_margin import LibraryDistanceScore

__all__ = ["LibraryFusionScore"]


class LibraryFusionScore(LibraryDistanceScore):
    """Per-layer library distance plus output features, conformal p-values fused with Fisher's method.

    Paper: Jung Hoon Lee, "Library network, a possible path to explainable neural networks", 2019,
    https://arxiv.org/abs/1909.13360 (the libraries; the fusion is this project's, docs/method.md section 16).

    The per-layer features are those of :class:`LibraryDistanceScore` (``features=("distance",)`` by
    default: the Mahalanobis distance of the normalised activation to the library nodes of the model's
    answer class). The output features, computed from the model's outputs ``z`` of the same forward
    pass, are any of:

    - ``"confidence"``: ``1 - max softmax(z)`` (the ``"msp"`` baseline's score);
    - ``"logit-margin"``: ``-(z_(1) - z_(2))``, minus the gap between the two largest outputs.

    Every feature becomes a conformal p-value against the clean calibration inputs and the p-values
    are fused with Fisher's method (``combine="fisher"``: ``-sum log p``), by the smallest one
    (``combine="min"``: ``-log min p``, Tippett's method, which a single strong feature drives alone) or
    by a weighted Fisher sum (``combine="weighted"``: ``-sum_j w_j log p_j`` with
    ``w_j = 1 / sum_k |r_jk|``, ``r`` the correlation of the ``-log p`` of the clean calibration inputs,
    so that features that repeat one another, such as the two output features, share one weight) or by
    the truncated product (``combine="truncated"``: ``sum_j max(0, log(tau / p_j))``, Zaykin et al. 2002,
    https://doi.org/10.1002/gepi.0042, ``tau = truncation``: only the features below ``tau`` count, so
    the features an input leaves typical do not dilute the ones it moves far). It
    needs only the fitted library network and the forward pass the guard runs anyway; its gradient (for
    adaptive attacks) is that of the standardised features, weighted as the p-values are
    (:meth:`FusedLayerScore.surrogate <libnet_plugin.detectors.FusedLayerScore.surrogate>`).

    Args:
        layers: see :class:`LibraryMarginScore <libnet_plugin.detectors.LibraryMarginScore>`.
        **settings: the other settings of :class:`LibraryDistanceScore
            <libnet_plugin.detectors.LibraryDistanceScore>` (``features``, ``k``, ``pool``, ``max_dim``, ...).
        outputs: the output features (default both: ``("confidence", "logit-margin")``, chosen on
            development splits, docs/method.md section 16); ``()`` gives ``"library-distance"``.
        combine: ``"fisher"`` (default), ``"min"``, ``"weighted"`` or ``"truncated"``.
        truncation: ``combine="truncated"``'s ``tau``, in ``(0, 1]`` (default 0.1; 1 gives Fisher's sum).
        tail: ``"none"`` (default: conformal p-values, at least ``1 / (n + 1)``) or ``"exponential"``: beyond
            the largest clean reference value of a feature, its p-value keeps falling as
            ``exp(-excess / scale)``, the scale the mean excess of the reference's top 10% over their 90th
            percentile, so that features far outside the clean range (class-Gaussian distances under an
            L-inf attack) are not capped at the conformal floor.

    Example:
        >>> from libnet_plugin.plugins import make_detector
        >>> make_detector("library-fusion", {})
        LibraryFusionScore(layers=None, features=('distance',), outputs=('confidence', 'logit-margin'))
    """

    name: ClassVar[str] = "library-fusion"
    OUTPUTS: ClassVar[tuple[str, ...]] = ("confidence", "logit-margin")
    COMBINE: ClassVar[tuple[str, ...]] = ("fisher", "min", "weighted", "truncated")

    TAILS: ClassVar[tuple[str, ...]] = ("none", "exponential")

    def __init__(self, layers: Sequence[str] | None = None, *, outputs: Sequence[str] = ("confidence", "logit-margin"),
                 combine: str = "fisher", tail: str = "none", truncation: float = 0.1, **settings: Any):
        super().__init__(layers, **settings)
        if tail not in self.TAILS:
            raise ValueError(f"tail must be one of {self.TAILS}, got {tail!r}")
        self.tail = tail
        if combine not in self.COMBINE:
            raise ValueError(f"combine must be one of {self.COMBINE}, got {combine!r}")
        self.combination = combine
        if isinstance(truncation, bool) or not isinstance(truncation, (int, float)) or not 0 < truncation <= 1:
            raise ValueError(f"truncation must be a number in (0, 1], got {truncation!r}")
        self.truncation = float(truncation)
        self._weights: Tensor | None = None  # combine="weighted": set from the clean reference
        outs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
        bad = [o for o in outs if o not in self.OUTPUTS]
        if bad or len(set(outs)) != len(outs):
            raise ValueError(f"outputs must be distinct names among {self.OUTPUTS}, got {outputs!r}")
        self.outputs = outs

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={self.layers}, features={self.layer_features}, outputs={self.outputs})"

    def feature_names(self) -> list[str]:
        return super().feature_names() + [f"output/{o}" for o in self.outputs]

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        cols = [super().features(net, result)]
        z = result.outputs.to(net.device)
        if "confidence" in self.outputs:
            cols.append((1.0 - stable_softmax(z.double(), dim=1).amax(dim=1))[:, None])
        if "logit-margin" in self.outputs:
            top = z.double().topk(min(2, z.shape[1]), dim=1).values
            gap = top[:, 0] - top[:, 1] if top.shape[1] > 1 else torch.zeros_like(top[:, 0])
            cols.append((-gap)[:, None])
        return torch.cat(cols, dim=1)

    def combine(self, p_values: Tensor) -> Tensor:
        if self.combination == "min":
            return -torch.log(p_values.amin(dim=1))
        if self.combination == "weighted":
            return self._weighted_fisher(p_values, self._feature_weights(p_values))
        if self.combination == "truncated":
            return (math.log(self.truncation) - torch.log(p_values)).clamp(min=0).sum(dim=1)
        return super().combine(p_values)

    def combine_on(self, p_values: Tensor, reference: Tensor) -> Tensor:
        if self.combination != "weighted":
            return super().combine_on(p_values, reference)
        w = self.correlation_weights(reference).to(device=p_values.device, dtype=p_values.dtype)
        return self._weighted_fisher(p_values, w)

    @staticmethod
    def _weighted_fisher(p_values: Tensor, weights: Tensor) -> Tensor:
        """``-sum_j w_j log p_j`` per row."""
        return -(torch.log(p_values) * weights).sum(dim=1)

    def _feature_weights(self, like: Tensor) -> Tensor:
        if self._weights is None:
            raise NotFittedError("combine='weighted' takes its weights from the clean reference; calibrate first")
        if self._weights.shape[0] != like.shape[-1]:
            raise ShapeMismatchError(f"{self._weights.shape[0]} weights for {like.shape[-1]} features")
        return self._weights.to(device=like.device, dtype=like.dtype)

    @property
    def weights_(self) -> Tensor:
        """``combine="weighted"``: the feature weights set from the clean reference at calibration.

        Returns:
            float64 ``Tensor[F]``, :meth:`correlation_weights` of the reference's p-values.
        """
        if self._weights is None:
            raise NotFittedError("combine='weighted' takes its weights from the clean reference; calibrate first")
        return self._weights

    @staticmethod
    def correlation_weights(p_values: Tensor) -> Tensor:
        """``w_j = 1 / sum_k |r_jk|`` with ``r`` the correlation of ``-log p`` over rows ``[N, F]`` (float64).

        Independent features keep weight 1; ``m`` identical copies of one feature share weight 1 (each
        ``1 / m``). A feature constant on the reference is uncorrelated with the others.

        Args:
            p_values: per-feature p-values ``[N, F]``.

        Returns:
            float64 ``Tensor[F]``.
        """
        e = -torch.log(p_values.detach().double())
        e = e - e.mean(dim=0)
        sd = e.pow(2).mean(dim=0).sqrt()
        z = torch.where(sd > 0, e / sd.clamp(min=1e-300), torch.zeros_like(e))
        r = (z.T @ z) / e.shape[0]
        r.fill_diagonal_(1.0)
        return 1.0 / r.abs().sum(dim=1)

    def _tail_scales(self) -> Tensor:
        """Per feature, the scale of the clean reference's upper tail: the mean excess over its 90th percentile
        (the maximum-likelihood scale of an exponential tail), at least 1e-12."""
        srt = self.fusion.sorted_reference
        if srt is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        k = max(1, int(0.1 * srt.shape[0]))
        top = srt[-k:]
        q = srt[-k - 1] if srt.shape[0] > k else srt[0]
        fin = top.isfinite() & q.isfinite()
        excess = torch.where(fin, top - q, torch.zeros_like(top))
        return (excess.sum(dim=0) / fin.sum(dim=0).clamp(min=1)).clamp(min=1e-12)

    def _with_tail(self, p: Tensor, features: Tensor, top: Tensor, p_top: Tensor | float) -> Tensor:
        """``tail="exponential"``: beyond ``top`` (the reference maximum), ``p = p_top exp(-(f - top) / scale)``
        instead of the conformal floor, so that a feature far outside the clean range weighs more than one
        just past it (Fisher's sum of capped p-values cannot tell them apart)."""
        if self.tail == "none":
            return p
        f = features.detach().to(p.device).double()
        excess = (f - top).clamp(min=0)
        excess = torch.where(excess.isfinite(), excess, torch.full_like(excess, 1e300))
        tailed = p_top * torch.exp(-excess / self._tail_scales().to(p.device))
        return torch.where(f > top, torch.minimum(p, tailed).clamp(min=1e-300), p)

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        if self.tail == "none":
            return super().score(net, result)
        self.check_is_fitted()
        f = self.features(net, result)
        srt = self.fusion.sorted_reference
        if srt is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        p = self._with_tail(self.fusion.p_values(f), f, srt[-1], 1.0 / (srt.shape[0] + 1))
        return self.combine(p).float()

    def set_reference(self, features: Tensor) -> Tensor:
        self.check_is_fitted()
        p = self.fusion.fit_p_values(features)
        if self.tail != "none":  # leave-one-out: the maximum of each feature against the others' maximum
            srt = self.fusion.sorted_reference
            assert srt is not None  # fit_p_values just stored it
            f = features.detach().double().to(srt.device)
            at_top = f >= srt[-1]
            p = torch.where(at_top, self._with_tail(p, f, srt[-2], 1.0 / srt.shape[0]), p)
        self._weights = self.correlation_weights(p) if self.combination == "weighted" else None
        return self.combine(p)

    def surrogate(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        if self.combination != "weighted":
            return super().surrogate(net, result)
        self.check_is_fitted()
        z = self.fusion.standardized(self.features(net, result))
        return (z * self._feature_weights(z)).sum(dim=1).float()

    def _state(self) -> dict[str, Tensor]:
        return {**super()._state(), **({} if self._weights is None else {"weights": self._weights})}

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        super()._load_state(state, net)
        w = state.get("weights")
        self._weights = None if w is None else w.double().to(net.device)
        if self.combination == "weighted" and self.fusion.is_fitted and self._weights is None:
            raise ValueError("a saved combine='weighted' detector without its weights")

    def config(self) -> dict[str, Any]:
        extra = {"truncation": self.truncation} if self.combination == "truncated" else {}
        return {**super().config(), "outputs": list(self.outputs), "combine": self.combination, "tail": self.tail,
                **extra}
