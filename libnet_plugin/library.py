"""Libraries: novelty memories of normalised hidden activation patterns (docs/method.md section 2).

The exact library is the classical leader clustering rule: visit the inputs in order; store the first;
store each later one when its largest cosine to everything stored so far is strictly below ``theta``.
:class:`ExactLibrary` computes the node list of the one-by-one loop :func:`leader_reference` up to float32
rounding, for every batch size, at about the cost of one matrix product per batch: a row whose deciding cosine
lies within rounding (about 1e-6) of ``theta`` may be decided differently by another batch size, thread count
or CPU kernel, which then changes the later decisions that depend on it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from ._validate import check_float_dtype, check_int, dtype_name
from .errors import NotFittedError, SaveFormatError, ShapeMismatchError

__all__ = ["leader_within", "Library", "NodeLibrary", "ExactLibrary", "leader_reference", "normalize_rows", "validate_threshold", "EPS",
           "count_sketch_map", "count_sketch", "ChunkScores", "LeaderObserver"]

#: Added to the norm before dividing (docs/method.md section 1): a zero vector stays zero.
EPS = 1e-12


def normalize_rows(f: Tensor) -> Tensor:
    """L2-normalise each row: ``f / (||f|| + eps)``; a zero row stays zero."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS)


def validate_threshold(theta: Any, layer: str | None = None) -> float:
    """Return ``theta`` as a float after checking it lies in (0, 1]."""
    where = f" for layer {layer!r}" if layer else ""
    if isinstance(theta, bool):
        raise TypeError(f"threshold{where} must be a number in (0, 1], got {theta!r}")
    try:
        value = float(theta)
    except (TypeError, ValueError):
        raise TypeError(f"threshold{where} must be a number in (0, 1], got {theta!r}") from None
    if not (0.0 < value <= 1.0):
        raise ValueError(f"threshold{where} must lie in (0, 1], got {value!r}")
    return value


def count_sketch_map(width: int, buckets: int, seed: int, *, dtype: torch.dtype = torch.float32,
                     device: Any = None) -> tuple[Tensor, Tensor]:
    """A fixed signed hashing of ``width`` units into ``buckets`` sums (a sparse random projection).

    Every unit goes to exactly one bucket (balanced: bucket sizes differ by at most one) with a random
    sign, so ``<sketch(x), sketch(y)>`` estimates ``<x, y>`` without bias (feature hashing, the count
    sketch) at the cost of one pass over ``x``.

    Args:
        width: number of units D.
        buckets: number of sums (the sketch's dimension).
        seed: seed of the assignment (a ``torch.Generator`` on the CPU, so it is the same on every
            device).
        dtype / device: of the returned signs / both tensors.

    Returns:
        ``(bucket, sign)``: ``LongTensor[D]`` bucket of each unit and ``Tensor[D]`` of +-1.

    Example:
        >>> bucket, sign = count_sketch_map(600, 3, seed=0)
        >>> torch.bincount(bucket).tolist(), sorted(set(sign.tolist()))
        ([200, 200, 200], [-1.0, 1.0])
    """
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(width, generator=gen)
    bucket = torch.empty(width, dtype=torch.long)
    bucket[perm] = torch.arange(width) * buckets // width
    sign = torch.randint(0, 2, (width,), generator=gen).to(dtype) * 2 - 1
    return bucket.to(device), sign.to(device)


def count_sketch(x: Tensor, sketch_map: tuple[Tensor, Tensor], buckets: int) -> Tensor:
    """Apply a :func:`count_sketch_map` to the rows of ``x`` ``[B, D]``; returns ``[B, buckets]``.

    Example:
        >>> m = count_sketch_map(4, 2, seed=0)
        >>> count_sketch(torch.eye(4), m, 2).abs().sum(dim=1).tolist()  # each unit lands in one bucket
        [1.0, 1.0, 1.0, 1.0]
    """
    bucket, sign = sketch_map
    # positive and negative units summed into separate columns, then subtracted: no signed copy of x
    z = x.new_zeros(x.shape[0], 2 * buckets).index_add_(1, bucket + buckets * (sign < 0), x)
    return z[:, :buckets] - z[:, buckets:]


@dataclass
class ChunkScores:
    """The cosines the leader rule of :class:`ExactLibrary` computed for one chunk of rows (what its
    ``partial_fit(..., observer=...)`` hands to :meth:`LeaderObserver.on_chunk`, for the readout's pass;
    nothing is computed for it).

    Rows are positions in the chunk, nodes are library indices; cosines are float32 products of the
    normalised rows, with the chunk's rounding (good for bounds, not for exact values).

    Attributes:
        start: position of the chunk's first row in the batch given to ``partial_fit``.
        rows: number of rows in the chunk.
        first_node: library size before the chunk (its first new node gets this index).
        dense: ``LongTensor[R]`` rows compared with every node ``0 .. first_node - 1`` (none when the
            library was empty), and ``dense_cos`` ``[R, first_node]`` their cosines.
        screened: ``LongTensor[S]`` rows the screen decided, ``screened_node`` the node at cosine above
            theta that decided each and ``screened_cos`` that cosine.
        cand: rows compared among themselves (best cosine below theta), ``gram`` their cosines ``[U, U]``
            (``None`` when ``U <= 1``), ``accepted`` the positions in ``cand`` of the rows stored, in order
            (nodes ``first_node, first_node + 1, ...``); ``novel_cos`` ``[A, first_node]`` the stored rows'
            cosines to the earlier nodes (``None`` when the library was empty).
        dense_best / dense_node: each ``dense`` row's largest cosine in ``dense_cos`` and the node it is with
            (``dense_cos.max(dim=1)``, the maximum the rule decided novelty with; ``None`` when the library
            was empty), so that the observer need not take it again.
    """

    start: int
    rows: int
    first_node: int
    dense: Tensor
    dense_cos: Tensor | None
    screened: Tensor
    screened_node: Tensor
    screened_cos: Tensor
    cand: Tensor
    gram: np.ndarray | None
    accepted: Tensor
    novel_cos: Tensor | None
    dense_best: Tensor | None = None
    dense_node: Tensor | None = None


@runtime_checkable
class LeaderObserver(Protocol):
    """What :meth:`ExactLibrary.partial_fit` tells an observer and asks it (``partial_fit(..., observer=o)``).

    The fit's Hebbian pass (:class:`~libnet_plugin.hebbian_pass.HebbianPairPass`) is one: it keeps the
    cosines the leader rule computes in the first pass, so that the second pass need not compute them
    again. None of the three calls changes which rows become nodes.

    Per ``partial_fit`` call, in this order:

    1. :meth:`use_screen` once: whether the screen may decide rows of this batch (``False``: every row
       is compared with every node, as with the screen off).
    2. per chunk of rows, when the screen decided some rows: :meth:`want_dense` with the node above theta
       the screen found for each and that cosine; the rows it marks are compared with every node all the
       same (the observer wants their cosines).
    3. per chunk, before its new nodes are stored: :meth:`on_chunk` with the :class:`ChunkScores` of the
       chunk (read only).
    """

    def use_screen(self) -> bool: ...

    def want_dense(self, node: Tensor, cos: Tensor) -> Tensor: ...

    def on_chunk(self, scores: ChunkScores) -> None: ...


def leader_within(gram: np.ndarray, threshold: float) -> np.ndarray:
    """The one-by-one leader rule among rows that no stored node decided, given their Gram matrix.

    Row i is accepted unless an accepted row j < i has cosine ``>= threshold`` with it. The batched
    libraries call this for the undecided rows of a batch only, so the matrix is small.

    Args:
        gram: ``[U, U]`` cosines among the undecided rows, in visiting order.
        threshold: theta.

    Returns:
        The positions (``int64``, ascending) of the accepted rows.

    Example:
        >>> leader_within(np.array([[1., .95, 0.], [.95, 1., 0.], [0., 0., 1.]]), 0.9).tolist()
        [0, 2]
    """
    blocked = np.zeros(gram.shape[0], dtype=bool)
    accept = np.zeros(gram.shape[0], dtype=bool)
    for i in range(gram.shape[0]):
        if not blocked[i]:
            accept[i] = True
            blocked |= gram[i] >= threshold
    return np.flatnonzero(accept)


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

    The readout's pass of a fit (pass 2, :mod:`libnet_plugin.fitting`) takes one of two routes:

    - the *pair pass* (:class:`~libnet_plugin.hebbian_pass.HebbianPairPass`), which sums Eq. 2 over the
      (input, node) pairs that count only, reusing the cosines the leader rule computed in pass 1. A kind
      gets it by being an :class:`ExactLibrary` that keeps ExactLibrary's ``partial_fit``, ``_novel_rows``,
      ``_screen``, ``similarity`` and ``transform`` (it may change ``embed``: a sub-vector or a
      projection, as :mod:`libnet_plugin.sparse`'s kinds do) and scores in its own dtype, with the
      default :class:`~libnet_plugin.readout.HebbianReadout` of width up to 0.018;
    - the *dense pass* for every other kind (and readout): ``readout.accumulate(library.similarity(haps),
      answers)`` batch by batch, which needs only the methods below and costs one ``[B, M]`` product per
      batch. The fit logs (INFO, logger ``libnet_plugin.fitting``) each library that takes it and why
      (:func:`~libnet_plugin.hebbian_pass.dense_pass_reason`).
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


@runtime_checkable
class NodeLibrary(Library, Protocol):
    """A :class:`Library` that exposes its nodes: what the node-based detector features need.

    ``nodes`` are the stored rows ``[M, D']`` in the library's own space, ``transform(haps)`` maps raw
    HAPs ``[B, D]`` into that space (normalised rows), and ``dim`` is the raw width ``D`` (``None``
    before the first batch). :class:`ExactLibrary` and the sparse and projected libraries are node
    libraries.
    """

    dim: int | None

    @property
    def nodes(self) -> Tensor: ...

    def transform(self, haps: Tensor) -> Tensor: ...


#: integer dtypes a saved library's node indices may have
_INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


class ExactLibrary:
    """The exact batched leader library (the default, name ``"exact"``).

    Each chunk of a batch is compared with the current library; rows whose best cosine is already
    ``>= threshold`` are final (the library only grows). The remaining rows follow the one-by-one rule
    against the library plus the rows of the same chunk accepted before them, using their Gram matrix.
    The node list equals :func:`leader_reference` for every batch and chunk size up to float32 rounding
    (rows whose deciding cosine lies within rounding of ``theta`` aside; see the module docstring).

    Once the library has settled, most rows are not novel, and one stored node above the threshold is
    enough to decide them. A *screen* finds such a node cheaply: it ranks the nodes by a count sketch
    of the vectors (``screen_dim`` signed bucket sums, so every unit contributes), checks the
    ``screen_candidates`` best-ranked nodes with exact dot products, and sends only the rows it could
    not decide to the dense comparison with all nodes. The screen only ever decides a row when the
    exact cosine clears the threshold by a rounding margin, so it gives the same nodes as the dense
    path; it switches itself off while it does not pay (small libraries, short vectors, mostly novel
    rows).

    Memory: the library, its sketches (``screen_dim`` numbers per node) and O(``chunk_size`` x
    (D + M)) working memory, whatever the size of the batch passed to :meth:`partial_fit`.

    Args:
        threshold: theta in (0, 1]; a higher theta gives a bigger library.
        device: where nodes are kept and computed.
        layer: the layer name (for error messages).
        dtype: storage/compute dtype (float32 by default).
        score_dtype: dtype of the products behind :meth:`similarity` (the readout's fitting pass and every
            prediction), or ``{layer: dtype}``; ``None`` (and layers not named) use ``dtype``.
            ``"bfloat16"`` keeps a bfloat16 copy of the nodes and roughly quarters the cost of scoring on
            hardware with bfloat16 matrix units (recent x86 CPUs, GPUs); cosines then carry about 3
            significant digits. The leader rule that builds the library always runs in ``dtype``, so the
            nodes are the same either way.
        initial_capacity: rows pre-allocated before the first doubling.
        dim: the expected number of features per raw HAP (checked on every batch; set by the first
            batch when ``None``).
        chunk_size: rows decided together; bounds the working memory of :meth:`partial_fit`.
        screen_dim: buckets of the count sketch used by the screen; ``0`` turns the screen off. The
            screen is used only for vectors of at least ``4 * screen_dim`` entries.
        screen_candidates: best-ranked nodes checked exactly per row before falling back to all nodes.
        screen_min_nodes: library size from which the screen is tried.

    Example:
        >>> lib = ExactLibrary(0.9)
        >>> lib.partial_fit(torch.tensor([[1., 0.], [1., .1], [0., 1.]]), torch.arange(3)).tolist()
        [True, False, True]
        >>> lib.size, lib.node_indices.tolist()
        (2, [0, 2])
    """

    name = "exact"

    #: the screen's bucket assignment and signs come from this seed (they affect speed, never results)
    SCREEN_SEED = 0x5EED

    def __init__(self, threshold: float, *, device: Any = None, layer: str = "", dtype: torch.dtype = torch.float32,
                 initial_capacity: int = 256, dim: int | None = None, chunk_size: int = 1024,
                 screen_dim: int = 256, screen_candidates: int = 4, screen_min_nodes: int = 64,
                 score_dtype: torch.dtype | str | None = None):
        self.layer = layer
        self.threshold = validate_threshold(threshold, layer)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        if isinstance(score_dtype, Mapping):
            score_dtype = score_dtype.get(layer)
        self.score_dtype = dtype if score_dtype is None else check_float_dtype(score_dtype, "score_dtype", layer=layer)
        self._score_nodes: Tensor | None = None  # nodes^T in score_dtype, rebuilt after the library changes
        self.initial_capacity = check_int(initial_capacity, "initial_capacity", layer=layer)
        self.dim: int | None = None if dim is None else int(dim)
        self.chunk_size = check_int(chunk_size, "chunk_size", layer=layer)
        self.screen_dim = check_int(screen_dim, "screen_dim", minimum=0, layer=layer)
        self.screen_candidates = check_int(screen_candidates, "screen_candidates", layer=layer)
        self.screen_min_nodes = check_int(screen_min_nodes, "screen_min_nodes", layer=layer)
        self._nodes: Tensor | None = None
        self._indices: Tensor = torch.empty(0, dtype=torch.long)
        self._size = 0
        #: number of rows visited by :meth:`partial_fit` so far
        self.n_seen = 0
        # screen state: bucket/sign of the count sketch, the nodes' sketches, and its on/off schedule
        self._sketch_map: tuple[Tensor, Tensor] | None = None
        self._sketch_nodes: Tensor | None = None
        self._last_miss = 1.0
        self._skip = 0
        self._backoff = 1
        #: counters of how rows were decided: ``{"dense": rows compared with every node, "screened":
        #: rows decided by the screen, "first": rows of an empty library}``
        self.stats = {"dense": 0, "screened": 0, "first": 0}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self.layer!r}, threshold={self.threshold}, size={self._size})"

    # -- transform hook for subclasses (sparse / projected libraries) --------------------------
    def embed(self, haps: Tensor) -> Tensor:
        """Map raw HAPs to the vectors the library compares, before normalisation (the identity here; a
        sub-vector or a projection in subclasses).

        Args:
            haps: raw HAPs ``[B, D]``.

        Returns:
            ``Tensor[B, D']`` in the library's dtype, on its device.
        """
        return haps.to(self.device, self.dtype)

    def transform(self, haps: Tensor) -> Tensor:
        """The normalised vectors the library stores.

        Args:
            haps: raw HAPs ``[B, D]``.

        Returns:
            ``normalize_rows(embed(haps))``, ``Tensor[B, D']``.
        """
        return normalize_rows(self.embed(haps))

    # -- state ---------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of stored nodes.

        Returns:
            M.
        """
        return self._size

    @property
    def nodes(self) -> Tensor:
        """The stored normalised nodes.

        Returns:
            ``Tensor[M, D']`` (a view of the buffer).
        """
        if self._nodes is None:
            raise NotFittedError(f"the library of layer {self.layer!r} is empty; call fit first")
        return self._nodes[: self._size]

    @property
    def node_indices(self) -> Tensor:
        """The index (visiting order) of the training input behind each node.

        Returns:
            ``LongTensor[M]``.
        """
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
                f"was fitted on {self.dim}; got a batch of shape {tuple(haps.shape)}, expected [B, {self.dim}]. "
                "If the inputs are sequences padded per batch (a tokenizer's padding=True, a PackedSequence), "
                "the layer's width follows the longest sequence of each batch: pad every batch to one length "
                "(padding='max_length', or pad_packed_sequence(..., total_length=T) in the model)")

    def _append(self, rows: Tensor, indices: Tensor) -> None:
        n_new = rows.shape[0]
        if n_new == 0:
            return
        self._score_nodes = None
        need = self._size + n_new
        if self._nodes is None or need > self._nodes.shape[0]:
            cap = max(self.initial_capacity, need, 2 * (0 if self._nodes is None else self._nodes.shape[0]))
            buf = torch.empty(cap, rows.shape[1], dtype=self.dtype, device=self.device)
            idx = torch.empty(cap, dtype=torch.long)
            if self._nodes is not None and self._size:
                buf[: self._size] = self._nodes[: self._size]
                idx[: self._size] = self._indices[: self._size]
            self._nodes, self._indices = buf, idx
            if self._sketch_nodes is not None:
                sk = torch.empty(cap, self.screen_dim, dtype=self.dtype, device=self.device)
                sk[: self._size] = self._sketch_nodes[: self._size]
                self._sketch_nodes = sk
        self._nodes[self._size: need] = rows
        self._indices[self._size: need] = indices.to("cpu", torch.long)
        if self._sketch_nodes is not None:
            self._sketch_nodes[self._size: need] = self._sketch(rows)
        self._size = need

    # -- the screen ----------------------------------------------------------------------------
    def _screen_enabled(self, width: int) -> bool:
        return self.screen_dim > 0 and width >= 4 * self.screen_dim

    def _sketch(self, x: Tensor) -> Tensor:
        """Count sketch ``[B, screen_dim]`` of rows ``x`` (signed sums over random buckets of units)."""
        if self._sketch_map is None:
            self._sketch_map = count_sketch_map(x.shape[1], self.screen_dim, self.SCREEN_SEED, dtype=self.dtype,
                                                device=self.device)
        return count_sketch(x, self._sketch_map, self.screen_dim)

    def _use_screen(self, width: int) -> bool:
        if not self._screen_enabled(width) or self._size < self.screen_min_nodes:
            return False
        if self._skip > 0:
            self._skip -= 1
            return False
        return self._last_miss < 0.5

    def _screen(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Rows of ``x`` the screen could not decide (it decides rows with a node above the threshold),
        and for every row the best of the nodes it checked exactly and that cosine."""
        if self._sketch_nodes is None:  # first use, or after load_state_dict
            self._sketch_nodes = torch.empty(self._nodes.shape[0], self.screen_dim, dtype=self.dtype,
                                             device=self.device)
            for s in range(0, self._size, self.chunk_size):
                e = min(s + self.chunk_size, self._size)
                self._sketch_nodes[s:e] = self._sketch(self._nodes[s:e])
        nodes = self.nodes
        est = self._sketch(x) @ self._sketch_nodes[: self._size].T
        top = est.topk(min(self.screen_candidates, self._size), dim=1).indices
        # decide a row only when its exact cosine clears theta by more than any rounding difference
        # between this dot product and the dense product, so that the result equals the dense path's
        bar = self.threshold + 16 * torch.finfo(self.dtype).eps * math.sqrt(x.shape[1])
        # two rounds (few kernels): every row's best-ranked node, then the other candidates of the rows left
        best_cos = torch.linalg.vecdot(x, nodes[top[:, 0]])
        best_node = top[:, 0].clone()
        undecided = torch.nonzero(best_cos < bar).flatten()
        if undecided.numel() and top.shape[1] > 1:
            cos = torch.bmm(nodes[top[undecided, 1:]], x[undecided].unsqueeze(2)).squeeze(2)
            second, which = cos.max(dim=1)
            better = second > best_cos[undecided]
            best_cos[undecided[better]] = second[better]
            best_node[undecided[better]] = top[undecided[better], 1 + which[better]]
            undecided = undecided[(cos < bar).all(dim=1)]
        return undecided, best_node, best_cos

    # -- fitting -------------------------------------------------------------------------------
    @staticmethod
    def _row_max(cos: Tensor, observer: LeaderObserver | None) -> tuple[Tensor, Tensor | None]:
        """Each row's largest cosine, and (for an observer, which needs it too) its node: one pass over
        ``cos`` either way (the values are the same: a maximum is exact)."""
        if observer is None:
            return cos.amax(dim=1), None
        best, node = cos.max(dim=1)
        return best, node

    def _novel_rows(self, x: Tensor, observer: LeaderObserver | None = None, start: int = 0,
                    screen: bool = True) -> Tensor:
        """Apply the leader rule to the normalised rows ``x`` (a chunk starting at row ``start`` of the
        batch) in order; return the accepted row numbers. ``observer`` as for :meth:`partial_fit`;
        ``screen``: what its ``use_screen()`` said for this batch."""
        b = x.shape[0]
        theta = self.threshold
        m = self._size
        no_rows = torch.zeros(0, dtype=torch.long, device=x.device)
        dense, dense_cos = no_rows, None
        dense_best = dense_node = None
        screened, screened_node, screened_cos = no_rows, no_rows, x.new_zeros(0)
        if self._size == 0:
            cand = torch.arange(b, device=x.device)
            self.stats["first"] += b
        elif screen and self._use_screen(x.shape[1]):
            undecided, best_node, best_cos = self._screen(x)
            miss = undecided.numel() / b
            if miss >= 0.5:  # the screen did not pay: back off exponentially before trying again
                self._skip, self._backoff = self._backoff, min(2 * self._backoff, 64)
            else:
                self._backoff = 1
            self._last_miss = miss
            if observer is not None:
                decided = torch.ones(b, dtype=torch.bool, device=x.device)
                decided[undecided] = False
                screened = torch.nonzero(decided).flatten()
                if screened.numel():
                    # rows whose cosines to every node the observer wants anyway (it never changes a decision:
                    # the dense product finds them at or above theta too)
                    more = observer.want_dense(best_node[screened], best_cos[screened]).to(screened.device)
                    if bool(more.any()):
                        undecided = torch.sort(torch.cat([undecided, screened[more]])).values
                        screened = screened[~more]
                screened_node, screened_cos = best_node[screened], best_cos[screened]
            self.stats["screened"] += b - undecided.numel()
            self.stats["dense"] += undecided.numel()
            dense, dense_cos = undecided, x[undecided] @ self.nodes.T
            dense_best, dense_node = self._row_max(dense_cos, observer)
            novel = dense_best < theta
            cand = undecided[novel]
        else:
            dense, dense_cos = torch.arange(b, device=x.device), x @ self.nodes.T
            dense_best, dense_node = self._row_max(dense_cos, observer)
            novel = dense_best < theta
            cand = torch.nonzero(novel).flatten()
            self._last_miss = cand.numel() / b  # novel rows always miss the screen
            self.stats["dense"] += b
        gram = None
        if cand.numel() <= 1:
            accepted = torch.arange(cand.numel(), device=x.device)
        else:
            xc = x[cand]
            gram = (xc @ xc.T).cpu().numpy()
            accepted = torch.from_numpy(leader_within(gram, theta)).to(cand.device)
        if observer is not None:
            novel_cos = None if dense_cos is None else dense_cos[novel][accepted]
            observer.on_chunk(ChunkScores(start=start, rows=b, first_node=m, dense=dense, dense_cos=dense_cos,
                                 screened=screened, screened_node=screened_node, screened_cos=screened_cos,
                                 cand=cand, gram=gram, accepted=accepted, novel_cos=novel_cos,
                                 dense_best=dense_best, dense_node=dense_node))
        return cand[accepted]

    def partial_fit(self, haps: Tensor, indices: Tensor | None = None, *,
                    observer: LeaderObserver | None = None) -> Tensor:
        """Visit the rows of ``haps`` in order and store the novel ones.

        Args:
            haps: raw flattened activations ``[B, D]``.
            indices: ``LongTensor[B]`` training-set indices of the rows (default: continuing count).
            observer: told the cosines the rule computes and asked whether to screen this batch and which
                screened rows to compare with every node all the same (a :class:`LeaderObserver`; the
                Hebbian pass of a fit is one). The nodes are the same with or without it.

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
        stored = torch.zeros(b, dtype=torch.bool, device=self.device)
        screen = observer.use_screen() if observer is not None else True
        for start in range(0, b, self.chunk_size):
            x = self.transform(haps[start: start + self.chunk_size])
            rows = self._novel_rows(x, observer, start, screen)
            if rows.numel():
                self._append(x[rows], indices[start: start + self.chunk_size].to(rows.device)[rows])
                stored[start + rows] = True
        return stored

    def similarity(self, haps: Tensor) -> Tensor:
        """Cosines between each row of ``haps`` and every stored node (``h = W f_hat``).

        Args:
            haps: raw HAPs ``[B, D]``.

        Returns:
            ``Tensor[B, M]`` in ``dtype`` (computed in ``score_dtype``).
        """
        self._check_dim(haps)
        if self.score_dtype == self.dtype:
            # normalise after the product: scaling [B, M] cosines is cheaper than dividing [B, D] rows
            f = self.embed(haps)
            return (f @ self.nodes.T).mul_(1.0 / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + EPS))
        if self._score_nodes is None:
            self._score_nodes = self.nodes.T.to(self.score_dtype).contiguous()
        # in low precision the rows are normalised first: products of unit vectors lose less (measured on
        # the MNIST net's conv1 in bfloat16: 82.8% top-1 agreement against 79.4% when scaled afterwards)
        return (self.transform(haps).to(self.score_dtype) @ self._score_nodes).to(self.dtype)

    # -- persistence ---------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able settings needed to rebuild an empty library of this kind.

        Returns:
            a dict (name, threshold, dim, ...).
        """
        out = {"name": self.name, "threshold": self.threshold, "dim": self.dim}
        if self.score_dtype != self.dtype:
            out["score_dtype"] = dtype_name(self.score_dtype)
        return out

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to save.

        Returns:
            ``{"nodes": Tensor[M, D'], "node_indices": LongTensor[M]}``.
        """
        return {"nodes": self.nodes.contiguous(), "node_indices": self.node_indices.contiguous()}

    def _stored_width(self) -> int | None:
        """Width of the stored nodes: ``dim`` here (the sub-vector or projection width in subclasses)."""
        return self.dim

    def _check_state(self, state: dict[str, Tensor]) -> None:
        """Refuse (:class:`SaveFormatError`) saved nodes whose shape or dtype do not fit this library's settings."""
        nodes, indices = state["nodes"], state["node_indices"]
        width = self._stored_width()
        problem = None
        if not nodes.is_floating_point() or nodes.dim() != 2:
            problem = f"its nodes are {nodes.dtype} of shape {list(nodes.shape)}, expected floating point [M, D]"
        elif width is not None and nodes.shape[1] != width:
            problem = f"its nodes have {nodes.shape[1]} features, its settings say {width}"
        elif indices.dim() != 1 or indices.shape[0] != nodes.shape[0] or indices.dtype not in _INDEX_DTYPES:
            problem = (f"its node indices are {indices.dtype} of shape {list(indices.shape)}, expected integers "
                       f"[{nodes.shape[0]}]")
        elif indices.numel() and int(indices.min()) < 0:
            problem = "its node indices are negative"
        if problem is not None:
            raise SaveFormatError(f"the saved library of layer {self.layer!r} is inconsistent: {problem} "
                                  "(modified or corrupted)")

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore nodes saved by :meth:`state_dict` (replaces the current content); their shapes and dtypes
        are checked against the library's settings first (:class:`SaveFormatError`).

        Args:
            state: what :meth:`state_dict` returned.
        """
        self._check_state(state)
        nodes = state["nodes"].to(self.device, self.dtype)
        self._nodes = nodes.clone()
        self._indices = state["node_indices"].to("cpu", torch.long).clone()
        self._size = nodes.shape[0]
        self._sketch_nodes = None
        self._score_nodes = None
