"""Libraries: novelty memories of normalised hidden activation patterns (METHOD.md section 2).

The exact library is the classical leader clustering rule: visit the inputs in order; store the first;
store each later one when its largest cosine to everything stored so far is strictly below ``theta``.
:class:`ExactLibrary` computes the same node list as the one-by-one loop :func:`leader_reference`, for
every batch size, at about the cost of one matrix product per batch.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from .errors import NotFittedError, ShapeMismatchError

__all__ = ["Library", "ExactLibrary", "leader_reference", "normalize_rows", "validate_threshold", "EPS"]

#: Added to the norm before dividing (METHOD.md section 1): a zero vector stays zero.
EPS = 1e-12


def normalize_rows(f: Tensor) -> Tensor:
    """L2-normalise each row: ``f / (||f|| + eps)``; a zero row stays zero."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


def validate_threshold(theta: Any, layer: str | None = None) -> float:
    """Return ``theta`` as a float after checking it lies in (0, 1]."""
    where = f" for layer {layer!r}" if layer else ""
    try:
        value = float(theta)
    except (TypeError, ValueError):
        raise TypeError(f"threshold{where} must be a number in (0, 1], got {theta!r}") from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"threshold{where} must lie in (0, 1], got {value!r}")
    return value


def leader_reference(haps: Tensor, threshold: float) -> list[int]:
    """The one-by-one leader rule (reference implementation; slow, kept for tests and benchmarks).

    Args:
        haps: ``[N, D]`` activation patterns in visiting order (normalised here).
        threshold: theta in (0, 1].

    Returns:
        The row indices of ``haps`` that become library nodes, in order.

    Example:
        >>> x = torch.tensor([[1., 0.], [1., 0.1], [0., 1.]])
        >>> leader_reference(x, 0.9)
        [0, 2]
    """
    theta = validate_threshold(threshold)
    x = normalize_rows(haps)
    nodes = torch.empty(x.shape[0], x.shape[1], dtype=x.dtype, device=x.device)
    kept: list[int] = []
    for i in range(x.shape[0]):
        if kept:
            best = torch.mv(nodes[: len(kept)], x[i]).max()
            if not bool(best < theta):
                continue
        nodes[len(kept)] = x[i]
        kept.append(i)
    return kept


@runtime_checkable
class Library(Protocol):
    """What a ``libnet_library`` hook returns: a growing novelty memory for one layer.

    Implementations receive raw (un-normalised) flattened HAPs and normalise (or transform) them
    themselves, so transforms such as sparse sampling stay inside the library.
    """

    threshold: float

    @property
    def size(self) -> int: ...

    @property
    def node_indices(self) -> Tensor: ...

    def partial_fit(self, haps: Tensor, indices: Tensor) -> Tensor:
        """Visit the rows of ``haps`` in order; return a ``BoolTensor[B]`` of the rows stored."""
        ...

    def similarity(self, haps: Tensor) -> Tensor:
        """The library's output ``h = W f_hat``: cosines ``[B, M]`` of each row to every node."""
        ...

    def state_dict(self) -> dict[str, Tensor]: ...

    def load_state_dict(self, state: dict[str, Tensor]) -> None: ...

    def config(self) -> dict[str, Any]: ...


class ExactLibrary:
    """The exact batched leader library (the default, name ``"exact"``).

    Each batch is compared with the current library in one matrix product; rows whose best cosine is
    already ``>= threshold`` are final (the library only grows). The remaining rows follow the
    one-by-one rule against the library plus the rows of the same batch accepted before them, using
    their Gram matrix. Nodes live in a pre-allocated buffer that doubles when full.

    Args:
        threshold: theta in (0, 1]; a higher theta gives a bigger library.
        device: where nodes are kept and computed.
        layer: the layer name (for error messages).
        dtype: storage/compute dtype (float32 by default).
        initial_capacity: rows pre-allocated before the first doubling.

    Example:
        >>> lib = ExactLibrary(0.9)
        >>> lib.partial_fit(torch.tensor([[1., 0.], [1., .1], [0., 1.]]), torch.arange(3)).tolist()
        [True, False, True]
        >>> lib.size, lib.node_indices.tolist()
        (2, [0, 2])
    """

    name = "exact"

    def __init__(self, threshold: float, *, device: Any = None, layer: str = "", dtype: torch.dtype = torch.float32,
                 initial_capacity: int = 256, dim: int | None = None, **_: Any):
        self.layer = layer
        self.threshold = validate_threshold(threshold, layer)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.initial_capacity = int(initial_capacity)
        self.dim: int | None = None if dim is None else int(dim)
        self._nodes: Tensor | None = None
        self._indices: Tensor = torch.empty(0, dtype=torch.long)
        self._size = 0
        #: number of rows visited by :meth:`partial_fit` so far
        self.n_seen = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, threshold={self.threshold}, size={self._size})"

    # -- transform hook for subclasses (sparse / projected libraries) --------------------------
    def transform(self, haps: Tensor) -> Tensor:
        """Map raw HAPs ``[B, D]`` to the normalised vectors the library stores (identity + L2 here)."""
        return normalize_rows(haps.to(self.device, self.dtype))

    # -- state ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of stored nodes M."""
        return self._size

    @property
    def nodes(self) -> Tensor:
        """The stored normalised nodes ``[M, D']`` (a view of the buffer)."""
        if self._nodes is None:
            raise NotFittedError(f"the library of layer {self.layer!r} is empty; call fit first")
        return self._nodes[: self._size]

    @property
    def node_indices(self) -> Tensor:
        """``LongTensor[M]``: index (visiting order) of the training input behind each node."""
        return self._indices[: self._size]

    def _check_dim(self, haps: Tensor) -> None:
        if haps.dim() != 2:
            raise ShapeMismatchError(
                f"layer {self.layer!r}: expected flattened activations of shape [B, D], got {tuple(haps.shape)}")
        if self.dim is None:
            self.dim = int(haps.shape[1])
        elif haps.shape[1] != self.dim:
            raise ShapeMismatchError(
                f"layer {self.layer!r}: activations have {haps.shape[1]} features per input, but the library "
                f"was fitted on {self.dim}; got a batch of shape {tuple(haps.shape)}, expected [B, {self.dim}]")

    def _append(self, rows: Tensor, indices: Tensor) -> None:
        n_new = rows.shape[0]
        if n_new == 0:
            return
        need = self._size + n_new
        if self._nodes is None or need > self._nodes.shape[0]:
            cap = max(self.initial_capacity, need, 2 * (0 if self._nodes is None else self._nodes.shape[0]))
            buf = torch.empty(cap, rows.shape[1], dtype=self.dtype, device=self.device)
            idx = torch.empty(cap, dtype=torch.long)
            if self._nodes is not None and self._size:
                buf[: self._size] = self._nodes[: self._size]
                idx[: self._size] = self._indices[: self._size]
            self._nodes, self._indices = buf, idx
        self._nodes[self._size: need] = rows
        self._indices[self._size: need] = indices.to("cpu", torch.long)
        self._size = need

    # -- fitting -------------------------------------------------------------------------------
    def partial_fit(self, haps: Tensor, indices: Tensor | None = None) -> Tensor:
        """Visit the rows of ``haps`` in order and store the novel ones.

        Args:
            haps: raw flattened activations ``[B, D]``.
            indices: ``LongTensor[B]`` training-set indices of the rows (default: continuing count).

        Returns:
            ``BoolTensor[B]`` (on the library's device): which rows were stored.
        """
        self._check_dim(haps)
        b = haps.shape[0]
        if indices is None:
            indices = torch.arange(self.n_seen, self.n_seen + b)
        elif indices.shape != (b,):
            raise ShapeMismatchError(f"layer {self.layer!r}: indices must have shape [{b}], got {tuple(indices.shape)}")
        self.n_seen += b
        x = self.transform(haps)
        stored = torch.zeros(b, dtype=torch.bool, device=self.device)
        if b == 0:
            return stored
        if self._size:
            best = (x @ self.nodes.T).amax(dim=1)
            cand = torch.nonzero(best < self.threshold).flatten()
        else:
            cand = torch.arange(b, device=self.device)
        if cand.numel() == 0:
            return stored
        xc = x[cand]
        # One-by-one rule among the undecided rows only: row i is rejected iff an accepted row j < i of
        # this batch has cosine >= theta with it. The Gram matrix is small (undecided rows only).
        gram = (xc @ xc.T).cpu().numpy()
        blocked = np.zeros(len(cand), dtype=bool)
        accept = np.zeros(len(cand), dtype=bool)
        theta = self.threshold
        for i in range(len(cand)):
            if blocked[i]:
                continue
            accept[i] = True
            blocked |= gram[i] >= theta
        acc = torch.from_numpy(np.flatnonzero(accept)).to(self.device)
        rows = cand[acc]
        self._append(x[rows], indices.to(self.device)[rows])
        stored[rows] = True
        return stored

    def similarity(self, haps: Tensor) -> Tensor:
        """Cosines ``[B, M]`` between each row of ``haps`` and every stored node (``h = W f_hat``)."""
        self._check_dim(haps)
        return self.transform(haps) @ self.nodes.T

    # -- persistence ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able settings needed to rebuild an empty library of this kind."""
        return {"name": self.name, "threshold": self.threshold, "dim": self.dim}

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to save: the nodes and their training indices."""
        return {"nodes": self.nodes.contiguous(), "node_indices": self.node_indices.contiguous()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore nodes saved by :meth:`state_dict` (replaces the current content)."""
        nodes = state["nodes"].to(self.device, self.dtype)
        self._nodes = nodes.clone()
        self._indices = state["node_indices"].to("cpu", torch.long).clone()
        self._size = nodes.shape[0]
