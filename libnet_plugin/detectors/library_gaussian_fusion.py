"""``"library-gaussian-fusion"``: ``"library-fusion"`` plus Lee et al.'s per-layer class Gaussians, fused.

The library distances and the model's confidence of ``"library-fusion"`` see what the libraries hold; the
class-conditional Gaussians of Lee et al. (2018, https://arxiv.org/abs/1807.03888) on post-activation
block outputs catch the small, spread-out shifts of L-inf attacks in the first blocks (their channel means
after ReLU and pooling); post-hoc peers' scores (``peers=``, for example ViM's residual off the principal
subspace of the penultimate features) catch inputs that leave the training data's subspace. Every kind of
evidence becomes conformal p-values on the clean calibration inputs, fused with Fisher's method, as
``"library-fusion"`` fuses its own (docs/method.md section 16).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import SaveFormatError
from ..probe import ProbeResult
from ._features import check_layers, layer_state
from .api import ConsistencyScore, FittedNetwork
from .energy import EnergyScore
from .gen import GENScore
from .knn_normalized import KNNNormalizedScore
from .library_fusion import LibraryFusionScore
from .mahalanobis import MahalanobisScore
from .mahalanobis_multilayer import MultiLayerMahalanobisScore
from .maxlogit import MaxLogitScore
from .msp import MaxSoftmaxScore
from .react_energy import ReActEnergyScore
from .vim import ViMScore

__all__ = ["LibraryGaussianFusionScore", "PEER_FEATURES"]

#: the post-hoc scores ``peers=`` can fuse, by detector name (each with its default settings)
PEER_FEATURES: dict[str, type[ConsistencyScore]] = {
    cls.name: cls for cls in (MaxSoftmaxScore, EnergyScore, MaxLogitScore, GENScore, ReActEnergyScore, ViMScore,
                              KNNNormalizedScore, MultiLayerMahalanobisScore)}


class LibraryGaussianFusionScore(LibraryFusionScore):
    """``"library-fusion"``'s features plus one class-Gaussian distance per layer, all fused with Fisher's method.

    The added feature of each layer of ``gaussian_layers`` is ``"mahalanobis-multilayer"``'s
    ``M_l = min_c (f - mu_c)^T S^+ (f - mu_c)``: class means from the training labels (the model's answers
    when the data has none), one covariance tied across classes, ``f`` the channel means of a convolution
    layer (of the module's input channels for a ``"MODULE:input"`` spec) or the flattened activation,
    randomly projected beyond ``max_dim``. Each name of ``peers`` adds that post-hoc detector's score (fitted
    with its default settings on the same training data) as one more feature. It needs the training data
    (one pass per kind of statistic) besides the library network.

    Args:
        layers: the library layers (default: every probed layer), as for ``"library-fusion"``.
        gaussian_layers: the layers of the class Gaussians (default: the same as ``layers``).
        labels: ``"auto"``, ``"true"`` or ``"model"`` (see ``"mahalanobis-multilayer"``).
        pool / max_dim / shrinkage: as for ``"mahalanobis"``.
        peers: names of :data:`PEER_FEATURES` whose scores are fused too (default: none).
        outputs / combine / ...: as for ``"library-fusion"``.

    Example:
        >>> from libnet_plugin.plugins import make_detector
        >>> make_detector("library-gaussian-fusion", {"gaussian_layers": ["fc1:input"]}).gaussian.layers
        ['fc1:input']
        >>> make_detector("library-gaussian-fusion", {"peers": ["vim"]}).peers
        ('vim',)
    """

    name: ClassVar[str] = "library-gaussian-fusion"
    requires_training_data: ClassVar[bool] = True

    def __init__(self, layers: Sequence[str] | None = None, *, gaussian_layers: Sequence[str] | None = None,
                 labels: str = "auto", pool: Any = "auto", max_dim: int = 1024, shrinkage: float = 0.0,
                 peers: Sequence[str] = (), **settings: Any):
        super().__init__(layers, **settings)
        if gaussian_layers is None:
            gaussian_layers = self.layers
        self.gaussian = MultiLayerMahalanobisScore(gaussian_layers, pool=pool, max_dim=max_dim, shrinkage=shrinkage,
                                                   labels=labels)
        names = (peers,) if isinstance(peers, str) else tuple(peers)
        bad = [p for p in names if p not in PEER_FEATURES]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"peers must be distinct names among {sorted(PEER_FEATURES)}, got {peers!r}")
        self.peers = names
        self.peer_scores: list[ConsistencyScore] = [PEER_FEATURES[p]() for p in names]

    def __repr__(self) -> str:
        peers = f", peers={list(self.peers)}" if self.peers else ""
        return (f"{type(self).__name__}(layers={self.layers}, gaussian_layers={self.gaussian.layers}, "
                f"outputs={self.outputs}{peers})")

    def _fit(self, net: FittedNetwork, data: Any) -> None:
        super()._fit(net, data)
        g = self.gaussian
        g.layers_ = check_layers(net, g.layers, self.name)
        MahalanobisScore._fit(g, net, data)  # the class Gaussians (no z-scores: the fusion calibrates them)
        for p in self.peer_scores:
            p.fit(net, data if p.requires_training_data else None)

    def feature_names(self) -> list[str]:
        return (super().feature_names() + [f"{l}/gaussian" for l in self.gaussian.fitted_layers()]
                + [f"peer/{p}" for p in self.peers])

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        lib = super().features(net, result)
        cols = [lib, self.gaussian.features(net, result).to(lib.device, lib.dtype)]
        cols += [p.score(net, result).to(lib.device, lib.dtype)[:, None] for p in self.peer_scores]
        return torch.cat(cols, dim=1)

    def memory_bytes(self) -> int:
        """Bytes kept beyond the library network.

        Returns:
            ``"library-fusion"``'s, plus the whitening factors of the class Gaussians (their state and the
            peers' are in the saved state already).
        """
        return super().memory_bytes() + self.gaussian.factor_bytes()

    def config(self) -> dict[str, Any]:
        g = self.gaussian
        return {**super().config(), "gaussian_layers": g.layers, "gaussian_layers_": g.layers_, "labels": g.labels,
                "gaussian_pool": g.pool, "max_dim": g.max_dim, "shrinkage": g.shrinkage,
                "gaussian_channels_": g.channels_, "gaussian_dims_": g.dims_, "peers": list(self.peers),
                "peer_configs_": [p.config() for p in self.peer_scores]}

    def _state(self) -> dict[str, Tensor]:
        out = {**super()._state(), **{f"gaussian/{k}": v for k, v in MahalanobisScore._state(self.gaussian).items()}}
        for i, p in enumerate(self.peer_scores):
            out.update({f"peer/{i}/{k}": v for k, v in p.state_dict().items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        g = self.gaussian
        channels, dims = config.get("gaussian_channels_"), config.get("gaussian_dims_")
        if not isinstance(channels, Mapping) or not isinstance(dims, Mapping):
            raise SaveFormatError(f"the saved {self.name!r} detector lacks the feature sizes of its class Gaussians "
                                  "(modified or corrupted)")
        g.channels_ = {str(k): int(v) for k, v in channels.items()}
        g.dims_ = {str(k): int(v) for k, v in dims.items()}
        g.layers_ = check_layers(net, config.get("gaussian_layers_"), self.name)
        peer_configs = config.get("peer_configs_", [])
        if not isinstance(peer_configs, list) or len(peer_configs) != len(self.peer_scores):
            raise SaveFormatError(f"the saved {self.name!r} detector has {len(peer_configs or [])} peer configurations "
                                  f"for its peers {list(self.peers)} (modified or corrupted)")
        for i, (p, cfg) in enumerate(zip(self.peer_scores, peer_configs)):
            if not isinstance(cfg, Mapping) or cfg.get("name") != p.name:
                raise SaveFormatError(f"the saved {self.name!r} detector's peer {i} is not {p.name!r} (modified or "
                                      "corrupted)")
            p.load_state_dict(layer_state(f"peer/{i}/", state), net, cfg)
        super().load_state_dict(state, net, config)

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        super()._load_state(state, net)
        MahalanobisScore._load_state(self.gaussian, layer_state("gaussian/", state), net)
