"""Detector plugins for the ``libnet_consistency_detector`` hook: baselines and library-based scores.

Every detector here is served through the same hook as the paper's CPL (served by
:mod:`libnet_plugin.builtins`), and :class:`~libnet_plugin.ConsistencyDetector` builds any of them by
name. None of them sees an attacked input: they are fitted on training data (or on the fitted library
network alone) and calibrated on clean data only.

=======================  ==========================================================================  ========
name                     score (higher = more suspicious)                                            needs
=======================  ==========================================================================  ========
``"library-margin"``     per layer: margin between the library nodes of the model's answer class     net only
                         and the nodes of the other classes, and the residual of the activation
                         after reconstruction from its nearest nodes; conformal p-values on clean
                         data, fused over layers with Fisher's method
``"library-distance"``   per layer: Mahalanobis distance of the normalised activation (channel       net only
                         means for convolution layers) to the mean of the library nodes of the
                         model's answer class, within-class covariance of the nodes; conformal
                         p-values fused over layers with Fisher's method (``"library-margin"`` with
                         ``features=("distance",)``)
``"msp"``                ``1 - max softmax(output)`` (Hendrycks & Gimpel, 2017)                      nothing
``"mahalanobis"``        per layer: the smallest Mahalanobis distance to a class mean (classes by    train
                         the model's answers, one shared covariance; conv layers averaged over
                         positions as in Lee et al., 2018); conformal p-values fused over layers
                         (no logistic regression on attacks)
``"knn"``                deep k-NN (Papernot & McDaniel, 2018): number of the ``k`` nearest          train
                         training activations, summed over layers, whose label differs from the
                         model's answer
=======================  ==========================================================================  ========

Scores that combine several per-layer features (:class:`FusedLayerScore`) turn each feature into a
conformal p-value against clean reference data given at calibration
(:meth:`FusedLayerScore.set_reference`) and fuse them with Fisher's method, ``-sum log p``.

Third-party detectors plug in the same way: a plugin with a ``libnet_consistency_detector`` hookimpl
that returns an object with ``fit(net, data)`` and ``score(net, probe_result)``. A plugin may also list
the detectors it wants in the comparison of ``libnet evaluate-detectors`` in a module or class attribute
``LIBNET_DETECTORS = {label: (name, settings)}`` (see :func:`registered_detectors`).

Example:
    >>> import libnet_plugin as lnp
    >>> from libnet_plugin.plugins import make_detector
    >>> make_detector("knn", {"k": 5})
    DeepKNNScore(k=5, layers=None, labels='auto')
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import pluggy
import torch
from torch import Tensor

from ._batches import iter_batches
from ._validate import check_int
from .errors import LayerNotFoundError, NotFittedError, SaveFormatError, ShapeMismatchError
from .hookspecs import hookimpl
from .library import normalize_rows
from .metrics import stable_softmax
from .probe import ProbeResult

if TYPE_CHECKING:  # pragma: no cover
    from .network import LibraryNetwork

__all__ = [
    "LIBNET_DETECTORS", "ConformalFusion", "FusedLayerScore", "LibraryMarginScore", "LibraryDistanceScore",
    "MaxSoftmaxScore",
    "MahalanobisScore", "DeepKNNScore", "libnet_consistency_detector", "registered_detectors",
    "node_classes",
]

#: The detectors this module asks ``libnet evaluate-detectors`` to compare: ``{label: (name, settings)}``.
#: The paper's CPL is served by :mod:`libnet_plugin.builtins`; it is listed here so that the comparison
#: always holds the reproduction next to the baselines and the library-based scores.
LIBNET_DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {
    "cpl (paper, top_k 20)": ("cpl", {"top_k": 20}),
    "cpl (top_k 3)": ("cpl", {"top_k": 3}),
    "library-margin": ("library-margin", {}),
    "library-distance": ("library-distance", {}),
    "msp": ("msp", {}),
    "mahalanobis": ("mahalanobis", {}),
    "knn": ("knn", {}),
}


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _check_layers(net: "LibraryNetwork", layers: Sequence[str] | None, what: str) -> list[str]:
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


def _layer_state(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _require(state: Mapping[str, Tensor], key: str, what: str) -> Tensor:
    if key not in state:
        raise SaveFormatError(f"the saved {what} detector lacks the tensor {key!r}")
    return state[key]


def node_classes(net: "LibraryNetwork", layer: str, chunk: int = 1024) -> Tensor:
    """The class the Hebbian readout links to each library node of ``layer``: ``LongTensor[M]``.

    It is the argmax over classes of the node's readout row ``W[n, :]`` (Eq. 2): the class of the model's
    answers for the training inputs nearest to the node (usually the answer for the node's own input).
    Readouts without a ``weight`` attribute are asked through their ``scores`` method with one-hot
    library outputs, so any readout plugin works.
    """
    readout = net.readouts_[layer]
    weight = getattr(readout, "weight", None)
    if isinstance(weight, Tensor):
        return weight.argmax(dim=1).to(net.device)
    m = net.libraries_[layer].size
    parts = []
    for i in range(0, m, chunk):
        eye = torch.zeros(min(chunk, m - i), m, device=net.device)
        eye[torch.arange(eye.shape[0]), torch.arange(i, i + eye.shape[0])] = 1.0
        parts.append(readout.scores(eye, 1).argmax(dim=1))
    return torch.cat(parts).to(net.device) if parts else torch.empty(0, dtype=torch.long, device=net.device)


def _check_pool(pool: Any) -> Any:
    if not (pool is None or pool == "auto" or isinstance(pool, Mapping)):
        raise ValueError(f"pool must be 'auto', None or {{layer: n_channels}}, got {pool!r}")
    return dict(pool) if isinstance(pool, Mapping) else pool


def _conv_channels(net: "LibraryNetwork", layer: str, dim: int, pool: Any) -> int:
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
        module = getattr(net.probe, "modules", {}).get(layer)
        c = int(getattr(module, "out_channels", 0) or 0)
    if c and dim % c:
        raise ShapeMismatchError(f"layer {layer!r}: cannot average {dim} features over {c} channels")
    return c if c and dim > c else 0


def _layer_projection(seed: int, index: int, dim: int, max_dim: int, device: Any) -> Tensor:
    """The fixed Gaussian random projection ``[dim, max_dim]`` (scaled by ``1 / sqrt(max_dim)``) of the
    ``index``-th chosen layer: each layer draws from its own seed derived from ``seed``."""
    g = torch.Generator().manual_seed(seed + 7919 * (index + 1))
    return (torch.randn(dim, max_dim, generator=g) / math.sqrt(max_dim)).to(device)


def _pooled(x: Tensor, channels: int, proj: Tensor | None) -> Tensor:
    """Features of rows ``x`` ``[B, D]``: channel means when ``channels``, else ``x @ proj`` (or ``x``)."""
    if channels:
        return x.reshape(x.shape[0], channels, -1).mean(dim=2)
    return x @ proj if proj is not None else x


def _shared_gaussian(sums: Tensor, outer: Tensor, counts: Tensor, n: int,
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


def _class_distances(f: Tensor, means: Tensor, precision: Tensor, present: Tensor) -> Tensor:
    """Mahalanobis distances ``[B, C]`` of features ``[B, D]`` to class means ``[C, D]`` (``inf`` for absent classes)."""
    fp = f @ precision
    d = (fp * f).sum(dim=1, keepdim=True) - 2.0 * fp @ means.T + ((means @ precision) * means).sum(dim=1)[None, :]
    return d.masked_fill(~present[None, :], float("inf"))


# --------------------------------------------------------------------------------------------------
# conformal p-values and Fisher fusion
# --------------------------------------------------------------------------------------------------


class ConformalFusion:
    """Conformal p-values per feature from clean reference scores, fused with Fisher's method.

    For feature ``j`` with clean reference scores ``r_1..r_n``, the p-value of a new score ``s`` is
    ``(1 + #{i: r_i >= s}) / (n + 1)``; the fused score is ``-sum_j log p_j`` (higher = more
    suspicious). :meth:`fit` returns the fused scores of the reference inputs themselves computed
    leave-one-out (each against the other ``n - 1``), so that a threshold chosen on them applies to new
    inputs.

    Example:
        >>> f = ConformalFusion()
        >>> ref = torch.tensor([[0.], [1.], [2.], [3.]])
        >>> f.fit(ref).tolist()  # leave-one-out: p = 1, 3/4, 2/4, 1/4
        [-0.0, 0.2876820724517809, 0.6931471805599453, 1.3862943611198906]
        >>> f.p_values(torch.tensor([[2.5], [9.]])).tolist()
        [[0.4], [0.2]]
    """

    def __init__(self) -> None:
        self._sorted: Tensor | None = None

    @property
    def is_fitted(self) -> bool:
        return self._sorted is not None

    @property
    def n_reference(self) -> int:
        return 0 if self._sorted is None else int(self._sorted.shape[0])

    def fit(self, reference: Tensor) -> Tensor:
        """Store the clean reference scores ``[N, F]``; return their leave-one-out fused scores ``[N]``."""
        if reference.dim() != 2 or reference.shape[0] < 2:
            raise ValueError(f"the reference scores must be [N, F] with N >= 2, got {tuple(reference.shape)}")
        ref = reference.detach().double()
        self._sorted = ref.sort(dim=0).values
        ge = self._count_ge(ref)  # each reference row counts itself once
        p = ge / ref.shape[0]  # (1 + (ge - 1)) / ((n - 1) + 1)
        return -torch.log(p).sum(dim=1)

    def _count_ge(self, scores: Tensor) -> Tensor:
        srt = self._sorted
        n = srt.shape[0]
        cols = [n - torch.searchsorted(srt[:, j].contiguous(), scores[:, j].contiguous(), right=False)
                for j in range(srt.shape[1])]
        return torch.stack(cols, dim=1).double()

    def p_values(self, scores: Tensor) -> Tensor:
        """Conformal p-values ``[B, F]`` of new per-feature scores ``[B, F]``."""
        if self._sorted is None:
            raise NotFittedError("no clean reference scores yet; calibrate the detector on clean data first")
        if scores.dim() != 2 or scores.shape[1] != self._sorted.shape[1]:
            raise ShapeMismatchError(f"expected per-feature scores of shape [B, {self._sorted.shape[1]}], "
                                     f"got {tuple(scores.shape)}")
        s = scores.detach().to(self._sorted.device).double()
        return (1.0 + self._count_ge(s)) / (self._sorted.shape[0] + 1.0)

    def __call__(self, scores: Tensor) -> Tensor:
        """Fisher-fused score ``-sum log p`` ``[B]`` (float64)."""
        return -torch.log(self.p_values(scores)).sum(dim=1)

    def state_dict(self) -> dict[str, Tensor]:
        return {} if self._sorted is None else {"reference": self._sorted.contiguous()}

    def load_state_dict(self, state: Mapping[str, Tensor], device: Any = None) -> None:
        ref = state.get("reference")
        self._sorted = None if ref is None else ref.double().to(device if device is not None else ref.device)


# --------------------------------------------------------------------------------------------------
# base class of per-layer scores fused on clean data
# --------------------------------------------------------------------------------------------------


class FusedLayerScore:
    """Base of detectors that compute several features per layer and fuse their conformal p-values.

    Subclasses implement :meth:`_fit` (optional), :meth:`feature_names` and :meth:`features`. The
    :class:`~libnet_plugin.ConsistencyDetector` calls :meth:`fit` with the fitted library network (and the
    training data when :attr:`requires_training_data`), then :meth:`set_reference` with the features of
    clean calibration inputs, then :meth:`score` for new inputs.
    """

    name = "fused"
    #: True when :meth:`fit` needs the training data (not only the fitted library network).
    requires_training_data = False

    def __init__(self, layers: Sequence[str] | None = None):
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        self.fusion = ConformalFusion()
        self.layers_: list[str] | None = None

    # -- to implement ---------------------------------------------------------------------------
    def _fit(self, net: "LibraryNetwork", data: Any) -> None:
        """Learn what the features need (class means, node classes...)."""

    def feature_names(self) -> list[str]:
        """Names of the per-layer features, ``"<layer>/<feature>"``, in the order of :meth:`features`."""
        raise NotImplementedError

    def features(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        """Per-feature scores ``[B, F]`` from one probe run (higher = more suspicious)."""
        raise NotImplementedError

    # -- the detector protocol ------------------------------------------------------------------
    def fit(self, net: "LibraryNetwork", data: Iterable[Any] | None = None) -> "FusedLayerScore":
        """Prepare from the fitted network (and the training data when needed); forget any reference."""
        net._check_fitted()
        if self.requires_training_data and data is None:
            raise ValueError(f"the {self.name!r} detector is fitted on the training data: pass train= to "
                             "ConsistencyDetector or call det.fit(train) before calibrate")
        self.layers_ = _check_layers(net, self.layers, self.name)
        self.fusion = ConformalFusion()
        self._fit(net, data)
        return self

    def _check_ready(self) -> None:
        if self.layers_ is None:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net) first")

    def set_reference(self, features: Tensor) -> Tensor:
        """Store the features ``[N, F]`` of clean reference inputs; return their fused scores (leave-one-out)."""
        self._check_ready()
        return self.fusion.fit(features)

    def score(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        """Fused score ``[B]`` (float32, higher = more suspicious); needs :meth:`set_reference` first."""
        self._check_ready()
        return self.fusion(self.features(net, result)).float()

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"name": self.name, "layers": self.layers, "layers_": self.layers_}

    def _state(self) -> dict[str, Tensor]:
        return {}

    def _load_state(self, state: Mapping[str, Tensor], net: "LibraryNetwork") -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to save (fitted statistics and the clean reference)."""
        out = {f"fusion/{k}": v for k, v in self.fusion.state_dict().items()}
        out.update(self._state())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: "LibraryNetwork", config: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` and :meth:`config` saved, onto ``net``'s device."""
        self.layers_ = _check_layers(net, config.get("layers_"), self.name)
        self.fusion = ConformalFusion()
        self.fusion.load_state_dict(_layer_state("fusion/", state), device=net.device)
        self._load_state(state, net)

    def memory_bytes(self) -> int:
        """Bytes of the tensors this detector keeps beyond the library network."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


# --------------------------------------------------------------------------------------------------
# the library-based score
# --------------------------------------------------------------------------------------------------


class LibraryMarginScore(FusedLayerScore):
    """Graded per-layer evidence from the libraries, fused over layers on clean data (``"library-margin"``).

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

    A node's class is the class its Hebbian readout row favours (:func:`node_classes`). Each feature is
    turned into a conformal p-value on clean reference data and all are fused with Fisher's method.
    Fitting needs only the fitted library network; everything fitted is recomputed from the library when
    a saved detector is loaded.

    Args:
        layers: layers to use (default: every probed layer).
        k: nodes per class side in ``margin`` and ``similarity``.
        span: nearest nodes whose span reconstructs the activation in ``residual``.
        features: any of ``"margin"``, ``"residual"``, ``"similarity"``, ``"distance"``.
        ridge: added to the diagonal of the Gram matrix (nodes may be nearly collinear).
        max_gram_nodes: libraries up to this size keep their full Gram matrix (``M^2`` floats); larger
            ones compute the Gram matrix of each input's nearest nodes on the fly.
        pool: for ``distance``: ``"auto"`` (average over positions the layers whose torch module has
            ``out_channels``, when the library stores the whole activation), ``None`` (never) or
            ``{layer: n_channels}``.
        max_dim: for ``distance``: longer (unpooled) vectors are reduced by a fixed Gaussian random
            projection to this many dimensions.
        seed: seed of those random projections.

    Example:
        >>> s = LibraryMarginScore(k=3, span=100)
        >>> s.features_
        ('margin', 'residual')
        >>> LibraryMarginScore(features=("margin", "distance")).features_
        ('margin', 'distance')
    """

    name = "library-margin"
    #: the score is computed from the libraries (``libnet evaluate-detectors`` counts their memory)
    uses_library = True
    FEATURES = ("margin", "residual", "similarity", "distance")
    DEFAULT_FEATURES: tuple[str, ...] = ("margin", "residual")

    def __init__(self, layers: Sequence[str] | None = None, k: int = 3, span: int = 100,
                 features: Sequence[str] | None = None, ridge: float = 1e-3, max_gram_nodes: int = 8192,
                 pool: Any = "auto", max_dim: int = 1024, seed: int = 0, **_: Any):
        super().__init__(layers)
        self.k = check_int(k, "k")
        self.span = check_int(span, "span")
        if features is None:
            features = self.DEFAULT_FEATURES
        feats = (features,) if isinstance(features, str) else tuple(features)
        bad = [f for f in feats if f not in self.FEATURES]
        if bad or not feats or len(set(feats)) != len(feats):
            raise ValueError(f"features must be distinct names among {self.FEATURES}, got {features!r}")
        self.features_ = feats
        if not (isinstance(ridge, (int, float)) and math.isfinite(ridge) and ridge >= 0):
            raise ValueError(f"ridge must be a non-negative number, got {ridge!r}")
        self.ridge = float(ridge)
        self.max_gram_nodes = check_int(max_gram_nodes, "max_gram_nodes")
        self.pool = _check_pool(pool)
        self.max_dim = check_int(max_dim, "max_dim")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self._classes: dict[str, Tensor] = {}
        self._grams: dict[str, Tensor | None] = {}
        self._gauss: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers}, k={self.k}, span={self.span}, "
                f"features={self.features_})")

    def _prepare(self, net: "LibraryNetwork") -> None:
        self._classes, self._grams, self._gauss = {}, {}, {}
        for i, l in enumerate(self.layers_):
            lib = net.libraries_[l]
            needs_nodes = [f for f in ("residual", "distance") if f in self.features_]
            if needs_nodes and not isinstance(getattr(lib, "nodes", None), Tensor):
                raise TypeError(f"the {needs_nodes} feature(s) need a library exposing its nodes (.nodes); the "
                                f"library of layer {l!r} is a {type(lib).__name__}; use features=('margin',)")
            self._classes[l] = node_classes(net, l)
            if "residual" in self.features_ and lib.size <= self.max_gram_nodes:
                self._grams[l] = lib.nodes @ lib.nodes.T
            else:
                self._grams[l] = None
            if "distance" in self.features_:
                if not callable(getattr(lib, "transform", None)):
                    raise TypeError(f"the 'distance' feature needs a library with transform(haps) (the map to its "
                                    f"node space); the library of layer {l!r} is a {type(lib).__name__}")
                self._gauss[l] = self._node_gaussian(net, l, i, lib.nodes, self._classes[l])

    def _node_gaussian(self, net: "LibraryNetwork", layer: str, index: int, nodes: Tensor,
                       classes: Tensor) -> dict[str, Any]:
        """Class means, shared within-class precision and the feature map of ``distance`` for one layer."""
        width = nodes.shape[1]
        raw_width = getattr(net.libraries_[layer], "dim", None)
        # channel averages only make sense when the library stores the whole activation (not a sketch)
        channels = _conv_channels(net, layer, width, self.pool) if raw_width in (None, width) else 0
        proj = None
        if not channels and width > self.max_dim:
            proj = _layer_projection(self.seed, index, width, self.max_dim, nodes.device)
        g = _pooled(nodes, channels, proj).double()
        onehot = torch.nn.functional.one_hot(classes.to(g.device), net.n_classes_).double()
        means, precision, present = _shared_gaussian(onehot.T @ g, g.T @ g, onehot.sum(dim=0), g.shape[0])
        return {"channels": channels, "proj": proj, "means": means, "present": present, "precision": precision}

    def _distance(self, lib: Any, layer: str, hap: Tensor, answers: Tensor) -> Tensor:
        st = self._gauss[layer]
        g = _pooled(lib.transform(hap), st["channels"], st["proj"]).double()
        d = _class_distances(g, st["means"], st["precision"], st["present"])
        return d.gather(1, answers[:, None])[:, 0]

    def _fit(self, net: "LibraryNetwork", data: Any) -> None:
        self._prepare(net)

    def feature_names(self) -> list[str]:
        self._check_ready()
        return [f"{l}/{f}" for l in self.layers_ for f in self.features_]

    def _residual(self, lib: Any, gram: Tensor | None, h: Tensor) -> Tensor:
        n = min(self.span, h.shape[1])
        v, idx = h.topk(n, dim=1)
        eye = self.ridge * torch.eye(n, device=h.device, dtype=h.dtype)
        if gram is not None:
            g = gram[idx[:, :, None], idx[:, None, :]] + eye
        else:
            nodes = lib.nodes
            g = torch.empty(h.shape[0], n, n, device=h.device, dtype=h.dtype)
            step = max(1, 2**24 // max(1, n * nodes.shape[1]))
            for i in range(0, h.shape[0], step):
                a = nodes[idx[i:i + step]]
                g[i:i + step] = a @ a.transpose(1, 2)
            g = g + eye
        # Cholesky, not torch.linalg.solve: the batched LU solve of torch 2.13's CPU build fails (MKL SLASWP
        # error, then hangs) for some sizes, e.g. 150 x 150 with 8 or more matrices; batched Cholesky does not.
        chol, info = torch.linalg.cholesky_ex(g)
        bad = info != 0
        if bool(bad.any()):  # nearly collinear nodes with ridge 0: add a small jitter to those rows only
            jitter = 1e-6 * g[bad].diagonal(dim1=1, dim2=2).mean(dim=1).clamp(min=1e-12)
            identity = torch.eye(n, device=h.device, dtype=h.dtype)
            chol[bad] = torch.linalg.cholesky(g[bad] + jitter[:, None, None] * identity)
        q = (v[:, None, :] @ torch.cholesky_solve(v[:, :, None], chol))[:, 0, 0]
        return (1.0 - q).clamp(min=0.0)

    def features(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        self._check_ready()
        answers = result.answers.to(net.device)
        cols = []
        needs_h = any(f != "distance" for f in self.features_)
        for l in self.layers_:
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
            for f in self.features_:
                if f == "margin":
                    s_other = h.masked_fill(same, -1.0).topk(kk, dim=1).values.mean(dim=1)
                    cols.append((s_other - s_same).double())
                elif f == "similarity":
                    cols.append((-s_same).double())
                elif f == "residual":
                    cols.append(self._residual(lib, self._grams[l], h).double())
                else:
                    cols.append(self._distance(lib, l, result.haps[l], answers))
        return torch.stack(cols, dim=1)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "k": self.k, "span": self.span, "features": list(self.features_),
                "ridge": self.ridge, "max_gram_nodes": self.max_gram_nodes, "pool": self.pool,
                "max_dim": self.max_dim, "seed": self.seed}

    def _load_state(self, state: Mapping[str, Tensor], net: "LibraryNetwork") -> None:
        self._prepare(net)

    def memory_bytes(self) -> int:
        """Bytes kept beyond the library network: the clean reference, Gram matrices and ``distance`` statistics."""
        kept = [g for g in self._grams.values() if g is not None]
        kept += [t for st in self._gauss.values() for t in st.values() if isinstance(t, Tensor)]
        return super().memory_bytes() + sum(t.numel() * t.element_size() for t in kept)


class LibraryDistanceScore(LibraryMarginScore):
    """Mahalanobis distance to the answer class's library nodes, fused over layers (``"library-distance"``).

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

    name = "library-distance"
    DEFAULT_FEATURES = ("distance",)


# --------------------------------------------------------------------------------------------------
# baselines
# --------------------------------------------------------------------------------------------------


class MaxSoftmaxScore:
    """Maximum softmax probability (Hendrycks & Gimpel, 2017), ``"msp"``: score ``1 - max softmax(z)``.

    ``z`` is the model's output (logits or log-probabilities: both give the same softmax). Needs no
    fitting and no library.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> r = ProbeResult(outputs=torch.tensor([[0., 0.], [10., 0.]]), haps={})
        >>> [round(v, 4) for v in MaxSoftmaxScore().score(None, r).tolist()]
        [0.5, 0.0]
    """

    name = "msp"
    requires_training_data = False

    def __init__(self, **_: Any):
        pass

    def __repr__(self) -> str:
        return "MaxSoftmaxScore()"

    def fit(self, net: Any, data: Any = None) -> "MaxSoftmaxScore":
        return self

    def score(self, net: Any, result: ProbeResult) -> Tensor:
        return 1.0 - stable_softmax(result.outputs.float(), dim=1).amax(dim=1)

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def memory_bytes(self) -> int:
        return 0


class MahalanobisScore(FusedLayerScore):
    """Multi-layer Mahalanobis score (Lee et al., 2018) without attack examples, ``"mahalanobis"``.

    Per layer: a feature vector (the channel means over positions for convolution layers, as in Lee et
    al.; the flattened activation otherwise, reduced by a fixed seeded Gaussian random projection to
    ``max_dim`` dimensions when larger), class means from the training inputs grouped by the MODEL's
    answers, one covariance shared by all classes (pseudo-inverse, as scikit-learn's
    ``EmpiricalCovariance``), and the score ``min_c (f - mu_c)^T S^+ (f - mu_c)``. Layers are fused with
    conformal p-values on clean data instead of the original logistic regression on attacks, and the
    input pre-processing step (which needs gradients) is left out. Fitting streams once over the
    training data with float64 sums.

    Args:
        layers: layers to use (default: every probed layer).
        pool: ``"auto"`` (average convolution outputs over positions, found from the torch module's
            ``out_channels``), ``None`` (never), or ``{layer: n_channels}``.
        max_dim: larger feature vectors are randomly projected to this many dimensions.
        seed: seed of the random projections.
        shrinkage: ``S + shrinkage * mean(diag S) * I`` before the pseudo-inverse (0: none).

    Example:
        >>> MahalanobisScore(max_dim=256).max_dim
        256
    """

    name = "mahalanobis"
    requires_training_data = True

    def __init__(self, layers: Sequence[str] | None = None, pool: Any = "auto", max_dim: int = 1024,
                 seed: int = 0, shrinkage: float = 0.0, **_: Any):
        super().__init__(layers)
        self.pool = _check_pool(pool)
        self.max_dim = check_int(max_dim, "max_dim")
        self.seed = int(seed)
        if not (isinstance(shrinkage, (int, float)) and math.isfinite(shrinkage) and shrinkage >= 0):
            raise ValueError(f"shrinkage must be a non-negative number, got {shrinkage!r}")
        self.shrinkage = float(shrinkage)
        self.channels_: dict[str, int] = {}
        self.dims_: dict[str, int] = {}
        self.means_: dict[str, Tensor] = {}
        self.precision_: dict[str, Tensor] = {}
        self.class_present_: dict[str, Tensor] = {}
        self._proj: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return f"MahalanobisScore(layers={self.layers}, pool={self.pool!r}, max_dim={self.max_dim})"

    def _feature(self, layer: str, hap: Tensor) -> Tensor:
        c = self.channels_[layer]
        proj = None
        if not c and hap.shape[1] > self.max_dim:
            if layer not in self._proj:
                self._proj[layer] = _layer_projection(self.seed, self.layers_.index(layer), hap.shape[1],
                                                      self.max_dim, hap.device)
            proj = self._proj[layer]
        return _pooled(hap, c, proj)

    def _fit(self, net: "LibraryNetwork", data: Any) -> None:
        n_classes = net.n_classes_
        sums: dict[str, Tensor] = {}
        outer: dict[str, Tensor] = {}
        counts = torch.zeros(n_classes, dtype=torch.float64, device=net.device)
        self._proj = {}
        n = 0
        for x, _ in iter_batches(data, net.batch_size):
            if x.shape[0] == 0:
                continue
            r = net._run(x)
            onehot = torch.nn.functional.one_hot(r.answers.to(net.device), n_classes).double()
            counts += onehot.sum(dim=0)
            for l in self.layers_:
                if l not in self.channels_:
                    self.channels_[l] = _conv_channels(net, l, r.haps[l].shape[1], self.pool)
                f = self._feature(l, r.haps[l]).double()
                if l not in sums:
                    self.dims_[l] = f.shape[1]
                    sums[l] = torch.zeros(n_classes, f.shape[1], dtype=torch.float64, device=net.device)
                    outer[l] = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=net.device)
                sums[l] += onehot.T @ f
                outer[l] += f.T @ f
            n += x.shape[0]
        if n < 2:
            raise ValueError(f"the 'mahalanobis' detector needs at least 2 training inputs, got {n}")
        for l in self.layers_:
            self.means_[l], self.precision_[l], self.class_present_[l] = _shared_gaussian(
                sums[l], outer[l], counts, n, self.shrinkage)

    def feature_names(self) -> list[str]:
        self._check_ready()
        return [f"{l}/distance" for l in self.layers_]

    def features(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        self._check_ready()
        if not self.means_:
            raise NotFittedError("the 'mahalanobis' detector has no class means; call fit(net, train) first")
        cols = []
        for l in self.layers_:
            f = self._feature(l, result.haps[l]).double()
            if f.shape[1] != self.dims_[l]:
                raise ShapeMismatchError(f"layer {l!r}: features of size {f.shape[1]}, fitted on {self.dims_[l]}")
            cols.append(_class_distances(f, self.means_[l], self.precision_[l], self.class_present_[l]).amin(dim=1))
        return torch.stack(cols, dim=1)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "pool": self.pool, "max_dim": self.max_dim, "seed": self.seed,
                "shrinkage": self.shrinkage, "channels_": self.channels_, "dims_": self.dims_}

    def _state(self) -> dict[str, Tensor]:
        out = {}
        for i, l in enumerate(self.layers_ or []):
            if l in self.means_:
                out[f"layer/{i}/means"] = self.means_[l]
                out[f"layer/{i}/precision"] = self.precision_[l]
                out[f"layer/{i}/present"] = self.class_present_[l]
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: "LibraryNetwork", config: Mapping[str, Any]) -> None:
        self.channels_ = {str(k): int(v) for k, v in (config.get("channels_") or {}).items()}
        self.dims_ = {str(k): int(v) for k, v in (config.get("dims_") or {}).items()}
        super().load_state_dict(state, net, config)

    def _load_state(self, state: Mapping[str, Tensor], net: "LibraryNetwork") -> None:
        self._proj = {}
        for i, l in enumerate(self.layers_):
            self.means_[l] = _require(state, f"layer/{i}/means", self.name).double().to(net.device)
            self.precision_[l] = _require(state, f"layer/{i}/precision", self.name).double().to(net.device)
            self.class_present_[l] = _require(state, f"layer/{i}/present", self.name).bool().to(net.device)


class DeepKNNScore:
    """Deep k-nearest neighbours (Papernot & McDaniel, 2018), ``"knn"``, without attack examples.

    Keeps the normalised activations of every training input for the chosen layers (this memory is what
    the library networks avoid). For a new input, per layer, the ``k`` training activations of largest
    cosine vote with their labels; the score is the number of votes, summed over layers, that disagree
    with the model's answer (the DkNN nonconformity; its conformal p-value is a monotone function of it,
    so the calibrated threshold plays the same role).

    Args:
        k: neighbours per layer (10 here; the DkNN paper used 75, which scored lower on MNIST).
        layers: layers to use (default: every probed layer).
        labels: ``"auto"`` (ground-truth labels when the training data carries them, else the model's
            answers), ``"true"`` (require labels) or ``"model"`` (the model's answers).

    Example:
        >>> DeepKNNScore(k=3).k
        3
    """

    name = "knn"
    requires_training_data = True

    def __init__(self, k: int = 10, layers: Sequence[str] | None = None, labels: str = "auto", **_: Any):
        self.k = check_int(k, "k")
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        if labels not in ("auto", "true", "model"):
            raise ValueError(f"labels must be 'auto', 'true' or 'model', got {labels!r}")
        self.labels = labels
        self.layers_: list[str] | None = None
        self.train_: dict[str, Tensor] = {}
        self.train_labels_: Tensor | None = None

    def __repr__(self) -> str:
        return f"DeepKNNScore(k={self.k}, layers={self.layers}, labels={self.labels!r})"

    def fit(self, net: "LibraryNetwork", data: Iterable[Any] | None = None) -> "DeepKNNScore":
        """Store the normalised training activations of the chosen layers and the training labels."""
        net._check_fitted()
        if data is None:
            raise ValueError("the 'knn' detector keeps the training activations: pass train= to ConsistencyDetector "
                             "or call det.fit(train) before calibrate")
        layers = _check_layers(net, self.layers, self.name)
        parts: dict[str, list[Tensor]] = {l: [] for l in layers}
        labels: list[Tensor] = []
        for x, y in iter_batches(data, net.batch_size):
            if x.shape[0] == 0:
                continue
            r = net._run(x)
            if self.labels == "model" or (self.labels == "auto" and y is None):
                labels.append(r.answers.to(net.device))
            elif y is None:
                raise ValueError("labels='true' needs training data with labels: pass (X, y) or a labelled loader")
            else:
                labels.append(y.to(net.device, torch.long))
            for l in layers:
                parts[l].append(normalize_rows(r.haps[l]))
        if not labels:
            raise ValueError("the 'knn' detector received no training inputs (empty data)")
        self.layers_ = layers
        self.train_ = {l: torch.cat(p) for l, p in parts.items()}
        self.train_labels_ = torch.cat(labels)
        return self

    def score(self, net: "LibraryNetwork", result: ProbeResult) -> Tensor:
        if self.layers_ is None:
            raise NotFittedError("the 'knn' detector is not fitted; call fit(net, train) first")
        answers = result.answers.to(net.device)
        total = torch.zeros(answers.shape[0], device=net.device)
        for l in self.layers_:
            ref = self.train_[l]
            x = normalize_rows(result.haps[l].to(ref.device))
            if x.shape[1] != ref.shape[1]:
                raise ShapeMismatchError(f"layer {l!r}: activations of size {x.shape[1]}, fitted on {ref.shape[1]}")
            idx = (x @ ref.T).topk(min(self.k, ref.shape[0]), dim=1).indices
            total += (self.train_labels_[idx] != answers[:, None]).sum(dim=1).to(total.dtype)
        return total

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "layers": self.layers, "labels": self.labels, "layers_": self.layers_}

    def state_dict(self) -> dict[str, Tensor]:
        if self.layers_ is None:
            return {}
        out = {f"layer/{i}/train": self.train_[l] for i, l in enumerate(self.layers_)}
        out["labels"] = self.train_labels_
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: "LibraryNetwork", config: Mapping[str, Any]) -> None:
        self.layers_ = _check_layers(net, config.get("layers_"), self.name)
        self.train_ = {l: _require(state, f"layer/{i}/train", self.name).float().to(net.device)
                       for i, l in enumerate(self.layers_)}
        self.train_labels_ = _require(state, "labels", self.name).long().to(net.device)

    def memory_bytes(self) -> int:
        """Bytes of the kept training activations and labels."""
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


# --------------------------------------------------------------------------------------------------
# the hook
# --------------------------------------------------------------------------------------------------

_SERVED = {
    "library-margin": LibraryMarginScore,
    "library-distance": LibraryDistanceScore,
    "msp": MaxSoftmaxScore,
    "mahalanobis": MahalanobisScore,
    "knn": DeepKNNScore,
}


@hookimpl(trylast=True)
def libnet_consistency_detector(name: str, settings: Mapping[str, Any]) -> Any | None:
    """Serve ``"library-margin"``, ``"library-distance"``, ``"msp"``, ``"mahalanobis"`` and ``"knn"``."""
    cls = _SERVED.get(name)
    return None if cls is None else cls(**settings)


def registered_detectors(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every detector the registered plugins list for comparison: ``{label: (name, settings)}``.

    A plugin lists its detectors in a ``LIBNET_DETECTORS`` attribute (a mapping of a label to a
    ``(name, settings)`` pair); plugins are read in registration order, so a later plugin may replace a
    label.

    Example:
        >>> import libnet_plugin as lnp
        >>> "knn" in registered_detectors(lnp.get_plugin_manager(autoload=False))
        True
    """
    from .plugins import default_plugin_manager

    pm = pm or default_plugin_manager()
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for _, plugin in pm.list_name_plugin():
        listed = getattr(plugin, "LIBNET_DETECTORS", None)
        if isinstance(listed, Mapping):
            for label, (name, settings) in listed.items():
                out[str(label)] = (str(name), dict(settings))
    return out
