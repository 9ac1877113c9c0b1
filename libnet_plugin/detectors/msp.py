"""The maximum-softmax-probability baseline, ``"msp"`` (Hendrycks & Gimpel, 2017)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._batches import iter_batches
from .._validate import check_int
from ..errors import NotFittedError, ShapeMismatchError
from ..library import NodeLibrary, normalize_rows
from ..metrics import stable_softmax
from ..probe import ProbeResult
from ._features import (
    check_layers, check_pool, class_distances, conv_channels, layer_projection, node_classes, pooled, require_tensor,
    shared_gaussian,
)
from .api import ConsistencyScore, FittedNetwork, FusedLayerScore

__all__ = ['MaxSoftmaxScore']


class MaxSoftmaxScore(ConsistencyScore):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017), ``"msp"``: score ``1 - max softmax(z)``.

    ``z`` is the model's output (logits or log-probabilities: both give the same softmax). Needs no
    fitting and no library.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> r = ProbeResult(outputs=torch.tensor([[0., 0.], [10., 0.]]), haps={})
        >>> [round(v, 4) for v in MaxSoftmaxScore().fit(None).score(None, r).tolist()]
        [0.5, 0.0]
    """

    name: ClassVar[str] = "msp"

    def __init__(self) -> None:
        self.fitted_ = False

    def __repr__(self) -> str:
        return "MaxSoftmaxScore()"

    def fit(self, net: FittedNetwork | None, data: Iterable[Any] | None = None) -> MaxSoftmaxScore:
        """Nothing to learn: the score reads the model's outputs only."""
        self.fitted_ = True
        return self

    def score(self, net: FittedNetwork | None, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        return 1.0 - stable_softmax(result.outputs.float(), dim=1).amax(dim=1)
