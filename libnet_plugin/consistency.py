"""Consistency scores served by the ``libnet_consistency_detector`` hook.

A consistency score turns one probe run (the model's outputs plus every layer's HAPs) into a number
per input, higher = more suspicious. The default is the paper's CPL (Eq. 5), scored as ``1 - CPL``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Protocol, runtime_checkable

from torch import Tensor

from .metrics import cpl
from .probe import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from .network import LibraryNetwork

__all__ = ["ConsistencyScore", "CPLScore"]


@runtime_checkable
class ConsistencyScore(Protocol):
    """What a ``libnet_consistency_detector`` hook returns."""

    name: str

    def fit(self, net: "LibraryNetwork", data: Iterable[Any] | None = None) -> "ConsistencyScore":
        """Prepare from the fitted network (and optionally clean data); return self."""
        ...

    def score(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        """``Tensor[B]``, higher = more suspicious, from one probe run."""
        ...


class CPLScore:
    """``1 - CPL`` (Eq. 5) with ``top_k`` nodes per layer (20 in the paper). Needs no fitting.

    Example:
        >>> s = CPLScore(top_k=20)
        >>> s.name, s.top_k
        ('cpl', 20)
    """

    name = "cpl"

    def __init__(self, top_k: int = 20, **_: Any):
        self.top_k = int(top_k)

    def fit(self, net: "LibraryNetwork", data: Iterable[Any] | None = None) -> "CPLScore":
        return self

    def score(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        return 1.0 - cpl(net.scores_from_haps(result.haps, top_k=self.top_k))

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "top_k": self.top_k}
