"""Virtual-logit matching, ``"vim"`` (Wang et al., 2022, https://arxiv.org/abs/2203.10807)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..errors import ShapeMismatchError
from ._features import require_tensor
from ._posthoc import Penultimate, PenultimateScore

__all__ = ['ViMScore']


def default_dim(d: int) -> int:
    """The principal dimension for ``d`` features: 1000 from 1500 features, 512 from 768, else ``d // 2``
    (the paper's choices for its wide backbones; half the features for the narrow ones here)."""
    if d >= 1500:
        return 1000
    if d >= 768:
        return 512
    return d // 2


class ViMScore(PenultimateScore):
    """Virtual-logit matching (Wang, Li, Feng & Zhang, CVPR 2022, https://arxiv.org/abs/2203.10807), ``"vim"``.

    On the penultimate features ``h`` (the input of the model's last linear layer ``W``, ``b``, found as
    :mod:`._posthoc` describes): the origin ``o = -W^+ b``; the principal subspace is spanned by the
    ``dim`` leading eigenvectors of ``E[(h - o)(h - o)^T]`` over the training inputs, and the residual
    ``r(h) = ||P_perp (h - o)||`` is the norm of the rest; ``alpha = mean(max_c z_c) / mean(r)`` on the
    training inputs. The score is ``alpha r(h) - logsumexp(z)`` with ``z = h W^T + b`` (the virtual logit
    against the energy; higher = more suspicious), the negative of the paper's in-domain score.

    Args:
        dim: the principal dimension (default :func:`default_dim` of the feature width); less than the width.
        layer / activation / classifier: as for ``"react-energy"``.

    Example:
        >>> default_dim(500), default_dim(2048)
        (250, 1000)
    """

    differentiable: ClassVar[bool] = True
    name: ClassVar[str] = "vim"

    #: fitted attributes (set by fit and load; None before)
    dim_: int | None = None
    origin_: Tensor | None = None
    residual_basis_: Tensor | None = None
    alpha_: Tensor | None = None

    def __init__(self, dim: int | None = None, layer: str | None = None, activation: str = "auto",
                 classifier: str | None = None):
        super().__init__(layer, activation, classifier)
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be None or a positive integer, got {dim!r}")
        self.dim = dim

    def __repr__(self) -> str:
        return f"ViMScore(dim={self.dim}, layer={self.layer!r})"

    def _fit_features(self, net: Any, pen: Penultimate, feats: Tensor) -> None:
        assert pen.weight is not None and pen.bias is not None
        width = feats.shape[1]
        dim = default_dim(width) if self.dim is None else self.dim
        if not 1 <= dim < width:
            raise ShapeMismatchError(f"the 'vim' detector needs a principal dimension between 1 and the feature width "
                                     f"- 1 ({width - 1}) of layer {pen.layer!r}, got {dim}")
        w, b = pen.weight.double(), pen.bias.double()
        origin = -(torch.linalg.pinv(w) @ b)
        n, step = feats.shape[0], 65536  # float64 in chunks of rows: never a float64 copy of all the features
        second = torch.zeros(width, width, dtype=torch.float64, device=feats.device)
        for i in range(0, n, step):
            c = feats[i:i + step].double() - origin
            second += c.T @ c
        vals, vecs = torch.linalg.eigh(second / n)
        basis = vecs[:, vals.argsort(descending=True)[dim:]]  # the residual space
        residual, max_logit = 0.0, 0.0
        for i in range(0, n, step):
            f = feats[i:i + step].double()
            residual += float(((f - origin) @ basis).norm(dim=1).sum())
            max_logit += float((f @ w.T + b).amax(dim=1).sum())
        self.dim_, self.origin_, self.residual_basis_ = dim, origin.float(), basis.float()
        self.alpha_ = torch.tensor(max_logit / max(residual, 1e-12), dtype=torch.float32, device=feats.device)

    def from_features(self, pen: Penultimate, h: Tensor) -> Tensor:
        assert self.origin_ is not None and self.residual_basis_ is not None and self.alpha_ is not None
        virtual = self.alpha_.to(h.device) * ((h - self.origin_.to(h.device)) @ self.residual_basis_.to(h.device)).norm(
            dim=1)
        return virtual - torch.logsumexp(pen.logits(h), dim=1)

    def _config(self) -> dict[str, Any]:
        return {"dim": self.dim, "dim_": self.dim_}

    def _state(self) -> dict[str, Tensor]:
        if self.origin_ is None or self.residual_basis_ is None or self.alpha_ is None:
            return {}
        return {"origin": self.origin_, "residual_basis": self.residual_basis_, "alpha": self.alpha_.reshape(1)}

    def _load_state(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        self.dim_ = config.get("dim_")
        self.origin_ = require_tensor(state, "origin", self.name).float().to(net.device)
        self.residual_basis_ = require_tensor(state, "residual_basis", self.name).float().to(net.device)
        self.alpha_ = require_tensor(state, "alpha", self.name).float().reshape(()).to(net.device)
