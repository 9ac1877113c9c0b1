"""k-th nearest neighbour on normalised penultimate features, ``"knn-normalized"`` (Sun et al., 2022,
https://arxiv.org/abs/2204.06507)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..library import normalize_rows
from ._features import require_tensor
from ._posthoc import Penultimate, PenultimateScore

__all__ = ['KNNNormalizedScore', 'default_k']


def default_k(n_train: int) -> int:
    """``k`` for ``n_train`` training inputs: ``max(1, round(n_train / 1000))``, the paper's k = 50 for the
    50,000 CIFAR-10 images scaled with the training-set size (60 for MNIST's 60,000)."""
    return max(1, round(n_train / 1000))


class KNNNormalizedScore(PenultimateScore):
    """Deep nearest neighbours (Sun, Ming, Zhu & Li, ICML 2022, https://arxiv.org/abs/2204.06507), ``"knn-normalized"``.

    Keeps the L2-normalised penultimate features of every training input (the input of the model's last
    linear layer, found as :mod:`._posthoc` describes; with ``layer`` and ``activation`` both named, the
    classifier is not needed). The score of an input is the Euclidean distance from its normalised
    feature to the ``k``-th nearest normalised training feature (higher = more suspicious). Unlike
    ``"knn"`` (Papernot & McDaniel), no labels and a single layer.

    Args:
        k: neighbours (default :func:`default_k` of the training-set size; at most that size).
        layer / activation / classifier: as for ``"react-energy"``.

    Example:
        >>> default_k(50_000), default_k(60_000), default_k(300)
        (50, 60, 1)
    """

    name: ClassVar[str] = "knn-normalized"
    needs_weights: ClassVar[bool] = False
    #: training features compared at a time
    chunk: ClassVar[int] = 4096

    #: fitted attributes (set by fit and load; None before)
    k_: int | None = None
    train_: Tensor | None = None

    def __init__(self, k: int | None = None, layer: str | None = None, activation: str = "auto",
                 classifier: str | None = None):
        super().__init__(layer, activation, classifier)
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"k must be None or a positive integer, got {k!r}")
        self.k = k

    def __repr__(self) -> str:
        return f"KNNNormalizedScore(k={self.k}, layer={self.layer!r})"

    def _fit_features(self, net: Any, pen: Penultimate, feats: Tensor) -> None:
        n = feats.shape[0]
        self.k_ = min(default_k(n) if self.k is None else self.k, n)
        self.train_ = normalize_rows(feats.float()).to(net.device)

    def from_features(self, pen: Penultimate, h: Tensor) -> Tensor:
        assert self.train_ is not None and self.k_ is not None
        x = normalize_rows(h.float())
        ref = self.train_.to(x.device)
        # the k largest cosines over chunks of the training features, then the k-th overall
        best = None
        for i in range(0, ref.shape[0], self.chunk):
            sims = x @ ref[i:i + self.chunk].T
            part = sims.topk(min(self.k_, sims.shape[1]), dim=1).values
            if best is not None:
                part = torch.cat([best, part], dim=1)
                part = part.topk(min(self.k_, part.shape[1]), dim=1).values
            best = part
        assert best is not None
        kth = best[:, self.k_ - 1]
        return (2.0 - 2.0 * kth).clamp(min=0).sqrt()

    def _config(self) -> dict[str, Any]:
        return {"k": self.k, "k_": self.k_}

    def _state(self) -> dict[str, Tensor]:
        return {} if self.train_ is None else {"train": self.train_}

    def _load_state(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        self.k_ = int(config["k_"])
        self.train_ = require_tensor(state, "train", self.name).float().to(net.device)
