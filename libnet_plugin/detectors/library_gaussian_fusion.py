"""``"library-gaussian-fusion"``: ``"library-fusion"`` plus Lee et al.'s per-layer class Gaussians, fused.

The library distances and the model's confidence of ``"library-fusion"`` see what the libraries hold; the
class-conditional Gaussians of Lee et al. (2018, https://arxiv.org/abs/1807.03888) on post-activation
block outputs catch the small, spread-out shifts of L-inf attacks in the first blocks (their channel means
after ReLU and pooling). Both kinds of evidence become conformal p-values on the clean calibration inputs
and are fused with Fisher's method, as ``"library-fusion"`` fuses its own (docs/method.md section 16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import SaveFormatError
from ..probe import ProbeResult
from ._features import check_layers, layer_state
from .api import FittedNetwork
from .library_fusion import LibraryFusionScore
from .mahalanobis import MahalanobisScore
from .mahalanobis_multilayer import MultiLayerMahalanobisScore

__all__ = ["LibraryGaussianFusionScore"]


class LibraryGaussianFusionScore(LibraryFusionScore):
    """``"library-fusion"``'s features plus one class-Gaussian distance per layer, all fused with Fisher's method.

    The added feature of each layer of ``gaussian_layers`` is ``"mahalanobis-multilayer"``'s
    ``M_l = min_c (f - mu_c)^T S^+ (f - mu_c)``: class means from the training labels (the model's answers
    when the data has none), one covariance tied across classes, ``f`` the channel means of a convolution
    layer (of the module's input channels for a ``"MODULE:input"`` spec) or the flattened activation,
    randomly projected beyond ``max_dim``. It needs the training data (one pass) besides the library network.

    Args:
        layers: the library layers (default: every probed layer), as for ``"library-fusion"``.
        gaussian_layers: the layers of the class Gaussians (default: the same as ``layers``).
        labels: ``"auto"``, ``"true"`` or ``"model"`` (see ``"mahalanobis-multilayer"``).
        pool / max_dim / shrinkage: as for ``"mahalanobis"``.
        outputs / combine / ...: as for ``"library-fusion"``.

    Example:
        >>> from libnet_plugin.plugins import make_detector
        >>> make_detector("library-gaussian-fusion", {"gaussian_layers": ["fc1:input"]}).gaussian.layers
        ['fc1:input']
    """

    name: ClassVar[str] = "library-gaussian-fusion"
    requires_training_data: ClassVar[bool] = True

    def __init__(self, layers: Sequence[str] | None = None, *, gaussian_layers: Sequence[str] | None = None,
                 labels: str = "auto", pool: Any = "auto", max_dim: int = 1024, shrinkage: float = 0.0,
                 **settings: Any):
        super().__init__(layers, **settings)
        if gaussian_layers is None:
            gaussian_layers = self.layers
        self.gaussian = MultiLayerMahalanobisScore(gaussian_layers, pool=pool, max_dim=max_dim, shrinkage=shrinkage,
                                                   labels=labels)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(layers={self.layers}, gaussian_layers={self.gaussian.layers}, "
                f"outputs={self.outputs})")

    def _fit(self, net: FittedNetwork, data: Any) -> None:
        super()._fit(net, data)
        g = self.gaussian
        g.layers_ = check_layers(net, g.layers, self.name)
        MahalanobisScore._fit(g, net, data)  # the class Gaussians (no z-scores: the fusion calibrates them)

    def feature_names(self) -> list[str]:
        return super().feature_names() + [f"{l}/gaussian" for l in self.gaussian.fitted_layers()]

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        lib = super().features(net, result)
        return torch.cat([lib, self.gaussian.features(net, result).to(lib.device, lib.dtype)], dim=1)

    def config(self) -> dict[str, Any]:
        g = self.gaussian
        return {**super().config(), "gaussian_layers": g.layers, "gaussian_layers_": g.layers_, "labels": g.labels,
                "gaussian_pool": g.pool, "max_dim": g.max_dim, "shrinkage": g.shrinkage,
                "gaussian_channels_": g.channels_, "gaussian_dims_": g.dims_}

    def _state(self) -> dict[str, Tensor]:
        return {**super()._state(), **{f"gaussian/{k}": v for k, v in MahalanobisScore._state(self.gaussian).items()}}

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        g = self.gaussian
        channels, dims = config.get("gaussian_channels_"), config.get("gaussian_dims_")
        if not isinstance(channels, Mapping) or not isinstance(dims, Mapping):
            raise SaveFormatError(f"the saved {self.name!r} detector lacks the feature sizes of its class Gaussians "
                                  "(modified or corrupted)")
        g.channels_ = {str(k): int(v) for k, v in channels.items()}
        g.dims_ = {str(k): int(v) for k, v in dims.items()}
        g.layers_ = check_layers(net, config.get("gaussian_layers_"), self.name)
        super().load_state_dict(state, net, config)

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        super()._load_state(state, net)
        MahalanobisScore._load_state(self.gaussian, layer_state("gaussian/", state), net)
