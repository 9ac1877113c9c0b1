"""Metrics of docs/method.md sections 4-6: stable softmax, CPL, agreement counts, confusion index."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

__all__ = ["stable_softmax", "cpl", "agreement_counts", "ConfusionAccumulator"]


def stable_softmax(p: Tensor, dim: int = -1) -> Tensor:
    """Softmax computed after subtracting the max (never overflows for large evidence)."""
    return torch.softmax(p - p.amax(dim=dim, keepdim=True), dim=dim)


def cpl(scores: Mapping[str, Tensor] | Sequence[Tensor]) -> Tensor:
    """Eq. 5: mean over unordered layer pairs of the cosine between the layers' softmax(P).

    Args:
        scores: per-layer evidence ``P`` ``[B, C]`` (at least two layers).

    Returns:
        ``Tensor[B]`` in [0, 1] (softmax vectors are non-negative); low = inconsistent.

    Example:
        >>> p = torch.tensor([[10., 0.]])
        >>> cpl([p, p]).item(), round(cpl([p, -p]).item(), 4)
        (1.0, 0.0001)
    """
    ps = list(scores.values()) if isinstance(scores, Mapping) else list(scores)
    if len(ps) < 2:
        raise ValueError(f"CPL needs at least two layers, got {len(ps)}")
    # all layer pairs at once: unit-length softmax vectors [B, L, C], their Gram matrix [B, L, L]
    s = torch.nn.functional.normalize(stable_softmax(torch.stack(ps, dim=1).double()), dim=2, eps=1e-30)
    i, j = torch.triu_indices(len(ps), len(ps), offset=1, device=s.device)
    return (s @ s.transpose(1, 2))[:, i, j].mean(dim=1).to(ps[0].dtype)


def agreement_counts(p: Tensor, answers: Tensor, labels: Tensor | None = None) -> tuple[int, int, int | None]:
    """Counts behind docs/method.md section 4's figures, for evidence ``p`` ``[B, C]``.

    Returns:
        ``(top1, top3, correct)``: inputs whose argmax P is the model's answer, inputs whose model answer
        is among the 3 largest entries of P, and inputs whose argmax P is the true label (``None``
        without labels).

    Example:
        >>> agreement_counts(torch.tensor([[3., 2., 1., 0.], [0., 1., 2., 3.]]), torch.tensor([0, 1]),
        ...                  torch.tensor([0, 0]))
        (1, 2, 1)
    """
    top = p.topk(min(3, p.shape[1]), dim=1).indices
    answers = answers.to(top.device)
    correct = None if labels is None else int((top[:, 0] == labels.to(top.device)).sum())
    return int((top[:, 0] == answers).sum()), int((top == answers[:, None]).any(dim=1).sum()), correct


class ConfusionAccumulator:
    """Accumulates Eq. 4 over batches: ``CA(d1, d2) = sum_k s_d1^k s_d2^k`` over selected trials.

    Selected trials are those whose predicted class (argmax P) equals the true class d1.
    ``CI = CA / diag(CA)`` row-wise; the diagonal is shown as 0; a class with no selected trial gives
    a row of NaN.
    """

    def __init__(self, n_classes: int, device: torch.device | str = "cpu"):
        self.ca = torch.zeros(n_classes, n_classes, dtype=torch.float64, device=device)

    def update(self, p: Tensor, labels: Tensor) -> None:
        s = stable_softmax(p.double())
        labels = labels.to(s.device, torch.long)
        sel = p.argmax(dim=1) == labels
        s, labels = s[sel], labels[sel]
        rows = s.gather(1, labels[:, None]) * s  # s_d1 * s_d2, [B, C]
        self.ca.index_add_(0, labels, rows)

    def result(self) -> Tensor:
        diag = self.ca.diagonal().clone()
        ci = self.ca / diag[:, None]
        ci[diag == 0] = float("nan")
        ci.fill_diagonal_(0.0)
        ci[diag == 0] = float("nan")
        return ci.float()
