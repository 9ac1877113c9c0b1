"""The library-based scores: ``"library-margin"`` and ``"library-distance"`` (docs/method.md section 11)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._validate import check_int
from ..errors import SaveFormatError, ShapeMismatchError
from ..library import ExactLibrary, NodeLibrary, normalize_rows
from ..probe import ProbeResult
from ._features import (
    check_pool,
    conv_channels,
    layer_projection,
    node_classes,
    pooled,
    principal_subspace,
    shared_gaussian,
    whitened_distances,
    whitening,
    whitening_bytes,
)
from .api import FittedNetwork, FusedLayerScore

__all__ = ['LibraryMarginScore', 'LibraryDistanceScore']


class LibraryMarginScore(FusedLayerScore):
    """Graded per-layer evidence from the libraries, fused over layers on clean data (``"library-margin"``).

    Paper: Jung Hoon Lee, "Library network, a possible path to explainable neural networks", 2019,
    https://arxiv.org/abs/1909.13360 (the libraries; the scores built on them are this project's,
    docs/method.md section 11).

    For each chosen layer and input, with ``h`` the cosines to the library nodes (``h = W f_hat``) and
    ``a`` the model's answer, four features are available (higher = more suspicious):

    - ``"margin"``: ``-(mean of the k largest h among nodes of class a - mean of the k largest h among
      nodes of the other classes)``: does the layer's library side with the model's answer?
    - ``"residual"``: ``1 - v^T (G + ridge I)^{-1} v`` with ``v`` the ``span`` largest cosines and ``G``
      the Gram matrix of those nodes: the squared distance of the normalised activation from the
      linear span of its nearest nodes (novelty that a single cosine misses).
    - ``"similarity"``: ``-(mean of the k largest h among nodes of class a)``.
    - ``"distance"``: the Mahalanobis distance ``(g - mu_a)^T S^+ (g - mu_a)`` of the normalised
      activation ``g`` (averaged over positions per channel for convolution layers, randomly projected
      to ``max_dim`` dimensions when longer) to the mean ``mu_a`` of the library nodes of class ``a``,
      with ``S`` the within-class covariance of the nodes (shared by the classes, pseudo-inverse). It is
      Lee et al.'s (2018) Gaussian model built from the library alone (no training data is kept); ``inf``
      when the library holds no node of class ``a``.
    - ``"distance-margin"``: ``d_a - min_{c != a} d_c`` with ``d_c`` the ``distance`` to class ``c``'s
      node mean: negative when the layer's nearest class is the model's answer, positive by how much
      another class is nearer (the answer's standing among the classes at that layer; ``0`` when the
      library holds no node of another class).
    - ``"subspace"``: ``||(g - m) - U U^T (g - m)||^2`` with ``g`` the normalised activation as the library
      stores it (the whole activation, not averaged over positions), ``m`` the mean of the library nodes
      and ``U`` their ``rank`` leading principal directions: how far the activation lies from the
      subspace in which the library's patterns vary, whatever the answer. Unlike ``distance`` on a
      convolution layer, it keeps where in the image a feature fires (a rotated digit has the right
      strokes in the wrong places). One ``[D, rank]`` product per input at scoring.

    A node's class is the class its Hebbian readout row favours (:func:`node_classes`). Each feature is
    turned into a conformal p-value on clean reference data and all are fused with Fisher's method.
    Fitting needs only the fitted library network; everything fitted is recomputed from the library when
    a saved detector is loaded.

    Args:
        layers: layers to use (default: every probed layer).
        k: nodes per class side in ``margin`` and ``similarity``.
        span: nearest nodes whose span reconstructs the activation in ``residual``.
        features: any of ``"margin"``, ``"residual"``, ``"similarity"``, ``"distance"``,
            ``"distance-margin"``, ``"subspace"``; kept, checked, as :attr:`layer_features`.
        ridge: added to the diagonal of the Gram matrix (nodes may be nearly collinear).
        max_gram_nodes: libraries up to this size keep their full Gram matrix (``M^2`` floats); larger
            ones compute the Gram matrix of each input's nearest nodes on the fly.
        pool: for ``distance`` (and ``distance-margin``): ``"auto"`` (average over positions the layers whose torch module has
            ``out_channels``, when the library stores the whole activation), ``None`` (never) or
            ``{layer: n_channels}``.
        max_dim: for ``distance``: longer (unpooled) vectors are reduced by a fixed Gaussian random
            projection to this many dimensions.
        seed: seed of those random projections.
        rank: for ``subspace``: principal directions of the library nodes kept (fewer when the library
            has fewer nodes).

    Example:
        >>> s = LibraryMarginScore(k=3, span=100)
        >>> s.layer_features
        ('margin', 'residual')
        >>> LibraryMarginScore(features=("margin", "distance")).layer_features
        ('margin', 'distance')
    """

    name: ClassVar[str] = "library-margin"
    uses_library: ClassVar[bool] = True
    FEATURES: ClassVar[tuple[str, ...]] = ("margin", "residual", "similarity", "distance", "distance-margin",
                                           "subspace")
    #: the features computed from the library nodes' class Gaussian
    GAUSSIAN_FEATURES: ClassVar[tuple[str, ...]] = ("distance", "distance-margin")
    #: the features computed from statistics of the library nodes (no look-up of the nodes at scoring)
    STATISTIC_FEATURES: ClassVar[tuple[str, ...]] = (*GAUSSIAN_FEATURES, "subspace")
    DEFAULT_FEATURES: ClassVar[tuple[str, ...]] = ("margin", "residual")

    def __init__(self, layers: Sequence[str] | None = None, k: int = 3, span: int = 100,
                 features: Sequence[str] | None = None, ridge: float = 1e-3, max_gram_nodes: int = 8192,
                 pool: Any = "auto", max_dim: int = 1024, seed: int = 0, rank: int = 50):
        super().__init__(layers)
        self.k = check_int(k, "k")
        self.span = check_int(span, "span")
        if features is None:
            features = self.DEFAULT_FEATURES
        feats = (features,) if isinstance(features, str) else tuple(features)
        bad = [f for f in feats if f not in self.FEATURES]
        if bad or not feats or len(set(feats)) != len(feats):
            raise ValueError(f"features must be distinct names among {self.FEATURES}, got {features!r}")
        self.layer_features = feats
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a non-negative number, got {ridge!r}")
        self.ridge = float(ridge)
        self.max_gram_nodes = check_int(max_gram_nodes, "max_gram_nodes")
        self.pool = check_pool(pool)
        self.max_dim = check_int(max_dim, "max_dim")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.rank = check_int(rank, "rank")
        self._classes: dict[str, Tensor] = {}
        self._grams: dict[str, Tensor | None] = {}
        self._gauss: dict[str, dict[str, Any]] = {}
        self._white: dict[str, dict[str, Any]] = {}  # per layer: whitening(...) of _gauss, rebuilt by _prepare
        self._subspaces: dict[str, tuple[Tensor, Tensor]] = {}
        # per layer, the channels averaged at fit, as a saved file holds them: a loaded detector keeps them even
        # where its network cannot tell them (an ONNX Runtime model has no torch module to read out_channels from)
        self._saved_channels: dict[str, int] | None = None

    @property
    def features_(self) -> tuple[str, ...]:
        """Deprecated (``FutureWarning``): the checked ``features`` setting, :attr:`layer_features`.

        Returns:
            ``layer_features``, the per-layer features in order.
        """
        warnings.warn(f"{type(self).__name__}.features_ is deprecated: use layer_features", FutureWarning, stacklevel=2)
        return self.layer_features

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers}, k={self.k}, span={self.span}, "
                f"features={self.layer_features})")

    def _prepare(self, net: FittedNetwork) -> None:
        self._classes, self._grams, self._gauss, self._white, self._subspaces = {}, {}, {}, {}, {}
        for i, l in enumerate(self.fitted_layers()):
            lib = net.libraries_[l]
            needs_nodes = [f for f in ("residual", *self.STATISTIC_FEATURES) if f in self.layer_features]
            if needs_nodes and not isinstance(lib, NodeLibrary):
                raise TypeError(f"the {needs_nodes} feature(s) need a library exposing its nodes (.nodes); the "
                                f"library of layer {l!r} is a {type(lib).__name__}; use features=('margin',)")
            self._classes[l] = node_classes(net, l)
            if "residual" in self.layer_features and lib.size <= self.max_gram_nodes:
                nodes = lib.nodes.to(torch.float64)  # float64: see _residual
                self._grams[l] = nodes @ nodes.T
            else:
                self._grams[l] = None
            if any(f in self.layer_features for f in self.GAUSSIAN_FEATURES):
                self._gauss[l] = self._node_gaussian(net, l, i, lib.nodes, self._classes[l])
                st = self._gauss[l]
                self._white[l] = whitening(st["means"], st["precision"], st["proj"])
            if "subspace" in self.layer_features:
                self._subspaces[l] = principal_subspace(lib.nodes, self.rank)

    def _node_gaussian(self, net: FittedNetwork, layer: str, index: int, nodes: Tensor,
                       classes: Tensor) -> dict[str, Any]:
        """Class means, shared within-class precision and the feature map of ``distance`` for one layer."""
        width = nodes.shape[1]
        lib = net.libraries_[layer]
        raw_width = lib.dim if isinstance(lib, NodeLibrary) else None
        # channel averages only make sense when the library stores the whole activation (not a sketch)
        pool = self.pool if self._saved_channels is None else self._saved_channels
        channels = conv_channels(net, layer, width, pool) if raw_width in (None, width) else 0
        proj = None
        if not channels and width > self.max_dim:
            proj = layer_projection(self.seed, index, width, self.max_dim, nodes.device)
        g = pooled(nodes, channels, proj).double()
        onehot = torch.nn.functional.one_hot(classes.to(g.device), net.n_classes_).double()
        means, precision, present = shared_gaussian(onehot.T @ g, g.T @ g, onehot.sum(dim=0), g.shape[0])
        return {"channels": channels, "proj": proj, "means": means, "present": present, "precision": precision}

    def _class_distances(self, lib: Any, layer: str, hap: Tensor, stored: Tensor | None = None) -> Tensor:
        """``distance`` to every class's node mean ``[B, C]`` (``inf`` for classes without nodes); ``stored``
        is ``lib.transform(hap)`` when the caller has it already."""
        st, white = self._gauss[layer], self._white[layer]
        x = lib.transform(hap) if stored is None else stored
        # folded: the projection is part of the whitening factor (whitening), one float32 product
        g = x if white["folded"] else pooled(x, st["channels"], st["proj"]).double()
        return whitened_distances(g, self._white[layer], st["present"])

    def _subspace_residual(self, lib: Any, layer: str, hap: Tensor, stored: Tensor | None = None) -> Tensor:
        """``subspace``: the squared distance of the normalised activation from the nodes' principal subspace
        (``stored`` as in :meth:`_class_distances`)."""
        mean, basis = self._subspaces[layer]
        c = (lib.transform(hap) if stored is None else stored).double() - mean
        return (c - (c @ basis) @ basis.T).pow(2).sum(dim=1)

    @staticmethod
    def _distance_margin(d: Tensor, answers: Tensor) -> Tensor:
        """``d_a - min_{c != a} d_c`` per row of class distances ``d`` ``[B, C]`` (0 without another class)."""
        own = d.gather(1, answers[:, None])[:, 0]
        other = d.scatter(1, answers[:, None], float("inf")).amin(dim=1)
        return torch.where(other.isfinite(), own - other, torch.zeros_like(own))

    # the fitted statistics and the per-feature computations, public for inspection and tests
    @property
    def gaussians_(self) -> dict[str, dict[str, Any]]:
        """Per layer with a ``distance`` feature: the library nodes' class Gaussian.

        Returns:
            ``{layer: {"means": [C, D], "precision": [D, D], "present": [C], "channels": n (0: not pooled),
            "proj": [W, D] or None}}``.
        """
        self.check_is_fitted()
        return self._gauss

    @property
    def subspaces_(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer with the ``subspace`` feature: the nodes' principal subspace.

        Returns:
            ``{layer: (mean [D], basis [D, r])}``, ``r`` at most ``rank``.
        """
        self.check_is_fitted()
        return self._subspaces

    def class_distances(self, lib: Any, layer: str, hap: Tensor) -> Tensor:
        """The ``distance`` of each activation to every class's node mean.

        Args:
            lib: the layer's library (``net.libraries_[layer]``).
            layer: the layer's name.
            hap: its activations ``[B, ...]``.

        Returns:
            ``[B, C]`` (float64; ``inf`` for classes without nodes).
        """
        self.check_is_fitted()
        return self._class_distances(lib, layer, hap)

    def subspace_residual(self, lib: Any, layer: str, hap: Tensor) -> Tensor:
        """The ``subspace`` feature: how far each normalised activation lies from the nodes' principal subspace.

        Args:
            lib: the layer's library (``net.libraries_[layer]``).
            layer: the layer's name.
            hap: its activations ``[B, ...]``.

        Returns:
            the squared distances ``[B]``.
        """
        self.check_is_fitted()
        return self._subspace_residual(lib, layer, hap)

    @staticmethod
    def distance_margin(d: Tensor, answers: Tensor) -> Tensor:
        """The ``distance-margin`` feature: ``d_a - min_{c != a} d_c`` per row.

        Args:
            d: class distances ``[B, C]`` (:meth:`class_distances`).
            answers: the model's answers ``[B]``.

        Returns:
            ``[B]``; 0 where no other class has nodes.

        Example:
            >>> import torch
            >>> LibraryMarginScore.distance_margin(torch.tensor([[1.0, 3.0, 2.0]]), torch.tensor([0]))
            tensor([-1.])
        """
        return LibraryMarginScore._distance_margin(d, answers)

    def _fit(self, net: FittedNetwork, data: Any) -> None:
        self._saved_channels = None
        self._prepare(net)

    def feature_names(self) -> list[str]:
        self.check_is_fitted()
        return [f"{l}/{f}" for l in self.fitted_layers() for f in self.layer_features]

    def _residual(self, lib: Any, gram: Tensor | None, h: Tensor, hap: Tensor) -> Tensor:
        """``residual`` ``[B]`` (float64) from the cosines ``h`` and the raw activations ``hap``.

        The ``span`` nodes are chosen on ``h``; the normalised activation, the cosines to those nodes, their
        Gram matrix and the solve are then computed in float64 from the float32 nodes and activation. The
        residual of an input that its nearest nodes span is of the order of ``ridge`` (1e-4), where float32
        rounding (of the normalisation, about 1e-7 per unit, and of the solve, about ``cond * 6e-8`` with
        ``cond`` up to ``span / ridge``) would decide it, and the conformal rank would turn that noise into
        jumps between an input scored alone and in a batch. In float64 the residual follows the activation
        smoothly: the float32 rounding of the model's own forward pass moves it by about 1e-9.
        """
        n = min(self.span, h.shape[1])
        idx = h.topk(n, dim=1).indices
        nodes = lib.nodes
        # the library's own map into its space (exact for the exact and sparse libraries), normalised in float64
        f = normalize_rows((lib.embed(hap) if isinstance(lib, ExactLibrary) else lib.transform(hap)).double())
        g = gram[idx[:, :, None], idx[:, None, :]] if gram is not None else torch.empty(
            h.shape[0], n, n, device=h.device, dtype=torch.float64)
        if gram is not None and nodes.shape[0] <= 20 * n:
            # one float64 product with every node (B x D x M multiply-adds): measured 3-17x faster than gathering
            # B x span x D float64 copies of the nodes while M is at most about 20 x span
            v = (f @ nodes.to(torch.float64).T).gather(1, idx)
        else:
            v = torch.empty(h.shape[0], n, device=h.device, dtype=torch.float64)
            step = max(1, 2**24 // max(1, n * nodes.shape[1]))
            for i in range(0, h.shape[0], step):
                a = nodes[idx[i:i + step]].to(torch.float64)
                v[i:i + step] = (a @ f[i:i + step, :, None])[:, :, 0]
                if gram is None:
                    g[i:i + step] = a @ a.transpose(1, 2)
        g = g + self.ridge * torch.eye(n, device=h.device, dtype=torch.float64)
        # Cholesky, not torch.linalg.solve: the batched LU solve of torch 2.13's CPU build fails (MKL SLASWP
        # error, then hangs) for some sizes, e.g. 150 x 150 with 8 or more matrices; batched Cholesky does not.
        chol, info = torch.linalg.cholesky_ex(g)
        bad = info != 0
        if bool(bad.any()):  # nearly collinear nodes with ridge 0: add a small jitter to those rows only
            jitter = 1e-12 * g[bad].diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-300)
            identity = torch.eye(n, device=h.device, dtype=torch.float64)
            chol[bad] = torch.linalg.cholesky(g[bad] + jitter[:, None, None] * identity)
        q = (v[:, None, :] @ torch.cholesky_solve(v[:, :, None], chol))[:, 0, 0]
        return (1.0 - q).clamp(min=0.0)

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        answers = result.answers.to(net.device)
        cols = []
        needs_h = any(f not in self.STATISTIC_FEATURES for f in self.layer_features)
        for l in self.fitted_layers():
            lib = net.libraries_[l]
            cls = self._classes[l]
            if cls.shape[0] != lib.size:
                raise ShapeMismatchError(f"layer {l!r}: the library has {lib.size} nodes, the detector was fitted "
                                         f"with {cls.shape[0]}; refit the detector after refitting the network")
            if needs_h:
                h = lib.similarity(result.haps[l])
                same = cls[None, :] == answers[:, None]
                kk = min(self.k, h.shape[1])
                s_same = h.masked_fill(~same, -1.0).topk(kk, dim=1).values.mean(dim=1)
            # the normalised activation as the library stores it, once for the node-statistics features
            stored = (lib.transform(result.haps[l]) if any(f in self.layer_features for f in self.STATISTIC_FEATURES)
                      else None)
            d = (self._class_distances(lib, l, result.haps[l], stored)
                 if any(f in self.layer_features for f in self.GAUSSIAN_FEATURES) else None)
            for f in self.layer_features:
                if f == "margin":
                    s_other = h.masked_fill(same, -1.0).topk(kk, dim=1).values.mean(dim=1)
                    cols.append((s_other - s_same).double())
                elif f == "similarity":
                    cols.append((-s_same).double())
                elif f == "residual":
                    cols.append(self._residual(lib, self._grams[l], h, result.haps[l]))
                elif f == "subspace":
                    cols.append(self._subspace_residual(lib, l, result.haps[l], stored))
                elif f == "distance":
                    assert d is not None
                    cols.append(d.gather(1, answers[:, None])[:, 0])
                else:
                    assert d is not None
                    cols.append(self._distance_margin(d, answers))
        return torch.stack(cols, dim=1)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "span": self.span, "features": list(self.layer_features),
                "ridge": self.ridge, "max_gram_nodes": self.max_gram_nodes, "pool": self.pool,
                "max_dim": self.max_dim, "seed": self.seed, "rank": self.rank,
                "channels_": {l: int(st["channels"]) for l, st in self._gauss.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` and :meth:`config` saved, onto ``net``'s device.

        The channels each layer's ``distance`` averaged at fit come from the file (files written before they
        were saved: from the network's modules, as at fit).

        Args:
            state: the saved :meth:`state_dict`.
            net: the fitted library network the detector is loaded with.
            config: the saved :meth:`config`.

        Raises:
            SaveFormatError: the saved channels are not ``{layer: count}``.
        """
        saved = config.get("channels_")
        try:
            self._saved_channels = None if saved is None else {
                str(k): check_int(v, "channels_", minimum=0) for k, v in dict(saved).items()}
        except (TypeError, ValueError) as exc:
            raise SaveFormatError(f"the saved channels_ of the {self.name!r} detector are {saved!r}, expected "
                                  "{layer: number of channels} (modified or corrupted)") from exc
        super().load_state_dict(state, net, config)

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        self._prepare(net)

    def memory_bytes(self) -> int:
        """Bytes kept beyond the library network.

        Returns:
            the bytes of the clean reference, the Gram matrices, the ``distance`` statistics and the
            whitening factors built from them (:func:`~libnet_plugin.detectors._features.whitening`).
        """
        kept = [g for g in self._grams.values() if g is not None]
        kept += [t for st in self._gauss.values() for t in st.values() if isinstance(t, Tensor)]
        kept += [t for pair in self._subspaces.values() for t in pair]
        return super().memory_bytes() + sum(t.numel() * t.element_size() for t in kept) + whitening_bytes(self._white)


class LibraryDistanceScore(LibraryMarginScore):
    """Mahalanobis distance to the answer class's library nodes, fused over layers (``"library-distance"``).

    Paper: Jung Hoon Lee, "Library network, a possible path to explainable neural networks", 2019,
    https://arxiv.org/abs/1909.13360 (the libraries; the score built on them is this project's,
    docs/method.md section 11).

    :class:`LibraryMarginScore` with ``features=("distance",)`` by default: per layer, the distance of
    the normalised activation (channel averages for convolution layers) to the mean of the library nodes
    of the model's answer class, under the within-class covariance of the nodes; conformal p-values on
    clean data, fused over layers with Fisher's method. Unlike the ``"mahalanobis"`` baseline it keeps no
    training data: its class statistics come from the library nodes and the readouts' node classes
    (a few kilobytes beyond the library). Every other feature of ``"library-margin"`` can be added with
    ``features=``.

    On the MNIST default of ``libnet evaluate-detectors`` the convolution layers carry the evidence: the
    run lists ``"library-distance (conv1, conv2)"`` next to the all-layer default.

    Args:
        See :class:`LibraryMarginScore`; only the default ``features`` differs.

    Example:
        >>> import libnet_plugin as lnp
        >>> from libnet_plugin.plugins import make_detector
        >>> make_detector("library-distance", {"layers": ["conv1", "conv2"]})
        LibraryDistanceScore(layers=['conv1', 'conv2'], k=3, span=100, features=('distance',))
    """

    name: ClassVar[str] = "library-distance"
    DEFAULT_FEATURES: ClassVar[tuple[str, ...]] = ("distance",)
