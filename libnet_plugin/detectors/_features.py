"""Helpers shared by the detectors: layer checks, saved-state access, node classes, pooling, Gaussian fits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..errors import LayerNotFoundError, SaveFormatError, ShapeMismatchError
from ..probe import TorchLayerProbe
from ..readout import WeightedReadout

if TYPE_CHECKING:  # pragma: no cover
    from .api import FittedNetwork


def check_layers(net: FittedNetwork, layers: Sequence[str] | None, what: str) -> list[str]:
    if layers is None:
        return list(net.layers)
    layers = [layers] if isinstance(layers, str) else list(layers)
    unknown = [l for l in layers if l not in net.layers]
    if unknown:
        raise LayerNotFoundError(f"the {what} detector was asked for layers {unknown}, which the library network "
                                 f"does not probe; probed layers: {net.layers}")
    if not layers:
        raise ValueError(f"the {what} detector needs at least one layer")
    return layers


def layer_state(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def require_tensor(state: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise SaveFormatError(f"the saved {what} detector lacks the tensor {key!r}")
    return state[key]


def node_classes(net: FittedNetwork, layer: str, chunk: int = 1024) -> Tensor:
    """The class the Hebbian readout links to each library node of ``layer``: ``LongTensor[M]``.

    It is the argmax over classes of the node's readout row ``W[n, :]`` (Eq. 2): the class of the model's
    answers for the training inputs nearest to the node (usually the answer for the node's own input).
    Readouts without a ``weight`` attribute are asked through their ``scores`` method with one-hot
    library outputs, so any readout plugin works.

    Args:
        net: a fitted library network.
        layer: one of its layers.
        chunk: nodes asked at once from a readout without ``weight``.

    Returns:
        ``LongTensor[M]``, one class per node.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, ["0"], thresholds=0.8).fit(torch.randn(100, 6))
        >>> classes = node_classes(net, "0")
        >>> classes.shape == (net.library_sizes_["0"],), int(classes.max()) < 3
        (True, True)
    """
    readout = net.readouts_[layer]
    if isinstance(readout, WeightedReadout):
        return readout.weight.argmax(dim=1).to(net.device)
    m = net.libraries_[layer].size
    parts = []
    for i in range(0, m, chunk):
        eye = torch.zeros(min(chunk, m - i), m, device=net.device)
        eye[torch.arange(eye.shape[0]), torch.arange(i, i + eye.shape[0])] = 1.0
        parts.append(readout.scores(eye, 1).argmax(dim=1))
    return torch.cat(parts).to(net.device) if parts else torch.empty(0, dtype=torch.long, device=net.device)


def check_pool(pool: Any) -> Any:
    if not (pool is None or pool == "auto" or isinstance(pool, Mapping)):
        raise ValueError(f"pool must be 'auto', None or {{layer: n_channels}}, got {pool!r}")
    return dict(pool) if isinstance(pool, Mapping) else pool


def conv_channels(net: FittedNetwork, layer: str, dim: int, pool: Any) -> int:
    """Channels over which a layer's flattened features of width ``dim`` are averaged (0: none).

    ``pool`` is ``"auto"`` (the probed torch module's ``out_channels``, e.g. a convolution's), ``None``
    (never) or ``{layer: n_channels}``. A layer is pooled only when ``dim`` is a multiple of the channels
    larger than them.

    Raises:
        ShapeMismatchError: ``{layer: n_channels}`` names a number that does not divide ``dim``.
    """
    if pool is None:
        return 0
    if isinstance(pool, Mapping):
        c = int(pool.get(layer, 0))
    else:
        module = net.probe.modules.get(layer) if isinstance(net.probe, TorchLayerProbe) else None
        spec = getattr(net.probe, "specs", {}).get(layer) if module is not None else None
        # a torch module's own attribute (Conv*d), if any; its in_channels for a layer spec that reads its input
        c = int(getattr(module, "in_channels" if spec is not None and spec.where == "input" else "out_channels",
                        0) or 0)
    if c and dim % c:
        raise ShapeMismatchError(f"layer {layer!r}: cannot average {dim} features over {c} channels")
    return c if c and dim > c else 0


def layer_projection(seed: int, index: int, dim: int, max_dim: int, device: Any) -> Tensor:
    """The fixed Gaussian random projection ``[dim, max_dim]`` (scaled by ``1 / sqrt(max_dim)``) of the
    ``index``-th chosen layer: each layer draws from its own seed derived from ``seed``."""
    g = torch.Generator().manual_seed(seed + 7919 * (index + 1))
    return (torch.randn(dim, max_dim, generator=g) / math.sqrt(max_dim)).to(device)


def pooled(x: Tensor, channels: int, proj: Tensor | None) -> Tensor:
    """Features of rows ``x`` ``[B, D]``: channel means when ``channels``, else ``x @ proj`` (or ``x``)."""
    if channels:
        return x.reshape(x.shape[0], channels, -1).mean(dim=2)
    return x @ proj if proj is not None else x


def shared_gaussian(sums: Tensor, outer: Tensor, counts: Tensor, n: int,
                     shrinkage: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Class means, the pseudo-inverse of the covariance shared by the classes, and which classes are present.

    Args:
        sums: per-class sums of the features ``[C, D]`` (float64).
        outer: the sum of ``f f^T`` over all rows ``[D, D]``.
        counts: rows per class ``[C]``; ``n`` their total.
        shrinkage: ``S + shrinkage * mean(diag S) * I`` before the pseudo-inverse.
    """
    mu = sums / counts.clamp(min=1.0)[:, None]
    cov = (outer - (mu * counts[:, None]).T @ mu) / n
    if shrinkage:
        cov = cov + shrinkage * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return mu, torch.linalg.pinv(cov, hermitian=True), counts > 0


def class_distances(f: Tensor, means: Tensor, precision: Tensor, present: Tensor) -> Tensor:
    """Mahalanobis distances ``[B, C]`` of features ``[B, D]`` to class means ``[C, D]`` (``inf`` for absent classes)."""
    fp = f @ precision
    d = (fp * f).sum(dim=1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(dim=1)[None, :]
    return d.masked_fill(~present[None, :], float("inf"))


def whitening(means: Tensor, precision: Tensor, proj: Tensor | None = None) -> dict[str, Any]:
    """What :func:`whitened_distances` needs of a fitted class Gaussian, computed once at fit or load.

    ``precision`` (symmetric, positive semi-definite: a pseudo-inverse) is ``W W^T`` with ``W = V sqrt(L)``
    over its eigenpairs ``(L, V)``; eigenvalues below ``D * eps / 2`` of the largest are the pseudo-inverse's
    zeros (the kept ones are at least ``D * eps`` of the largest) and are dropped, so ``W`` is ``[D, r]`` with
    ``r`` the covariance's rank (at most the number of rows it was estimated from). Returns ``{"whiten": W,
    "means_w": means @ W [C, r], "means_sq": ||means @ W||^2 [C], "folded": False}``.

    With the features a random projection ``x @ proj`` (``proj`` ``[K, D]``) and ``r <= D / 4``, ``"whiten"`` is
    ``proj @ W`` ``[K, r]`` (computed in float64, kept in ``proj``'s dtype) and ``"folded"`` is True: the rows
    ``x`` are then whitened in one ``[B, K] x [K, r]`` product in the HAPs' float32, at most a quarter of the
    work of the projection it replaces (the same float32 rounding class), with no float64 copy of ``x``.

    Example:
        >>> p = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
        >>> w = whitening(torch.zeros(1, 2, dtype=torch.float64), p)
        >>> w["whiten"].shape
        torch.Size([2, 1])
    """
    vals, vecs = torch.linalg.eigh(precision)
    top = vals.max().clamp(min=0) if vals.numel() else vals.new_zeros(())
    keep = vals > top * (precision.shape[0] * torch.finfo(precision.dtype).eps / 2)
    w = (vecs[:, keep] * vals[keep].sqrt()).contiguous()
    mw = means @ w
    folded = proj is not None and 4 * w.shape[1] <= proj.shape[1]
    if folded:
        assert proj is not None
        w = (proj.double() @ w).to(proj.dtype).contiguous()
    return {"whiten": w, "means_w": mw, "means_sq": mw.pow(2).sum(dim=1), "folded": folded}


def whitening_bytes(factors: Mapping[str, Mapping[str, Any]]) -> int:
    """Bytes of the tensors of :func:`whitening`'s results ``{layer: factors}`` (what a score keeps beyond its
    saved state)."""
    return sum(t.numel() * t.element_size() for w in factors.values() for t in w.values() if isinstance(t, Tensor))


def whitened_distances(f: Tensor, white: Mapping[str, Any], present: Tensor) -> Tensor:
    """:func:`class_distances` from :func:`whitening`'s factors: ``||f W||^2 - 2 (f W)(means W)^T + ||means W||^2``,
    one ``[B, D] x [D, r]`` product per call (equal to :func:`class_distances` up to float64 rounding); ``f``
    are the rows before the projection when ``white["folded"]``."""
    fw = (f.to(white["whiten"].dtype) @ white["whiten"]).double()
    d = fw.pow(2).sum(dim=1, keepdim=True) - 2.0 * fw @ white["means_w"].T + white["means_sq"][None, :]
    return d.masked_fill(~present[None, :], float("inf"))


def principal_subspace(nodes: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The mean ``[D]`` and the ``rank`` leading principal directions ``[D, r]`` of rows ``nodes`` ``[M, D]`` (float64).

    ``r = min(rank, M - 1, D)``. The eigendecomposition is of the smaller of the two Gram matrices
    (``M x M`` or ``D x D``), so a wide layer with a few thousand nodes costs one ``M x M`` problem;
    directions of (numerically) zero variance are dropped.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(50, 2, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0, 0], [0, 1, 0]]).double()
        >>> mean, u = principal_subspace(x, 5)
        >>> u.shape, bool(u[2].abs().max() < 1e-9)     # the data vary in the first two coordinates only
        (torch.Size([3, 2]), True)
    """
    x = nodes.detach().double()
    mean = x.mean(dim=0)
    c = x - mean
    m, d = c.shape
    r = max(0, min(int(rank), m - 1, d))
    if r == 0:
        return mean, c.new_zeros(d, 0)
    if m <= d:
        vals, vecs = torch.linalg.eigh(c @ c.T)
        vals, vecs = vals.flip(0)[:r], vecs.flip(1)[:, :r]
        keep = vals > vals[0].clamp(min=0) * 1e-12
        basis = (c.T @ vecs[:, keep]) / vals[keep].sqrt()
    else:
        vals, vecs = torch.linalg.eigh(c.T @ c)
        vals, vecs = vals.flip(0)[:r], vecs.flip(1)[:, :r]
        basis = vecs[:, vals > vals[0].clamp(min=0) * 1e-12]
    return mean, basis
