"""The multi-layer Mahalanobis baseline, ``"mahalanobis"`` (Lee et al., 2018), without attack examples."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._batches import iter_batches, n_rows
from .._validate import check_int
from ..distributed import sum_over_ranks
from ..errors import NotFittedError, SaveFormatError, ShapeMismatchError
from ..probe import ProbeResult
from ._features import (
    check_pool,
    class_distances,
    conv_channels,
    layer_projection,
    pooled,
    require_tensor,
    shared_gaussian,
    whitened_distances,
    whitening,
    whitening_bytes,
)
from .api import FittedNetwork, FusedLayerScore

__all__ = ['MahalanobisScore']


class MahalanobisScore(FusedLayerScore):
    """Multi-layer Mahalanobis score (Lee et al., 2018) without attack examples, ``"mahalanobis"``.

    Paper: Lee, Lee, Lee & Shin, "A Simple Unified Framework for Detecting Out-of-Distribution Samples and
    Adversarial Attacks", NeurIPS 2018, https://arxiv.org/abs/1807.03888.

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

    name: ClassVar[str] = "mahalanobis"
    requires_training_data: ClassVar[bool] = True

    def __init__(self, layers: Sequence[str] | None = None, pool: Any = "auto", max_dim: int = 1024,
                 seed: int = 0, shrinkage: float = 0.0):
        super().__init__(layers)
        self.pool = check_pool(pool)
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
        self._white: dict[str, dict[str, Any]] = {}  # per layer: whitening(...) of the Gaussian, built by _prepare

    def __repr__(self) -> str:
        return f"MahalanobisScore(layers={self.layers}, pool={self.pool!r}, max_dim={self.max_dim})"

    def _projection(self, layer: str, dim: int, device: Any) -> Tensor | None:
        """The layer's random projection ``[dim, max_dim]``, or ``None`` for pooled or small features."""
        if self.channels_[layer] or dim <= self.max_dim:
            return None
        if layer not in self._proj:
            self._proj[layer] = layer_projection(self.seed, self.fitted_layers().index(layer), dim, self.max_dim,
                                                  device)
        return self._proj[layer]

    def _feature(self, layer: str, hap: Tensor) -> Tensor:
        return pooled(hap, self.channels_[layer], self._projection(layer, hap.shape[1], hap.device))

    def _prepare(self, net: FittedNetwork) -> None:
        """Factor each layer's precision once (:func:`whitening`), so that scoring costs one product per layer."""
        self._white = {}
        hap_dims = getattr(net, "hap_dims_", {})
        for l in self.fitted_layers():
            if l not in self.means_:
                continue
            dim = hap_dims.get(l)
            proj = None if dim is None else self._projection(l, int(dim), net.device)
            self._white[l] = whitening(self.means_[l], self.precision_[l], proj)

    def layer_distances(self, layer: str, hap: Tensor) -> Tensor:
        """The Mahalanobis distances ``[B, C]`` of one layer's activations ``[B, D]`` to its class means.

        One product with the cached whitening factor when there is one (up to float32 rounding of the
        product, the plain formula ``(f - mu_c)^T S^+ (f - mu_c)`` otherwise).

        Args:
            layer: a fitted layer.
            hap: its activations from one probe run, ``[B, D]``.

        Returns:
            float64 ``Tensor[B, C]`` (``inf`` for classes without training inputs).

        Example:
            >>> import torch, libnet_plugin as lnp
            >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
            <torch._C.Generator object at ...>
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3)).eval()
            >>> x = torch.randn(50, 4)
            >>> net = lnp.LibraryNetwork(model, ["1"], thresholds=0.9).fit(x)
            >>> s = MahalanobisScore().fit(net, x)
            >>> s.layer_distances("1", net.run(x[:2]).haps["1"]).shape
            torch.Size([2, 3])
        """
        white = self._white.get(layer)
        if white is not None and white["folded"]:
            return whitened_distances(hap, white, self.class_present_[layer])
        f = self._feature(layer, hap)
        if f.shape[1] != self.dims_[layer]:
            raise ShapeMismatchError(f"layer {layer!r}: features of size {f.shape[1]}, fitted on {self.dims_[layer]}")
        if white is not None:
            return whitened_distances(f, white, self.class_present_[layer])
        return class_distances(f.double(), self.means_[layer], self.precision_[layer], self.class_present_[layer])

    def _classes(self, result: ProbeResult, labels: Tensor | None, net: FittedNetwork) -> Tensor:
        """The class of each training input that its features are grouped by: the model's answer here."""
        return result.answers.to(net.device)

    def _fit(self, net: FittedNetwork, data: Any) -> None:
        n_classes = net.n_classes_
        sums: dict[str, Tensor] = {}
        outer: dict[str, Tensor] = {}
        counts = torch.zeros(n_classes, dtype=torch.float64, device=net.device)
        self._proj = {}
        self.channels_, self.dims_, self.means_, self.precision_, self.class_present_ = {}, {}, {}, {}, {}
        n = 0
        for x, y in iter_batches(data, net.batch_size):
            if n_rows(x) == 0:
                continue
            r = net.run(x)
            onehot = torch.nn.functional.one_hot(self._classes(r, y, net), n_classes).double()
            counts += onehot.sum(dim=0)
            for l in self.fitted_layers():
                if l not in self.channels_:
                    self.channels_[l] = conv_channels(net, l, r.haps[l].shape[1], self.pool)
                f = self._feature(l, r.haps[l]).double()
                if l not in sums:
                    self.dims_[l] = f.shape[1]
                    sums[l] = torch.zeros(n_classes, f.shape[1], dtype=torch.float64, device=net.device)
                    outer[l] = torch.zeros(f.shape[1], f.shape[1], dtype=torch.float64, device=net.device)
                sums[l] += onehot.T @ f
                outer[l] += f.T @ f
            n += n_rows(x)
        local = {"counts": counts, **{f"sums/{l}": t for l, t in sums.items()},
                 **{f"outer/{l}": t for l, t in outer.items()}}
        total, n = sum_over_ranks(local, n, net.device, "training inputs for the 'mahalanobis' detector")
        counts = total["counts"]
        sums = {l: total[f"sums/{l}"] for l in sums}
        outer = {l: total[f"outer/{l}"] for l in outer}
        if n < 2:
            raise ValueError(f"the 'mahalanobis' detector needs at least 2 training inputs, got {n}")
        for l in self.fitted_layers():
            self.means_[l], self.precision_[l], self.class_present_[l] = shared_gaussian(
                sums[l], outer[l], counts, n, self.shrinkage)
        self._prepare(net)

    def feature_names(self) -> list[str]:
        self.check_is_fitted()
        return [f"{l}/distance" for l in self.fitted_layers()]

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        if not self.means_:
            raise NotFittedError("the 'mahalanobis' detector has no class means; call fit(net, train) first")
        return torch.stack([self.layer_distances(l, result.haps[l]).amin(dim=1) for l in self.fitted_layers()], dim=1)

    def memory_bytes(self) -> int:
        """Bytes kept beyond the library network.

        Returns:
            the bytes of the saved state and of the whitening factors built from it at fit and load.
        """
        return super().memory_bytes() + self.factor_bytes()

    def factor_bytes(self) -> int:
        """Bytes of the whitening factors built at fit and load (kept beyond the saved state).

        Returns:
            the byte count (0 before :meth:`fit`).
        """
        return whitening_bytes(self._white)

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

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        saved = {key: config.get(key) or {} for key in ("channels_", "dims_")}
        if not all(isinstance(v, Mapping) for v in saved.values()):
            raise SaveFormatError("the saved channels_ and dims_ of the 'mahalanobis' detector are not JSON objects "
                                  "(modified or corrupted)")
        self.channels_ = {str(k): int(v) for k, v in saved["channels_"].items()}
        self.dims_ = {str(k): int(v) for k, v in saved["dims_"].items()}
        super().load_state_dict(state, net, config)
        hap_dims = getattr(net, "hap_dims_", {})
        for l in self.fitted_layers():  # the feature size each layer's activations give, checked at load
            c, dim = self.channels_.get(l), hap_dims.get(l)
            if dim is None:
                continue
            want = c if c and dim % c == 0 and dim > c else min(dim, self.max_dim)
            if c is None or c < 0 or (c and c != want) or self.dims_.get(l) != want:
                raise SaveFormatError(f"the saved feature size {self.dims_.get(l)} (channels {c}) of layer {l!r} of the "
                                      f"'mahalanobis' detector does not fit its {dim} activations (modified or corrupted)")

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        self._proj = {}
        for i, l in enumerate(self.fitted_layers()):
            self.means_[l] = require_tensor(state, f"layer/{i}/means", self.name).double().to(net.device)
            self.precision_[l] = require_tensor(state, f"layer/{i}/precision", self.name).double().to(net.device)
            self.class_present_[l] = require_tensor(state, f"layer/{i}/present", self.name).bool().to(net.device)
            d = self.dims_.get(l)
            m, p, c = self.means_[l], self.precision_[l], self.class_present_[l]
            if d is None or m.dim() != 2 or m.shape[1] != d or tuple(p.shape) != (d, d) or tuple(c.shape) != (m.shape[0],):
                raise SaveFormatError(f"the saved class means {list(m.shape)}, precision {list(p.shape)} and classes "
                                      f"{list(c.shape)} of layer {l!r} of the 'mahalanobis' detector do not fit its "
                                      f"feature size {d} (modified or corrupted)")
        self._prepare(net)
