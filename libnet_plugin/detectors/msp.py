"""The maximum-softmax-probability baseline, ``"msp"`` (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import Tensor

from ..metrics import stable_softmax
from ..probe import ProbeResult
from .api import ConsistencyScore, FittedNetwork

__all__ = ['MaxSoftmaxScore']


class MaxSoftmaxScore(ConsistencyScore):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017), ``"msp"``: score ``1 - max softmax(z)``.

    Paper: Hendrycks & Gimpel, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples in
    Neural Networks", ICLR 2017, https://arxiv.org/abs/1610.02136.

    ``z`` is the model's output (logits or log-probabilities: both give the same softmax). Needs no
    fitting and no library.

    Example:
        >>> import torch
        >>> r = ProbeResult(outputs=torch.tensor([[0., 0.], [10., 0.]]), haps={})
        >>> [round(v, 4) for v in MaxSoftmaxScore().fit(None).score(None, r).tolist()]
        [0.5, 0.0]
    """

    name: ClassVar[str] = "msp"
    differentiable: ClassVar[bool] = True

    def __repr__(self) -> str:
        return "MaxSoftmaxScore()"

    def fit(self, net: FittedNetwork | None, data: Iterable[Any] | None = None) -> MaxSoftmaxScore:
        """Nothing to learn: the score reads the model's outputs only.

        Args:
            net: the fitted library network (or ``None``).
            data: ignored.

        Returns:
            self.
        """
        self.fitted_ = True
        return self

    def score(self, net: FittedNetwork | None, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        return 1.0 - stable_softmax(result.outputs.float(), dim=1).amax(dim=1)
