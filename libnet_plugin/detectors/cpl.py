"""The paper's consistency score, ``"cpl"``: one minus the consistency of predictions across layers (Eq. 5)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

from torch import Tensor

from .._validate import check_int
from ..metrics import cpl
from ..probe import ProbeResult
from .api import ConsistencyScore, FittedNetwork

__all__ = ["CPLScore"]


class CPLScore(ConsistencyScore):
    """``1 - CPL`` (Eq. 5) from the evidence of the ``top_k`` library nodes per layer (20 in the paper).

    Paper: Jung Hoon Lee, "Library network, a possible path to explainable neural networks", 2019,
    https://arxiv.org/abs/1909.13360 (Eq. 5).

    ``top_k`` is the number of library nodes behind each layer's prediction (Eq. 3) used for this score;
    it is independent of the network's own ``top_k``. Needs no fitting beyond the library network.

    Args:
        top_k: library nodes per layer behind each layer's prediction.

    Example:
        >>> s = CPLScore(top_k=20)
        >>> s.name, s.top_k, s.uses_library
        ('cpl', 20, True)
    """

    name: ClassVar[str] = "cpl"
    uses_library: ClassVar[bool] = True

    def __init__(self, top_k: int = 20):
        self.top_k = check_int(top_k, "top_k")

    def __repr__(self) -> str:
        return f"CPLScore(top_k={self.top_k})"

    def fit(self, net: FittedNetwork, data: Iterable[Any] | None = None) -> CPLScore:
        net.check_fitted()
        self.fitted_ = True
        return self

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        return 1.0 - cpl(net.scores_from_haps(result.haps, top_k=self.top_k))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "top_k": self.top_k}
