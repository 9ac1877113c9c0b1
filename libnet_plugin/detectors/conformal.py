"""Conformal p-values against clean reference scores, fused over features with Fisher's method."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import NotFittedError, ShapeMismatchError

__all__ = ["ConformalFusion", "fisher"]


def fisher(p_values: Tensor) -> Tensor:
    """Fisher's fusion of per-feature p-values ``[B, F]``: ``-sum_j log p_j`` ``[B]``."""
    return -torch.log(p_values).sum(dim=1)


class ConformalFusion:
    """Conformal p-values per feature from clean reference scores, fused with Fisher's method.

    For feature ``j`` with clean reference scores ``r_1..r_n``, the p-value of a new score ``s`` is
    ``(1 + #{i: r_i >= s}) / (n + 1)``; the fused score is ``-sum_j log p_j`` (higher = more
    suspicious). :meth:`fit` returns the fused scores of the reference inputs themselves computed
    leave-one-out (each against the other ``n - 1``), so that a threshold chosen on them applies to new
    inputs.

    Example:
        >>> f = ConformalFusion()
        >>> ref = torch.tensor([[0.], [1.], [2.], [3.]])
        >>> f.fit(ref).tolist()  # leave-one-out: p = 1, 3/4, 2/4, 1/4
        [-0.0, 0.2876820724517809, 0.6931471805599453, 1.3862943611198906]
        >>> f.p_values(torch.tensor([[2.5], [9.]])).tolist()
        [[0.4], [0.2]]
    """

    def __init__(self) -> None:
        self._sorted: Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has stored a reference.

        Returns:
            a bool.
        """
        return self._sorted is not None

    @property
    def sorted_reference(self) -> Tensor | None:
        """The clean reference scores sorted per feature.

        Returns:
            float64 ``Tensor[N, F]``; ``None`` before :meth:`fit`.
        """
        return self._sorted

    @property
    def n_reference(self) -> int:
        """The number of clean reference inputs.

        Returns:
            N (0 before :meth:`fit`).
        """
        return 0 if self._sorted is None else int(self._sorted.shape[0])

    def fit(self, reference: Tensor) -> Tensor:
        """Store the clean reference scores.

        Args:
            reference: clean per-feature scores ``[N, F]``, N >= 2.

        Returns:
            their leave-one-out fused scores, ``Tensor[N]``.
        """
        return fisher(self.fit_p_values(reference))

    def fit_p_values(self, reference: Tensor) -> Tensor:
        """Store the clean reference scores.

        Args:
            reference: clean per-feature scores ``[N, F]``, N >= 2.

        Returns:
            their leave-one-out p-values, ``Tensor[N, F]``.
        """
        if reference.dim() != 2 or reference.shape[0] < 2:
            raise ValueError(f"the reference scores must be [N, F] with N >= 2, got {tuple(reference.shape)}")
        ref = reference.detach().double()
        self._sorted = ref.sort(dim=0).values
        ge = self._count_ge(ref)  # each reference row counts itself once
        return ge / ref.shape[0]  # (1 + (ge - 1)) / ((n - 1) + 1)

    def _count_ge(self, scores: Tensor) -> Tensor:
        srt = self._sorted
        if srt is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        n = srt.shape[0]
        cols = [n - torch.searchsorted(srt[:, j].contiguous(), scores[:, j].contiguous(), right=False)
                for j in range(srt.shape[1])]
        return torch.stack(cols, dim=1).double()

    def p_values(self, scores: Tensor) -> Tensor:
        """Conformal p-values of new per-feature scores.

        Args:
            scores: ``Tensor[B, F]``.

        Returns:
            float64 ``Tensor[B, F]`` in ``(0, 1]``.
        """
        if self._sorted is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        if scores.dim() != 2 or scores.shape[1] != self._sorted.shape[1]:
            raise ShapeMismatchError(f"expected per-feature scores of shape [B, {self._sorted.shape[1]}], "
                                     f"got {tuple(scores.shape)}")
        s = scores.detach().to(self._sorted.device).double()
        return (1.0 + self._count_ge(s)) / (self._sorted.shape[0] + 1.0)

    def standardized(self, scores: Tensor) -> Tensor:
        """``(s - mean) / sd`` per feature against the clean reference ``[B, F]``, keeping the autograd graph.

        A non-finite feature (a class without reference nodes) becomes ``1e6`` with no gradient.

        Args:
            scores: ``Tensor[B, F]``.

        Returns:
            float64 ``Tensor[B, F]``.
        """
        srt = self._sorted
        if srt is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        if scores.dim() != 2 or scores.shape[1] != srt.shape[1]:
            raise ShapeMismatchError(f"expected per-feature scores of shape [B, {srt.shape[1]}], "
                                     f"got {tuple(scores.shape)}")
        finite = srt.isfinite()
        ref = torch.where(finite, srt, torch.zeros_like(srt))
        n = finite.sum(dim=0).clamp(min=1)
        mean = ref.sum(dim=0) / n
        sd = (((ref - mean) * finite).pow(2).sum(dim=0) / n).sqrt().clamp(min=1e-12)
        s = scores.to(srt.device).double()
        ok = s.isfinite()
        z = (torch.where(ok, s, torch.zeros_like(s)) - mean) / sd
        return torch.where(ok, z, torch.full_like(z, 1e6))

    def __call__(self, scores: Tensor) -> Tensor:
        """Fisher-fused score ``-sum log p``.

        Args:
            scores: ``Tensor[B, F]``.

        Returns:
            float64 ``Tensor[B]``.
        """
        return fisher(self.p_values(scores))

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors to save.

        Returns:
            ``{"reference": Tensor[N, F]}`` (sorted), or ``{}`` before :meth:`fit`.
        """
        return {} if self._sorted is None else {"reference": self._sorted.contiguous()}

    def load_state_dict(self, state: Mapping[str, Tensor], device: Any = None) -> None:
        """Restore what :meth:`state_dict` saved.

        Args:
            state: ``{"reference": Tensor[N, F]}`` or ``{}``.
            device: where to put it (default: where it is).
        """
        ref = state.get("reference")
        self._sorted = None if ref is None else ref.double().to(device if device is not None else ref.device)
