"""Hebbian readout (docs/method.md sections 3 and 4): from library outputs to per-layer class evidence."""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from .errors import NotFittedError, ShapeMismatchError

__all__ = ["Readout", "WeightedReadout", "HebbianReadout", "hebbian_gain", "topk_evidence"]


def hebbian_gain(h: Tensor, width: float = 0.01) -> Tensor:
    """``g(x) = exp(-(1 - x) / width)`` (Eq. 2); falls by e for every ``width`` of cosine below 1.

    Values of g at or below the smallest normal number of ``h``'s dtype (about 1.2e-38 in float32, cosines
    more than ``87.3 * width`` below 1) are returned as 0. They are below the rounding of any sum they
    enter (a node's own input adds g = 1 to its row), and on x86 CPUs every arithmetic operation that
    produces or reads such subnormal numbers takes a slow microcode path: with cosines near 0, as
    between unrelated inputs, nearly all of g is subnormal, and computing g and its product with the
    answers then took about twice as long as the similarity product itself.

    Example:
        >>> hebbian_gain(torch.tensor([1.0, 0.99, 0.0]))
        tensor([1.0000, 0.3679, 0.0000])
    """
    h = h if h.is_floating_point() else h.float()
    # -(1 - h) / width with the same rounding (negation is exact), without a temporary per operation
    arg = h.sub(1.0).div_(width)
    below = arg <= math.log(torch.finfo(arg.dtype).tiny)
    # exp of 0 on the entries set to 0 afterwards: exp never sees an argument with a subnormal result
    return torch.nn.functional.threshold_(arg, math.log(torch.finfo(arg.dtype).tiny), 0.0).exp_().masked_fill_(below, 0.0)


def topk_evidence(h: Tensor, weight: Tensor, top_k: int) -> Tensor:
    """Eq. 3: ``P = sum over the top_k nodes n by h of weight[n, :] * h_n``.

    Args:
        h: library outputs (cosines) ``[B, M]``.
        weight: readout weights ``[M, C]``.
        top_k: nodes used per input (clipped to M).

    Returns:
        ``Tensor[B, C]``.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    k = min(int(top_k), h.shape[1])
    if k == h.shape[1]:  # every node counts: no selection needed
        return h @ weight
    vals, idx = h.topk(k, dim=1, sorted=False)  # a sum over the k nodes: their order does not matter
    return (vals.unsqueeze(1) @ weight[idx]).squeeze(1)


@runtime_checkable
class Readout(Protocol):
    """What a ``libnet_readout`` hook returns."""

    n_classes: int

    def reset(self, n_nodes: int) -> None: ...

    def accumulate(self, h: Tensor, answers: Tensor) -> None: ...

    def scores(self, h: Tensor, top_k: int) -> Tensor: ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def config(self) -> dict[str, Any]: ...


@runtime_checkable
class WeightedReadout(Readout, Protocol):
    """A :class:`Readout` whose evidence is a weight matrix ``weight`` ``[M, C]`` over the library nodes."""

    @property
    def weight(self) -> Tensor: ...


class HebbianReadout:
    """The Hebbian readout of Eq. 2 with the top-k prediction of Eq. 3 (name ``"hebbian"``).

    ``W[n, m] = sum_k g(h_n^k) * O_m^k`` with ``O^k = +1`` at the model's answer for input k, ``-1``
    elsewhere; no normalisation.

    Args:
        n_classes: number of classes C.
        width: the width of g (0.01 in the paper).
        device: where the weights live.

    Example:
        >>> r = HebbianReadout(2)
        >>> r.reset(1)
        >>> r.accumulate(torch.tensor([[1.0], [0.99]]), torch.tensor([0, 1]))
        >>> r.weight  # g(1) - g(.99) for class 0, the opposite for class 1
        tensor([[ 0.6321, -0.6321]])
    """

    name = "hebbian"

    def __init__(self, n_classes: int, *, width: float = 0.01, device: Any = None):
        if int(n_classes) < 2:
            raise ValueError(f"n_classes must be at least 2, got {n_classes!r}")
        if not (width > 0 and math.isfinite(width)):
            raise ValueError(f"width must be a positive number, got {width!r}")
        self.n_classes = int(n_classes)
        self.width = float(width)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._weight: Tensor | None = None

    def __repr__(self) -> str:
        m = None if self._weight is None else self._weight.shape[0]
        return f"HebbianReadout(n_classes={self.n_classes}, width={self.width}, nodes={m})"

    @property
    def weight(self) -> Tensor:
        """The readout weights ``W^F``.

        Returns:
            ``Tensor[M, C]``.
        """
        if self._weight is None:
            raise NotFittedError("the readout has no weights yet; call fit first")
        return self._weight

    def reset(self, n_nodes: int) -> None:
        """Start a new accumulation (zero weights).

        Args:
            n_nodes: the library's node count M.
        """
        self._weight = torch.zeros(int(n_nodes), self.n_classes, dtype=torch.float32, device=self.device)

    def accumulate(self, h: Tensor, answers: Tensor) -> None:
        """Add one batch to W.

        Args:
            h: library outputs ``[B, M]``.
            answers: the model's answers, ``LongTensor[B]``.
        """
        w = self.weight
        if h.shape[1] != w.shape[0]:
            raise ShapeMismatchError(f"library output has {h.shape[1]} nodes, readout expects {w.shape[0]}")
        answers = answers.to(self.device, torch.long)
        if answers.numel() and (int(answers.min()) < 0 or int(answers.max()) >= self.n_classes):
            raise ValueError(f"model answers must lie in [0, {self.n_classes}), got range "
                             f"[{int(answers.min())}, {int(answers.max())}]")
        g = hebbian_gain(h.to(self.device, torch.float32), self.width)
        onehot = torch.nn.functional.one_hot(answers, self.n_classes).to(g.dtype)
        # O = 2 * onehot - 1  =>  g^T O = 2 g^T onehot - sum_k g
        w += 2.0 * (g.T @ onehot) - g.sum(dim=0, keepdim=True).T

    def scores(self, h: Tensor, top_k: int) -> Tensor:
        """Eq. 3 evidence ``P`` from library outputs.

        Args:
            h: library outputs ``[B, M]``.
            top_k: the number of most similar nodes read per input.

        Returns:
            ``Tensor[B, C]``.
        """
        return topk_evidence(h.to(self.device), self.weight, top_k)

    def config(self) -> dict[str, Any]:
        """The settings saved with a network.

        Returns:
            ``{"name", "n_classes", "width"}``.
        """
        return {"name": self.name, "n_classes": self.n_classes, "width": self.width}

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors saved with a network.

        Returns:
            ``{"weight": Tensor[M, C]}``.
        """
        return {"weight": self.weight.contiguous()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the weights :meth:`state_dict` saved.

        Args:
            state: ``{"weight": Tensor[M, C]}``.
        """
        w = state["weight"]
        if w.dim() != 2 or w.shape[1] != self.n_classes:
            raise ShapeMismatchError(f"saved readout weight has shape {tuple(w.shape)}, expected [M, {self.n_classes}]")
        self._weight = w.to(self.device, torch.float32).clone()
