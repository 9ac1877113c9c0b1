"""The fitting pass of Eq. 2 over the (input, node) pairs that count (docs/method.md section 3).

:class:`HebbianPairPass` computes a :class:`~libnet_plugin.readout.HebbianReadout`'s weights for one exact
library without the [N, M] product of every training input with every node: it records what the leader rule
of :class:`~libnet_plugin.library.ExactLibrary` computed in the fit's first pass (it is the library's
:class:`~libnet_plugin.library.LeaderObserver`) and, in the second pass, recomputes in float64 only the
pairs whose gain is above :data:`PAIR_GAIN_CUT`. :func:`dense_pass_reason` says which libraries and
readouts it serves; the others take the dense pass (``readout.accumulate(library.similarity(haps), answers)``).
:mod:`libnet_plugin.fitting` drives both passes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .readout import HebbianReadout

__all__ = ["PAIR_GAIN_CUT", "pair_cosine_cut", "HebbianPairPass", "dense_pass_reason"]

#: the fitting pass leaves out the (input, node) pairs whose gain g is below this (cosines more than
#: ``27.7 * width`` below 1, 0.723 for the width 0.01): each such term is below 1e-12
PAIR_GAIN_CUT = 2.0 ** -40


def pair_cosine_cut(width: float) -> float:
    """The cosine below which g of Eq. 2 falls under :data:`PAIR_GAIN_CUT`: ``1 + width * ln(cut)``."""
    return 1.0 + float(width) * math.log(PAIR_GAIN_CUT)


def dense_pass_reason(library: Any, readout: Any) -> str | None:
    """Why ``readout`` of ``library`` takes the dense pass rather than :class:`HebbianPairPass`, or ``None``
    when the pair pass serves them (the rule of :class:`~libnet_plugin.library.Library`'s docstring).

    The pair pass serves a :class:`~libnet_plugin.readout.HebbianReadout` (exactly that class) whose cut
    lies above cosine 0.5 (widths up to 0.018), with an :class:`~libnet_plugin.library.ExactLibrary`
    whose leader rule, screen, scores and normalisation are ExactLibrary's own (a subclass may change
    ``embed``, as the sparse and projected libraries do) and that scores in its own dtype.

    Example:
        >>> from libnet_plugin.library import ExactLibrary
        >>> dense_pass_reason(ExactLibrary(0.8), HebbianReadout(3)) is None
        True
        >>> dense_pass_reason(ExactLibrary(0.8), HebbianReadout(3, width=0.05))
        'the readout is not a HebbianReadout with a width up to 0.018 (its gain counts at every cosine)'
    """
    from .library import ExactLibrary

    if type(readout) is not HebbianReadout or pair_cosine_cut(readout.width) < 0.5:
        return "the readout is not a HebbianReadout with a width up to 0.018 (its gain counts at every cosine)"
    if not isinstance(library, ExactLibrary):
        return f"the library kind {type(library).__name__} is not an ExactLibrary"
    kind = type(library)
    changed = [f for f in ("partial_fit", "_novel_rows", "_screen", "similarity", "transform")
               if getattr(kind, f) is not getattr(ExactLibrary, f)]
    if changed:
        return f"the library kind {kind.__name__} overrides ExactLibrary's {', '.join(changed)}"
    if library.score_dtype != library.dtype:
        return f"the library scores in {library.score_dtype}, not in its own dtype {library.dtype}"
    return None


class HebbianPairPass:
    """The fitting pass of Eq. 2 for one exact library and its Hebbian readout, over the pairs that count.

    ``g(h) = exp(-(1 - h) / width)`` is below :data:`PAIR_GAIN_CUT` (1e-12) for every cosine ``h`` below
    :func:`pair_cosine_cut` (0.723 for the width 0.01), so each input needs only its few nodes above that
    cosine. Those pairs are found without the [N, M] product, from what the leader rule computed anyway
    in the first pass (``record=True``; the pass is the library's observer,
    ``ExactLibrary.partial_fit(..., observer=self)``):

    - an input the rule compared with the whole library of ``m`` nodes has its cosines to nodes
      ``0 .. m-1``: the pairs among them above the cut (less a rounding margin) are kept;
    - every input has a *lead*, a node at cosine ``s >= theta`` (the node that decided it, or its own),
      and the rule computed the cosines between all nodes; the ones above a bound are kept as neighbour
      lists. On the unit sphere angles obey the triangle inequality, so a node ``n`` at cosine above the
      cut from the input has ``angle(lead, n) <= acos(s) + acos(cut)``: only the lead's neighbours
      within that angle can count. Where that leaves many nodes, the input is scored against the nodes
      not covered yet by one float32 product instead, as before. When the bound would leave most inputs
      to that product anyway (unrelated inputs at high cosines, as a conv layer's patterns), the lists
      are dropped at the end of the first pass (:data:`TRIANGLE_SHARE`);
    - when theta lies below the cut (:attr:`settled`), a stored row has no pair with any node stored
      after it: the rule found each of them below theta against it. Such a row needs its own pair only.

    Every candidate pair's cosine is then recomputed in float64 from the stored float32 node and the
    input's activations (``h = <f, n> / (||f|| + eps)``), and the pair counts when that cosine is at least
    the cut; g and the sums are float64, rounded to float32 once at the end. Which pairs count and
    their gains thus depend only on the pair, not on how products were split into calls: in a distributed
    fit each rank records its own rows of every data-parallel step (:meth:`on_step`: their cosines to the
    library before the step, and which became nodes; no neighbour lists), sums Eq. 2 over its rows and the
    ranks' sums add up to the weights of one process up to the order of the float64 sums. With
    ``record=False`` pass 2 alone finds the pairs (every input scored against all nodes in float32).

    In float64 the pass keeps a copy of the library while it takes at most :data:`NODES64_BYTES` (256 MB),
    and converts the nodes each batch uses otherwise.

    Use, for one library and its readout (:mod:`libnet_plugin.fitting` does this): for every first-pass
    batch, :meth:`begin` with the batch's position then ``library.partial_fit(haps, indices, observer=self)``
    (or, on a rank of a distributed fit, ``partial_fit`` of the step's rows then :meth:`on_step`); once the
    library is complete, ``readout.reset(library.size)`` and :meth:`end_first_pass`; :meth:`accumulate`
    for every batch of the second pass, in the first pass's order; :meth:`finalize` sets the weights.

    Memory: 12 bytes per input (the number of nodes covered, the lead and its cosine), the kept pairs
    (at most ``ROW_PAIRS`` per input on average, beyond which inputs are scored in pass 2 instead) and
    the neighbour lists (at most ``M * D / 4`` pairs, else the lists are dropped and every input is
    scored against the nodes not covered); no [N, M] array.

    Args:
        library: an empty :class:`~libnet_plugin.library.ExactLibrary` (or subclass that only changes
            ``embed``) scoring in its own dtype; see :meth:`applies`.
        readout: its :class:`HebbianReadout`; its weights are set by :meth:`finalize`.
        record: keep what the first pass computed (:meth:`on_chunk`, or :meth:`on_step` on a rank of a
            distributed fit); ``False``: pass 2 alone finds the pairs.
    """

    #: a pair recomputed by gathering costs about this many pairs of a dense float32 product
    GATHER_COST = 16
    #: stored (input, node) pairs of the first pass, on average per input
    ROW_PAIRS = 8
    #: bins of the per-node histogram of neighbour cosines (estimates a lead's candidates in the first pass)
    HIST_BINS = 64
    #: neighbour pairs always allowed, and beyond that at most ``M * D / NEIGHBOUR_SHARE``
    NEIGHBOUR_PAIRS = 1 << 20
    NEIGHBOUR_SHARE = 4
    #: the float64 pass converts the whole library once when that copy takes at most this many bytes
    NODES64_BYTES = 1 << 28
    #: the neighbour lists are kept for pass 2 only when at least this share of the inputs it scores would use them
    TRIANGLE_SHARE = 0.1
    #: ``covered`` of an input with no nodes left to score in pass 2 (a stored row, see :attr:`settled`)
    DONE = torch.iinfo(torch.int32).max

    def __init__(self, library: Any, readout: HebbianReadout, *, record: bool = True):
        self.lib = library
        self.readout = readout
        self.width = float(readout.width)
        self.cut = pair_cosine_cut(self.width)
        self.angle_cut = math.acos(max(-1.0, min(1.0, self.cut)))
        self.record = bool(record) and library.size == 0
        self.offset = 0  # position of the current first-pass batch in the visiting order
        self._margin: float | None = None
        self._chunks: list[tuple[Tensor, Tensor, Tensor]] = []  # per chunk: nodes covered, lead, lead cosine
        self._pairs: list[tuple[Tensor, Tensor]] = []  # first-pass pairs (input position, node)
        self._n_pairs = 0
        self._pairs_ok = True
        self._nbrs: list[tuple[Tensor, Tensor, Tensor]] | None = [] if self.record else None
        self._n_nbrs = 0
        self._hist: Tensor | None = None  # per node, its neighbours' cosines in HIST_BINS bins over [-1, 1]
        self._screen_off = 0  # first-pass batches left without the library's screen
        self._screen_backoff = 1
        self._hit: Tensor | None = None
        self._tot: Tensor | None = None
        self.stats = {"triangle_rows": 0, "dense_rows": 0, "settled_rows": 0, "pairs": 0, "kept": 0,
                      "library64": 0}
        self.cosines = _PairCosines(library, self.stats, self.NODES64_BYTES)  # the pair cosines of pass 2

    @staticmethod
    def applies(library: Any, readout: Any) -> bool:
        """Whether this pass computes ``readout``'s Eq. 2 for ``library`` (:func:`dense_pass_reason` is None)."""
        return dense_pass_reason(library, readout) is None

    @property
    def margin(self) -> float:
        """Rounding margin on float32 cosines of the library's vectors (generous: a pair it misses has g
        near the cut anyway)."""
        if self._margin is None:
            self._margin = 1e-3 + 16 * torch.finfo(torch.float32).eps * math.sqrt(self.lib.dim or 1)
        return self._margin

    @property
    def settled(self) -> bool:
        """Whether theta lies below the cut by more than the rounding margin (twice): then a stored row
        cannot count with any node stored after it, since the rule found that node's cosine to it below
        theta."""
        return self.lib.threshold < self.cut - 2 * self.margin

    def _bound(self, s: Tensor) -> Tensor:
        """The smallest cosine to the lead a counting node can have, for lead cosines ``s`` (float32)."""
        angle = torch.acos((s.double() - self.margin).clamp(-1.0, 1.0)) + self.angle_cut
        return torch.cos(angle.clamp(max=math.pi)) - self.margin

    # -- first pass ------------------------------------------------------------------------------
    def begin(self, offset: int) -> None:
        """The next first-pass batch starts at position ``offset`` of the visiting order."""
        self.offset = int(offset)

    def on_chunk(self, c: Any) -> None:
        """Keep what one chunk of the leader rule computed (a ``ChunkScores``; the observer's third call)."""
        dev = c.dense.device
        m, base = c.first_node, self.offset + c.start
        rec = _Record(c.rows, dev)
        if c.screened.numel():
            rec.lead[c.screened] = c.screened_node.to(torch.int32)
            rec.cos[c.screened] = c.screened_cos.float()
        if c.dense_cos is not None and c.dense.numel():
            self._dense(rec, c.dense, c.dense_cos, m, base, c.dense_best, c.dense_node)
        if c.cand.numel():
            new = c.cand[c.accepted]
            ids = torch.arange(m, m + new.numel(), dtype=torch.int32, device=dev)
            gram = None if c.gram is None else torch.from_numpy(c.gram).to(dev)
            if gram is not None and new.numel() < c.cand.numel():  # rows blocked by a row of the chunk
                rejected = torch.ones(c.cand.numel(), dtype=torch.bool, device=dev)
                rejected[c.accepted] = False
                best, arg = gram[rejected][:, c.accepted].max(dim=1)
                rows = c.cand[rejected]
                better = best > rec.cos[rows]
                rec.lead[rows[better]], rec.cos[rows[better]] = ids[arg[better]], best[better]
            self._stored(rec, new, ids, m, base)
            self._neighbours(c, m, gram)
        self._keep(rec)

    def on_step(self, cos: Tensor | None, first_node: int, node_of_row: Tensor) -> None:
        """Keep what one data-parallel step of a distributed first pass computed for this rank's rows (they
        follow the rows of the earlier steps in the rank's own order).

        Args:
            cos: ``[b, first_node]`` float32 cosines of the rows to the library as it was before the step
                (``None`` when it was empty).
            first_node: the library's size before the step.
            node_of_row: ``LongTensor[b]``, the node each row became in the step, ``-1`` for none.
        """
        dev = node_of_row.device
        b, base = node_of_row.numel(), self.offset
        rec = _Record(b, dev)
        if cos is not None and b:
            self._dense(rec, torch.arange(b, device=dev), cos.to(dev), first_node, base)
        new = torch.nonzero(node_of_row >= 0).flatten()
        self._stored(rec, new, node_of_row[new].to(torch.int32), first_node, base)
        self._keep(rec)
        self.offset += b

    def _dense(self, rec: _Record, rows: Tensor, cos: Tensor, m: int, base: int, best: Tensor | None = None,
               arg: Tensor | None = None) -> None:
        """Rows ``rows`` were compared with nodes ``0 .. m-1`` (cosines ``cos``; ``best`` / ``arg``: their
        ``cos.max(dim=1)`` where the leader rule took it already): their leads, and their pairs above the cut
        while the pairs kept stay within :data:`ROW_PAIRS` per input."""
        if best is None or arg is None:
            best, arg = cos.max(dim=1)
        rec.lead[rows], rec.cos[rows] = arg.to(torch.int32), best.float()
        if self._pairs_ok:
            hit = torch.nonzero(cos >= self.cut - self.margin)
            if self._n_pairs + hit.shape[0] <= self.ROW_PAIRS * (base + rec.covered.numel()) + 4096:
                rec.covered[rows] = m
                rec.pair(rows[hit[:, 0]] + base, hit[:, 1])
                self._n_pairs += hit.shape[0]
            else:  # many high cosines: from here on pass 2 scores the inputs against every node
                self._pairs_ok = False

    def _stored(self, rec: _Record, new: Tensor, ids: Tensor, m: int, base: int) -> None:
        """Rows ``new`` became nodes ``ids`` (the library had ``m`` nodes before them)."""
        rec.lead[new], rec.cos[new] = ids, 1.0
        if self.settled:
            # a stored row's later nodes were all novel against it (cosine below theta, so below the
            # cut): once its earlier nodes are covered, its only pair left is the one with itself
            done = rec.covered[new] == m
            rec.pair(new[done] + base, ids[done].long())
            self._n_pairs += int(done.sum())
            rec.covered[new[done]] = self.DONE

    def _keep(self, rec: _Record) -> None:
        if rec.rows:
            rows, nodes = torch.cat(rec.rows), torch.cat(rec.nodes)
            order = torch.argsort(rows, stable=True)  # finish() indexes the pairs row by row
            self._pairs.append((rows[order], nodes[order]))
        self._chunks.append((rec.covered, rec.lead, rec.cos))

    def _neighbours(self, c: Any, m: int, gram: Tensor | None) -> None:
        """Keep the cosines between the chunk's new nodes and all earlier nodes that a lead may need."""
        if self._nbrs is None:
            return
        low = float(self._bound(torch.tensor([self.lib.threshold], dtype=torch.float32)))
        parts = []
        if c.novel_cos is not None:
            hit = torch.nonzero(c.novel_cos >= low)
            parts.append((hit[:, 0] + m, hit[:, 1], c.novel_cos[hit[:, 0], hit[:, 1]]))
        if gram is not None and c.accepted.numel() > 1:
            g = gram[c.accepted][:, c.accepted]
            hit = torch.nonzero(torch.tril(g >= low, diagonal=-1))
            parts.append((hit[:, 0] + m, hit[:, 1] + m, g[hit[:, 0], hit[:, 1]]))
        size = m + c.accepted.numel()
        nb = self.HIST_BINS
        if self._hist is None or self._hist.shape[0] < size:
            grown = torch.zeros(max(2 * size, 256), nb, dtype=torch.int32, device=c.dense.device)
            if self._hist is not None:
                grown[: self._hist.shape[0]] = self._hist
            self._hist = grown
        flat = self._hist.view(-1)
        for i, n, cos in parts:
            self._n_nbrs += i.numel()
            self._nbrs.append((i.to(torch.int32), n.to(torch.int32), cos.float()))
            bins = ((cos.float() + 1.0) * (nb / 2)).long().clamp_(0, nb - 1)
            ones = torch.ones(bins.numel(), dtype=torch.int32, device=bins.device)
            flat.index_add_(0, i * nb + bins, ones)
            flat.index_add_(0, n * nb + bins, ones)
        if self._n_nbrs > max(self.NEIGHBOUR_PAIRS, size * (self.lib.dim or 1) // self.NEIGHBOUR_SHARE):
            self._nbrs = None  # too many close nodes for lists to pay: pass 2 scores the inputs instead
            self._hist = None

    def use_screen(self) -> bool:
        """Whether the library should screen the next first-pass batch (the observer's first call, once per
        ``partial_fit`` call): not while this pass wanted most screened rows compared with every node anyway
        (then the screen only adds its own cost); tried again after 1, 2, 4, ... batches. Never changes the
        nodes."""
        if self._screen_off > 0:
            self._screen_off -= 1
            return False
        return True

    def _estimate(self, node: Tensor, cos: Tensor) -> Tensor:
        """At least the number of candidates the triangle leaves for leads ``node`` at cosines ``cos``
        (from the histogram of the leads' neighbour cosines, the lead itself included)."""
        nb = self.HIST_BINS
        at_least = ((self._bound(cos).float() + 1.0) * (nb / 2)).long().clamp_(0, nb - 1)
        above = self._hist[node.long()].flip(1).cumsum(1).flip(1)  # neighbours in each bin and above
        return above.gather(1, at_least[:, None]).squeeze(1) + 1

    def want_dense(self, node: Tensor, cos: Tensor) -> Tensor:
        """For rows the screen decided (``node`` at cosine ``cos``; the observer's second call): those whose
        lead would leave pass 2 so many candidates that a product with every node, made now, costs less."""
        m = self.lib.size
        if self._nbrs is None or self._hist is None:  # no neighbour lists: pass 2 would score them fully
            return self._schedule(torch.ones(node.numel(), dtype=torch.bool, device=node.device))
        return self._schedule(self._estimate(node, cos) * self.GATHER_COST > m)

    def _schedule(self, dense: Tensor) -> Tensor:
        if dense.numel() and float(dense.float().mean()) >= 0.5:
            self._screen_off, self._screen_backoff = self._screen_backoff, min(2 * self._screen_backoff, 64)
        else:
            self._screen_backoff = 1
        return dense

    def _triangle_pays(self, covered: Tensor, lead: Tensor, cos: Tensor, m: int) -> bool:
        """Whether at least :data:`TRIANGLE_SHARE` of the inputs pass 2 still has to score would take their
        candidates from the neighbour lists (by the histogram's estimate) rather than the dense product."""
        need = torch.nonzero((lead >= 0) & (covered < m)).flatten()
        if not need.numel() or self._hist is None:
            return False
        useful = sum(int((self._estimate(lead[part], cos[part]) * self.GATHER_COST <= m - covered[part]).sum())
                     for part in need.split(1 << 16))  # blocks: the estimate holds a row of bins per input
        return useful >= self.TRIANGLE_SHARE * need.numel()

    def end_first_pass(self, n_inputs: int) -> None:
        """End of the first pass over ``n_inputs`` inputs: index what was kept for the second pass (the
        readout must have been :meth:`~HebbianReadout.reset` to the library's final size before)."""
        m = self.lib.size
        dev = self.lib.device
        if self.record:
            cov, lead, s = (torch.cat(t) for t in zip(*self._chunks))
            if cov.numel() != n_inputs:
                raise RuntimeError(f"the first pass recorded {cov.numel()} inputs, not {n_inputs}")
            self.covered, self.lead, self.lead_cos = cov, lead, s
            self.stats["settled_rows"] = int((cov == self.DONE).sum())
            rows = torch.cat([p[0] for p in self._pairs]) if self._pairs else torch.zeros(0, dtype=torch.long, device=dev)
            self.pair_nodes = (torch.cat([p[1] for p in self._pairs]) if self._pairs
                               else torch.zeros(0, dtype=torch.long, device=dev))
            self.pair_ptr = torch.zeros(n_inputs + 1, dtype=torch.long, device=dev)
            self.pair_ptr[1:] = torch.bincount(rows, minlength=n_inputs).cumsum(0)  # rows come in order
            self._pairs = []
            if self._nbrs is not None and not self._triangle_pays(cov, lead, s, m):
                self._nbrs = None  # too few inputs would leave the dense product: no lists to go through
                self._hist = None
            if self._nbrs is not None:
                if self._nbrs:
                    i, n, cos = (torch.cat(t).long() if k < 2 else torch.cat(t) for k, t in enumerate(zip(*self._nbrs)))
                else:
                    i = n = torch.zeros(0, dtype=torch.long, device=dev)
                    cos = torch.zeros(0, dtype=torch.float32, device=dev)
                src, dst, both = torch.cat([i, n]), torch.cat([n, i]), torch.cat([cos, cos])
                order = torch.argsort(src, stable=True)
                self.nbr_node, self.nbr_cos = dst[order], both[order]
                self.nbr_ptr = torch.zeros(m + 1, dtype=torch.long, device=dev)
                self.nbr_ptr[1:] = torch.bincount(src, minlength=m).cumsum(0)
                self._nbrs = None
                self._hist = None
                self.has_nbrs = True
            else:
                self.has_nbrs = False
            self._chunks = []
        else:
            self.has_nbrs = False
        self._hit = torch.zeros(m * self.readout.n_classes, dtype=torch.float64, device=dev)
        self._tot = torch.zeros(m, dtype=torch.float64, device=dev)

    # -- second pass -----------------------------------------------------------------------------
    def accumulate(self, haps: Tensor, answers: Tensor, seen: int) -> None:
        """Add the inputs at positions ``seen ..`` (their raw activations and the model's answers)."""
        lib = self.lib
        f = lib.embed(haps)
        b, m = f.shape[0], lib.size
        if b == 0:
            return
        dev = f.device
        answers = answers.to(dev, torch.long)
        if answers.numel() and (int(answers.min()) < 0 or int(answers.max()) >= self.readout.n_classes):
            raise ValueError(f"model answers must lie in [0, {self.readout.n_classes}), got range "
                             f"[{int(answers.min())}, {int(answers.max())}]")
        nodes = lib.nodes
        rows_parts: list[Tensor] = []
        node_parts: list[Tensor] = []
        if self.record:
            covered = self.covered[seen:seen + b].long()
            lead = self.lead[seen:seen + b].long()
            lo, hi = int(self.pair_ptr[seen]), int(self.pair_ptr[seen + b])
            if hi > lo:  # the first pass's pairs of these inputs (nodes below ``covered``)
                counts = self.pair_ptr[seen + 1:seen + b + 1] - self.pair_ptr[seen:seen + b]
                rows_parts.append(torch.repeat_interleave(torch.arange(b, device=dev), counts))
                node_parts.append(self.pair_nodes[lo:hi])
        else:
            covered = torch.zeros(b, dtype=torch.long, device=dev)
            lead = torch.full((b,), -1, dtype=torch.long, device=dev)
        scored = torch.ones(b, dtype=torch.bool, device=dev)  # scored against the nodes from ``covered`` on
        # the rows' norms, taken once for both float32 products below (one pass over the batch, not two); only
        # rows with nodes left to score (``covered < m``) need them
        fnorm = torch.linalg.vector_norm(f, dim=1) if bool((covered < m).any()) else None
        if self.has_nbrs:
            self._triangle(f, seen, b, covered, lead, scored, rows_parts, node_parts, fnorm)
        rest = torch.nonzero(scored & (covered < m)).flatten()
        self.stats["dense_rows"] += rest.numel()
        self.stats["triangle_rows"] += b - rest.numel()
        if rest.numel():
            inv = 1.0 / (fnorm[:, None] + _eps())
            for first in torch.unique(covered[rest]).tolist():
                r = rest[covered[rest] == first]
                fr = f if r.numel() == b else torch.index_select(
                    f, 0, r, out=self.cosines.buffer("dense_rows", r.numel(), f.shape[1], f.dtype, dev))
                cos = (fr @ nodes[first:].T).mul_(inv[r])
                hit = torch.nonzero(cos >= self.cut - self.margin)
                rows_parts.append(r[hit[:, 0]])
                node_parts.append(hit[:, 1] + first)
        if not rows_parts:
            return
        rows, idx = torch.cat(rows_parts), torch.cat(node_parts).long()
        key = torch.sort(rows * m + idx).values  # row by row, nodes ascending: a fixed order for the sums
        rows, idx = key // m, key % m
        self.stats["pairs"] += rows.numel()
        cos = self.cosines(f, rows, idx, torch.float64)
        keep = cos >= self.cut
        rows, idx, cos = rows[keep], idx[keep], cos[keep]
        self.stats["kept"] += rows.numel()
        g = cos.sub_(1.0).div_(self.width).exp_()
        self._tot.index_add_(0, idx, g)
        self._hit.index_add_(0, idx * self.readout.n_classes + answers[rows], g)

    def _triangle(self, f: Tensor, seen: int, b: int, covered: Tensor, lead: Tensor, scored: Tensor,
                  rows_parts: list[Tensor], node_parts: list[Tensor], fnorm: Tensor | None = None) -> None:
        """Candidates among the nodes from ``covered`` on, from each input's lead and its neighbour list;
        inputs for which that leaves few enough candidates are taken off ``scored`` (``fnorm``: the rows'
        norms, when taken already)."""
        dev = covered.device
        m = self.lib.size
        has = torch.nonzero((lead >= 0) & (covered < m)).flatten()
        if not has.numel():
            return
        a = lead[has]
        start = self.nbr_ptr[a]
        count = self.nbr_ptr[a + 1] - start
        rep = torch.repeat_interleave(torch.arange(has.numel(), device=dev), count)
        first = torch.cumsum(count, 0) - count
        at = start[rep] + torch.arange(rep.numel(), device=dev) - first[rep]
        nb, nc = self.nbr_node[at], self.nbr_cos[at]
        bound = self._bound(self.lead_cos[seen:seen + b][has])
        row = has[rep]
        keep = (nc.double() >= bound[rep]) & (nb >= covered[row])
        own = a >= covered[has]  # the lead itself, when not covered
        n_cand = torch.bincount(rep[keep], minlength=has.numel()) + own.long()
        use = n_cand * self.GATHER_COST <= m - covered[has]
        pick = keep & use[rep]
        r, n = torch.cat([row[pick], has[use & own]]), torch.cat([nb[pick].long(), a[use & own]])
        if r.numel():  # only a bound so far: their float32 cosines first, the float64 ones for those that count
            near = self.cosines(f, r, n, torch.float32, fnorm) >= self.cut - self.margin
            rows_parts.append(r[near])
            node_parts.append(n[near])
        scored[has[use]] = False

    def finalize(self) -> None:
        """End of the second pass: set the readout's weights ``W = 2 g^T onehot - sum_k g`` (float32) from the float64 sums."""
        c = self.readout.n_classes
        self.cosines.release()
        w = 2.0 * self._hit.view(-1, c) - self._tot[:, None]
        self.readout.load_state_dict({"weight": w.float()})


class _PairCosines:
    """Cosines of chosen (input, node) pairs of one library, each a dot product of its own (a sampled product:
    nothing [B, M]), with the conversion buffers and the float64 copy of the library kept between calls."""

    def __init__(self, library: Any, stats: dict[str, int], nodes64_bytes: int):
        self.lib = library
        self.stats = stats
        self.nodes64_bytes = int(nodes64_bytes)
        self._buffers: dict[str, Tensor] = {}  # conversion buffers of the pair cosines
        self._nodes64: Tensor | None = None  # the library in float64, when small enough

    def release(self) -> None:
        """Drop the buffers and the float64 copy of the library."""
        self._buffers, self._nodes64 = {}, None

    def __call__(self, f: Tensor, rows: Tensor, idx: Tensor, dtype: torch.dtype, norm: Tensor | None = None) -> Tensor:
        """Cosines in ``dtype`` of the pairs (``rows`` of ``f``, library nodes ``idx``; sorted by row), each
        a dot product of its own (a sampled product: nothing [B, M]). ``norm``: ``vector_norm(f, dim=1)``
        where the caller took it already (used when ``f`` needs no conversion to ``dtype``).

        The rows and nodes the pairs use are converted to ``dtype`` once per call, into buffers kept for the
        pass (fresh allocations of that size cost more than the conversion: page faults); in float64 the
        whole library is converted once instead when it takes at most ``HebbianPairPass.NODES64_BYTES``."""
        import warnings

        order = torch.argsort(rows, stable=True)
        if bool((order[1:] < order[:-1]).any()):  # not sorted by row yet
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
            return self(f, rows[order], idx[order], dtype, norm)[back]
        lib_nodes = self.lib.nodes
        if dtype == f.dtype == lib_nodes.dtype:  # no conversion: every row and node as they are
            cols, inv, rinv = lib_nodes, idx, rows
            fr, n_rows_ = f, f.shape[0]
        else:  # convert only the rows (and, without a converted library, the nodes) the pairs use
            norm = None  # the norms are those of the converted rows
            used, rinv = torch.unique(rows, return_inverse=True)
            fr = self.buffer("rows", used.numel(), f.shape[1], dtype, f.device)
            if used.numel() == f.shape[0]:  # every row (the usual case): no gather
                fr.copy_(f)
            else:
                fr.copy_(torch.index_select(f, 0, used, out=self.buffer("rows32", used.numel(), f.shape[1], f.dtype,
                                                                           f.device)))
            n_rows_ = used.numel()
            cols, inv = self._converted_nodes(idx, dtype)
        crow = torch.zeros(n_rows_ + 1, dtype=torch.long, device=f.device)
        crow[1:] = torch.bincount(rinv, minlength=n_rows_).cumsum(0)
        with warnings.catch_warnings():  # torch's note that sparse CSR tensors are in beta
            warnings.simplefilter("ignore", UserWarning)
            pattern = torch.sparse_csr_tensor(crow, inv, torch.zeros(rows.numel(), dtype=dtype, device=f.device),
                                              size=(n_rows_, cols.shape[0]), check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, fr, cols.T, beta=0.0).values()
        if norm is None:
            norm = torch.linalg.vector_norm(fr, dim=1)
        return dots / (norm + _eps())[rinv]

    def _converted_nodes(self, idx: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """The library nodes in ``dtype`` for pairs with nodes ``idx``, and each pair's row in them."""
        nodes = self.lib.nodes
        if dtype == torch.float64 and nodes.numel() * 8 <= self.nodes64_bytes:
            if self._nodes64 is None or self._nodes64.shape[0] != nodes.shape[0]:
                self._nodes64 = nodes.to(torch.float64)
                self.stats["library64"] = 1
            return self._nodes64, idx
        uniq, inv = torch.unique(idx, return_inverse=True)
        cols = self.buffer("nodes", uniq.numel(), nodes.shape[1], dtype, nodes.device)
        cols.copy_(torch.index_select(nodes, 0, uniq, out=self.buffer("nodes32", uniq.numel(), nodes.shape[1],
                                                                        nodes.dtype, nodes.device)))
        return cols, inv

    def buffer(self, name: str, rows: int, dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """The first ``rows`` rows of a buffer kept between calls (grown when too small)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != dim or buf.dtype != dtype or buf.device != device:
            buf = torch.empty(max(rows, 1), dim, dtype=dtype, device=device)
            self._buffers[name] = buf
        return buf[:rows]


class _Record:
    """What the first pass keeps of one chunk's rows: nodes covered, lead and its cosine, pairs found."""

    def __init__(self, n: int, device: torch.device):
        self.covered = torch.zeros(n, dtype=torch.int32, device=device)
        self.lead = torch.full((n,), -1, dtype=torch.int32, device=device)
        self.cos = torch.full((n,), -1.0, dtype=torch.float32, device=device)
        self.rows: list[Tensor] = []
        self.nodes: list[Tensor] = []

    def pair(self, rows: Tensor, nodes: Tensor) -> None:
        self.rows.append(rows)
        self.nodes.append(nodes)


def _eps() -> float:
    from .library import EPS

    return EPS
