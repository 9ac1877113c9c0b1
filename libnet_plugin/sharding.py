"""Node-sharded scoring: a library too large for one device, split by nodes across the ranks of a process group.

Each rank keeps a shard of a layer's nodes (a contiguous block or every ``world``-th node) and the matching
rows of the readout weights ``W`` ``[M, C]``. To score inputs (every rank passes the same inputs), each rank
computes the cosines of its own nodes only, takes its top-k under the tie rule below, and sends those k
candidates (cosine, global node index, training position, readout row); one all-gather gives every rank
all candidates, and the global top-k and the evidence of Eq. 3 follow on every rank alike. What travels per
layer and call is ``world x B x k x (C + 3)`` numbers, whatever the library size; a rank holds ``M / world``
nodes and works on a ``[B, M / world]`` block of cosines.

Tie rule (the order every top-k here uses): larger cosine first; among equal cosines, the lower global node
index first (the node stored earlier). The evidence is then summed over the k nodes in that order, one
term after the other (``P = h_1 W_1 + h_2 W_2 + ...``, each product and sum rounded once), so it depends on
nothing but the k selected nodes. :func:`topk_evidence_ordered` is the one-device form of the same rule:

- Sharded scoring equals :func:`topk_evidence_ordered` on one device (bit for bit) whenever each shard's
  cosines equal the matching columns of the whole library's ``similarity``; they need not: the math library
  may compute a shard's product of another shape with another kernel (seen with MKL and 11-node shards,
  1.8e-7), so in general the evidence agrees to float32 rounding. The merge itself is exact for
  any cosines. Each shard's cosines come from its library's own ``similarity`` code; torch's CPU matrix
  product rounded every column alike whatever the other columns in the call, in every shape tested here
  (batches of 2 rows and more, shards of 2 nodes and more; a one-node shard is therefore stored twice so
  that it takes the same matrix-matrix kernel). This is what BLAS does in practice, not a promise of it.
- Against :meth:`LibraryNetwork.scores_from_haps <libnet_plugin.LibraryNetwork.scores_from_haps>` (which
  uses :func:`libnet_plugin.readout.topk_evidence`: ``torch.topk``'s unsorted order and a batched product):
  the same k nodes except where several nodes tie at the k-th cosine (``torch.topk`` picks any of them),
  and the same evidence up to the float32 rounding of a k-term sum (about 1e-7 relative); with
  ``top_k >= M`` it sums all M nodes in one product, here in cosine order.

Use, on every rank of an initialised process group (gloo or NCCL)::

    net = lnp.LibraryNetwork.load(path, model, device="cpu")        # every rank, on the host
    sharded = ShardedNetwork.from_network(net, device=f"cuda:{rank}")  # keeps this rank's shard
    del net                                                          # the full libraries can go
    p = sharded.predict_scores(x)   # the same x on every rank; every rank gets the whole {layer: [B, C]}

Outside a process group (or with ``world=1``) a shard holds the whole library and nothing is sent.

Example:
    >>> import torch
    >>> h = torch.tensor([[0.5, 0.75, 0.25, 0.75, 0.75]])
    >>> vals, ids = ordered_topk(h, 2)
    >>> vals.tolist(), ids.tolist()  # three nodes tie at 0.75: the two lowest indices win
    ([[0.75, 0.75]], [[1, 3]])
    >>> shard_positions(7, 2, 3).tolist(), shard_positions(7, 2, 3, "strided").tolist()
    ([4, 5, 6], [2, 5])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._batches import MultiInput, collect
from ._validate import check_layers
from .distributed import DistributedScoringError, all_gather_same, exchange_sizes, world
from .errors import NotFittedError, ShapeMismatchError
from .metrics import cpl
from .plugins import make_library

__all__ = ["LAYOUTS", "shard_positions", "ordered_topk", "ordered_evidence", "topk_evidence_ordered", "Candidates",
           "merge_candidates", "ShardedLibrary", "shard_library", "ShardedNetwork"]

#: how nodes are dealt to the ranks: a contiguous block each, or every ``world``-th node
LAYOUTS = ("contiguous", "strided")

#: global node index of a padding candidate (sorts after every real node)
_PAD_INDEX = torch.iinfo(torch.long).max


def shard_positions(n_nodes: int, rank: int, world_size: int, layout: str | Sequence[int] = "contiguous") -> Tensor:
    """Global indices ``LongTensor[m_r]`` (ascending) of the nodes rank ``rank`` of ``world_size`` keeps.

    Args:
        n_nodes: the library size M.
        rank / world_size: this rank and the number of ranks.
        layout: ``"contiguous"`` (rank r keeps ``[r M // w, (r + 1) M // w)``: sizes differ by at most one,
            a rank keeps none when M < w), ``"strided"`` (nodes r, r + w, r + 2w, ...), or a sequence of
            ``world_size`` node counts summing to M (contiguous blocks of those sizes; zeros allowed).
    """
    n, r, w = int(n_nodes), int(rank), int(world_size)
    if w < 1 or not 0 <= r < w or n < 0:
        raise ValueError(f"need 0 <= rank < world_size and n_nodes >= 0, got rank {r}, world {w}, {n} nodes")
    if isinstance(layout, str):
        if layout == "contiguous":
            return torch.arange(r * n // w, (r + 1) * n // w)
        if layout == "strided":
            return torch.arange(r, max(n, r), w)
        raise ValueError(f"layout must be one of {LAYOUTS} or a list of node counts per rank, got {layout!r}")
    counts = [int(c) for c in layout]
    if len(counts) != w or sum(counts) != n or min(counts) < 0:
        raise ValueError(f"layout counts must be {w} non-negative numbers summing to {n}, got {counts}")
    start = sum(counts[:r])
    return torch.arange(start, start + counts[r])


def ordered_topk(h: Tensor, k: int, node_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of ``h`` under the tie rule, in that order.

    Larger value first; among equal values the lower node id first. ``torch.topk`` alone leaves ties at
    the k-th value to chance; here they are settled by the id.

    Args:
        h: ``[B, m]`` cosines (finite).
        k: entries per row (clipped to m).
        node_ids: ``LongTensor[m]`` ascending ids of the columns (default ``0..m-1``).

    Returns:
        ``(values [B, k'], ids [B, k'])`` with ``k' = min(k, m)``; ``ids`` are ``node_ids`` entries.
    """
    b, m = h.shape
    k = min(int(k), m)
    ids = torch.arange(m, device=h.device) if node_ids is None else node_ids.to(h.device)
    if k == 0:
        return h.new_empty(b, 0), torch.empty(b, 0, dtype=torch.long, device=h.device)
    vals, pos = h.topk(k, dim=1)
    kth = vals[:, -1:]
    tied = torch.nonzero((h >= kth).sum(dim=1) > k).flatten()  # rows where the k-th value is shared
    if tied.numel():
        ht, t = h[tied], kth[tied]
        above, equal = ht > t, ht == t
        need = k - above.sum(dim=1, keepdim=True)
        take = above | (equal & (equal.cumsum(dim=1) <= need))  # the lowest columns among the tied ones
        pos = pos.clone()
        pos[tied] = torch.nonzero(take)[:, 1].view(-1, k)
    pos = pos.sort(dim=1).values  # by column, then (stably) by value: value desc, column asc
    vals = h.gather(1, pos)
    order = vals.sort(dim=1, descending=True, stable=True).indices
    pos = pos.gather(1, order)
    return vals.gather(1, order), ids[pos]


def ordered_evidence(values: Tensor, rows: Tensor) -> Tensor:
    """Eq. 3 summed in the given order: ``P = values[:, 0] rows[:, 0] + values[:, 1] rows[:, 1] + ...``.

    Every product and every sum is rounded once, in this order, so the result is the same on every device.

    Args:
        values: ``[B, k]`` cosines of the selected nodes; rows ``[B, k, C]`` their readout rows.

    Returns:
        ``Tensor[B, C]`` (zeros when k is 0).
    """
    p = torch.zeros(rows.shape[0], rows.shape[2], dtype=rows.dtype, device=rows.device)
    for j in range(values.shape[1]):
        p = p + values[:, j: j + 1].to(rows.dtype) * rows[:, j]
    return p


def topk_evidence_ordered(h: Tensor, weight: Tensor, top_k: int) -> Tensor:
    """Eq. 3 on one device under the tie rule and the summation order of sharded scoring.

    Args:
        h: cosines ``[B, M]``; weight: readout ``[M, C]``; top_k: nodes per input (clipped to M).

    Returns:
        ``Tensor[B, C]``, what :class:`ShardedLibrary` gives with the library split over any number of ranks.

    Example:
        >>> h = torch.tensor([[0.2, 0.9, 0.9]])
        >>> topk_evidence_ordered(h, torch.tensor([[1., 0.], [0., 1.], [1., 1.]]), 2)
        tensor([[0.9000, 1.8000]])
    """
    if int(top_k) < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    vals, ids = ordered_topk(h, top_k)
    return ordered_evidence(vals, weight.to(h.device)[ids])


@dataclass
class Candidates:
    """One shard's (or the merged) top-k of a batch, in the tie rule's order.

    Attributes:
        values: cosines ``[B, k]`` (``-inf`` for padding).
        node_ids: global node indices ``LongTensor[B, k]`` (padding: the largest int64).
        positions: training positions of those nodes ``LongTensor[B, k]`` (padding: -1).
        rows: their readout rows ``[B, k, C]`` (padding: 0).
    """

    values: Tensor
    node_ids: Tensor
    positions: Tensor
    rows: Tensor

    def padded(self, k: int) -> Candidates:
        """The same candidates padded to ``k`` columns (so that every rank sends the same shape)."""
        b, have = self.values.shape
        extra = int(k) - have
        if extra <= 0:
            return self
        dev = self.values.device
        return Candidates(
            torch.cat([self.values, self.values.new_full((b, extra), float("-inf"))], dim=1),
            torch.cat([self.node_ids, torch.full((b, extra), _PAD_INDEX, dtype=torch.long, device=dev)], dim=1),
            torch.cat([self.positions, torch.full((b, extra), -1, dtype=torch.long, device=dev)], dim=1),
            torch.cat([self.rows, self.rows.new_zeros(b, extra, self.rows.shape[2])], dim=1))


def merge_candidates(parts: Sequence[Candidates], k: int, n_nodes: int) -> Candidates:
    """The global top-k from every shard's candidates (each the shard's own top-k under the tie rule).

    Every node of the global top-k is in its shard's top-k, so the merge is exact: two stable sorts, by
    node id and then by cosine (descending), give the tie rule's order over all candidates.

    Args:
        parts: one :class:`Candidates` per shard (any number of columns, padding allowed).
        k: the top_k asked for; ``n_nodes``: the library size M (the result has ``min(k, M)`` columns).
    """
    values = torch.cat([p.values for p in parts], dim=1)
    ids = torch.cat([p.node_ids for p in parts], dim=1)
    order = ids.sort(dim=1, stable=True).indices
    order = order.gather(1, values.gather(1, order).sort(dim=1, descending=True, stable=True).indices)
    order = order[:, : min(int(k), int(n_nodes))]
    positions = torch.cat([p.positions for p in parts], dim=1)
    rows = torch.cat([p.rows for p in parts], dim=1)
    return Candidates(values.gather(1, order), ids.gather(1, order), positions.gather(1, order),
                      rows.gather(1, order[:, :, None].expand(-1, -1, rows.shape[2])))


class ShardedLibrary:
    """One rank's shard of a layer's library and readout: top-k and Eq. 3 evidence over all ranks' nodes.

    Build it with :func:`shard_library` (from a whole library) or directly from a shard: ``library`` a
    library of the layer's kind holding only this rank's nodes (rows of its ``nodes`` in ascending global
    order), ``weight`` their readout rows ``[m_r, C]``, ``node_ids`` their global indices ``LongTensor[m_r]``
    (strictly increasing), ``n_nodes`` the whole library's size M. ``duplicated``: ``library`` holds its one
    node twice (a library kind may need two rows; :func:`shard_library` does this for a one-node shard), and
    the copy is dropped from every result.

    The scoring calls (:meth:`topk`, :meth:`scores`) are collectives inside a process group of two or more
    ranks: every rank calls them with the same inputs, in the same order. A rank that fails tells the others,
    and all raise :class:`~libnet_plugin.distributed.DistributedScoringError`; so do all when the ranks are
    called with different batch sizes, ``top_k`` or libraries.

    There is no ``similarity``: no rank holds every node's cosine. :meth:`local_similarity` gives this
    shard's.
    """

    def __init__(self, library: Any, weight: Tensor, node_ids: Tensor, n_nodes: int, *, duplicated: bool = False):
        node_ids = torch.as_tensor(node_ids, dtype=torch.long).cpu()
        m = int(node_ids.numel())
        size = int(library.size)
        if size != m + int(duplicated) or weight.dim() != 2 or weight.shape[0] != m:
            raise ShapeMismatchError(f"a shard of {m} node ids needs a library of {m} nodes and readout rows [{m}, C]; "
                                     f"got {size} nodes and weight {list(weight.shape)}")
        if m and (int(node_ids.min()) < 0 or int(node_ids.max()) >= int(n_nodes)
                  or (m > 1 and not bool((node_ids[1:] > node_ids[:-1]).all()))):
            raise ValueError(f"node_ids must be strictly increasing indices into the {n_nodes} nodes")
        self.library = library
        self.layer = getattr(library, "layer", "")
        self.weight = weight
        self.node_ids = node_ids
        self.n_nodes = int(n_nodes)
        self.n_classes = int(weight.shape[1])
        # a one-node shard is stored twice (its product then takes the matrix-matrix kernel, like the others)
        self.duplicated = bool(duplicated)
        self._positions = library.node_indices[:m].clone() if m else torch.empty(0, dtype=torch.long)

    def __repr__(self) -> str:
        return f"ShardedLibrary(layer={self.layer!r}, local_size={self.local_size}, n_nodes={self.n_nodes})"

    @property
    def local_size(self) -> int:
        """Nodes this rank keeps."""
        return int(self.node_ids.numel())

    @property
    def size(self) -> int:
        """The whole library's size M (over all ranks)."""
        return self.n_nodes

    @property
    def node_indices(self) -> Tensor:
        """Training positions ``LongTensor[m_r]`` of this rank's nodes."""
        return self._positions

    def local_similarity(self, haps: Tensor) -> Tensor:
        """Cosines ``[B, m_r]`` of raw HAPs ``[B, D]`` to this rank's nodes (the library's own ``similarity``)."""
        if self.local_size == 0:
            if hasattr(self.library, "dim") and self.library.dim is not None and haps.shape[1:] != (self.library.dim,):
                raise ShapeMismatchError(f"layer {self.layer!r}: activations have shape {tuple(haps.shape)}, "
                                         f"expected [B, {self.library.dim}]")
            return torch.zeros(haps.shape[0], 0, device=self.weight.device)
        h = self.library.similarity(haps)
        return h[:, : self.local_size] if self.duplicated else h

    def local_candidates(self, haps: Tensor, k: int) -> Candidates:
        """This shard's top-k of ``haps`` ``[B, D]`` under the tie rule (``min(k, m_r)`` columns)."""
        h = self.local_similarity(haps)
        vals, local = ordered_topk(h, k)
        ids = self.node_ids.to(h.device)[local]
        rows = self.weight.to(h.device)[local]
        return Candidates(vals, ids, self._positions.to(h.device)[local], rows)

    def topk(self, haps: Tensor, k: int) -> Candidates:
        """The global top-k over every rank's nodes (a collective): ``min(k, M)`` columns, tie rule order."""
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        group = world()
        if group is None:
            return merge_candidates([self.local_candidates(haps, k)], k, self.n_nodes)
        dist, rank, size = group
        device = self.weight.device
        mine, error = None, None
        b = int(haps.shape[0]) if haps.dim() else 0
        try:
            mine = self.local_candidates(haps, k).padded(min(k, self.n_nodes))  # the same shape on every rank
        except Exception as exc:  # every rank must hear of it, or the others wait at the all-gather
            error = f"{type(exc).__name__}: {exc}"
        # the same batch, k, classes and library on every rank (max of v and of -v: all equal or all raise)
        shape = [b, k, self.n_classes, self.n_nodes]
        _, most = exchange_sizes(dist, rank, size, b, error, device, [*shape, *(-v for v in shape)],
                                 stage=f"sharded scoring of layer {self.layer!r}", error_type=DistributedScoringError)
        if most[:4] != [-v for v in most[4:]]:
            raise DistributedScoringError(
                f"the ranks scored layer {self.layer!r} with different [batch, k, classes, nodes]: from "
                f"{[-v for v in most[4:]]} to {most[:4]} (this is rank {rank}); every rank must pass the same inputs")
        floats = torch.cat([mine.values[:, :, None].to(mine.rows.dtype), mine.rows], dim=2)
        longs = torch.stack([mine.node_ids, mine.positions], dim=2)
        fparts = all_gather_same(dist, floats, floats.device)
        lparts = all_gather_same(dist, longs, longs.device)
        parts = [Candidates(f[:, :, 0].to(mine.values.dtype), l[:, :, 0], l[:, :, 1], f[:, :, 1:])
                 for f, l in zip(fparts, lparts)]
        return merge_candidates(parts, k, self.n_nodes)

    def scores(self, haps: Tensor, top_k: int) -> Tensor:
        """Eq. 3 evidence ``[B, C]`` from the global top ``top_k`` nodes (a collective; the same on every rank)."""
        c = self.topk(haps, top_k)
        return ordered_evidence(c.values, c.rows)


def shard_library(library: Any, readout: Any, *, rank: int | None = None, world_size: int | None = None,
                  layout: str | Sequence[int] = "contiguous", device: Any = None,
                  plugin_manager: Any = None) -> ShardedLibrary:
    """This rank's :class:`ShardedLibrary` of a whole (fitted) library and its readout.

    The shard is a fresh library of the same kind, rebuilt from ``library.config()`` through the
    ``libnet_library`` hook (as loading a saved network does) and given only this rank's rows of the
    library's ``state_dict()`` ``nodes`` and ``node_indices``; its readout rows are copied. Nothing keeps a
    reference to ``library``, so the whole library can be freed afterwards.

    Args:
        library: a fitted node library (``state_dict()`` with ``nodes`` and ``node_indices``).
        readout: its readout with a ``weight`` ``[M, C]`` (the Hebbian readout).
        rank / world_size: default: this process's in the current process group (0 and 1 outside one).
        layout: see :func:`shard_positions`.
        device: where the shard lives (default: the library's device).
        plugin_manager: the manager to build the shard's library with (default: the process-wide one).
    """
    group = world()
    if rank is None:
        rank = group[1] if group is not None else 0
    if world_size is None:
        world_size = group[2] if group is not None else 1
    weight = getattr(readout, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"sharded scoring needs a readout with a weight matrix [M, C]; got {type(readout).__name__}")
    state = library.state_dict()
    if "nodes" not in state or "node_indices" not in state:
        raise TypeError(f"sharded scoring needs a library whose state holds 'nodes' and 'node_indices'; "
                        f"{type(library).__name__} has {sorted(state)}")
    nodes, positions = state["nodes"], state["node_indices"]
    m = int(nodes.shape[0])
    if weight.shape[0] != m:
        raise ShapeMismatchError(f"the readout has {weight.shape[0]} rows for a library of {m} nodes")
    mine = shard_positions(m, rank, world_size, layout)
    duplicated = mine.numel() == 1
    take = mine.repeat(2) if duplicated else mine
    cfg = dict(library.config())
    name = cfg.pop("name")
    cfg.pop("threshold", None)
    dev = torch.device(device) if device is not None else getattr(library, "device", torch.device("cpu"))
    settings = {**cfg, "threshold": float(library.threshold), "device": dev, "layer": getattr(library, "layer", "")}
    shard = make_library(name, settings, plugin_manager)
    shard.load_state_dict({**state, "nodes": nodes[take.to(nodes.device)].contiguous(),
                           "node_indices": positions[take.to(positions.device)].contiguous()})
    rows = weight[mine.to(weight.device)].to(dev, torch.float32).clone()
    return ShardedLibrary(shard, rows, mine, m, duplicated=duplicated)


class ShardedNetwork:
    """A fitted :class:`~libnet_plugin.LibraryNetwork` whose libraries are split by nodes across the ranks.

    It keeps the network's probe (the model), layers, ``top_k`` and class count, and one
    :class:`ShardedLibrary` per layer; not the network, so the whole libraries can be freed. The prediction
    methods mirror the network's and are collectives: every rank calls them with the same inputs and gets
    the same (whole) answer.

    Args:
        probe / layers / top_k / n_classes / input_shape: as the network has them.
        shards: ``{layer: ShardedLibrary}``.
        batch_size: batch size for data given as a Dataset or an iterable.
    """

    def __init__(self, probe: Any, layers: Sequence[str], shards: Mapping[str, ShardedLibrary], *, top_k: int,
                 n_classes: int, input_shape: Sequence[int] | None = None, batch_size: int = 256):
        missing = [l for l in layers if l not in shards]
        if missing:
            raise ValueError(f"a sharded network needs a shard for every layer; missing {missing}")
        self.probe = probe
        self.layers = list(layers)
        self.shards = {l: shards[l] for l in self.layers}
        self.top_k = int(top_k)
        self.n_classes_ = int(n_classes)
        self.input_shape_ = tuple(input_shape) if input_shape is not None else None
        self.batch_size = int(batch_size)

    @classmethod
    def from_network(cls, net: Any, *, layout: str | Sequence[int] | Mapping[str, Any] = "contiguous",
                     rank: int | None = None, world_size: int | None = None, device: Any = None) -> ShardedNetwork:
        """This rank's shards of a fitted network (``layout`` one for all layers, or ``{layer: layout}``)."""
        if not getattr(net, "is_fitted", False):
            raise NotFittedError("shard a fitted LibraryNetwork (call fit or load first)")
        shards = {}
        for l in net.layers:
            lay = layout.get(l, "contiguous") if isinstance(layout, Mapping) else layout
            shards[l] = shard_library(net.libraries_[l], net.readouts_[l], rank=rank, world_size=world_size,
                                      layout=lay, device=device, plugin_manager=net.plugin_manager)
        return cls(net.probe, net.layers, shards, top_k=net.top_k, n_classes=net.n_classes_,
                   input_shape=net.input_shape_, batch_size=net.batch_size)

    @property
    def library_sizes_(self) -> dict[str, int]:
        """``{layer: nodes over all ranks}``."""
        return {l: s.n_nodes for l, s in self.shards.items()}

    @property
    def local_sizes_(self) -> dict[str, int]:
        """``{layer: nodes this rank keeps}``."""
        return {l: s.local_size for l, s in self.shards.items()}

    def _layer_subset(self, layers: Sequence[str] | None) -> list[str]:
        return check_layers(layers, self.layers)

    def run(self, x: Tensor | MultiInput) -> Any:
        """One probe run over a batch (the model's outputs and every layer's HAPs)."""
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        if self.input_shape_ is not None and isinstance(x, Tensor) and tuple(x.shape[1:]) != self.input_shape_:
            raise ShapeMismatchError(f"input batch has per-input shape {tuple(x.shape[1:])}; the network was "
                                     f"fitted on {self.input_shape_}")
        return self.probe.run(x)

    def scores_from_haps(self, haps: Mapping[str, Tensor], top_k: int | None = None,
                         layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Eq. 3 evidence ``{layer: Tensor[B, C]}`` from HAPs, over all ranks' nodes (a collective)."""
        k = self.top_k if top_k is None else int(top_k)
        return {l: self.shards[l].scores(haps[l], k) for l in self._layer_subset(layers)}

    def exemplars_from_haps(self, haps: Mapping[str, Tensor], k: int = 5,
                            layers: Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Training positions and cosines ``{layer: [B, min(k, M)]}`` of the nearest nodes, nearest first."""
        idx, sims = {}, {}
        for l in self._layer_subset(layers):
            c = self.shards[l].topk(haps[l], k)
            idx[l], sims[l] = c.positions, c.values
        return idx, sims

    def _collect(self, x: Any, fn) -> Any:
        return collect(x, self.run, fn, self.batch_size)

    def predict_scores(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer class evidence P (Eq. 3): ``{layer: Tensor[B, C]}`` (a collective)."""
        return self._collect(x, lambda r: self.scores_from_haps(r.haps, top_k))

    def predict(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer predicted class ``{layer: LongTensor[B]}`` (a collective)."""
        return {l: p.argmax(dim=1) for l, p in self.predict_scores(x, top_k).items()}

    def consistency(self, x: Any, top_k: int = 20) -> Tensor:
        """CPL (Eq. 5) ``Tensor[B]`` (a collective)."""
        if len(self.layers) < 2:
            raise ValueError(f"consistency needs at least two probed layers, this network has {self.layers}")
        return self._collect(x, lambda r: cpl(self.scores_from_haps(r.haps, top_k)))

    def exemplars(self, x: Tensor, k: int = 5, *, return_similarities: bool = False) -> Any:
        """Training positions ``{layer: LongTensor[B, k]}`` behind the nearest nodes (a collective)."""
        idx, sims = self.exemplars_from_haps(self.run(x).haps, k)
        return (idx, sims) if return_similarities else idx
