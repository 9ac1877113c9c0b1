"""Libraries that see less of each layer: sparse sampling and random projection.

The seed paper's first future direction is *sparse sampling*: let a library see only a fixed random
subset of a layer's units, so that large layers cost less to store and to compare with. Two libraries
provide it, both exact leader libraries (:class:`~libnet_plugin.library.ExactLibrary`) on transformed
vectors, both served by the ``libnet_library`` hook and saved with the library network:

- ``"sparse"`` (:class:`SparseLibrary`): a fixed random subset of ``n_units`` units of the layer.
- ``"projected"`` (:class:`ProjectedLibrary`): a fixed random projection to ``n_components`` dimensions;
  cosines are approximately preserved (Johnson-Lindenstrauss). ``method="gaussian"`` is a dense Gaussian
  matrix; ``method="hashing"`` a signed hashing of the units (one pass over the layer, no matrix product).

Layers with no more units than asked for are used whole (for example the MNIST net's ``fc1`` and ``fc2``
with ``n_units=1024``); a ``{layer: size}`` mapping samples only the layers it names (for example
``{"conv1": 1024}``). Everything random comes from ``seed`` through a CPU ``torch.Generator``, so a seed
gives the same library on every machine and device.

Example:
    >>> import torch
    >>> from torch import nn
    >>> import libnet_plugin as lnp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 3))
    >>> net = lnp.LibraryNetwork(model, ["0", "2"], thresholds=0.8, library="sparse",
    ...                          library_options={"n_units": 16, "seed": 1}).fit(torch.randn(200, 8))
    >>> net.libraries_["0"].nodes.shape[1], net.libraries_["2"].nodes.shape[1]  # 64 -> 16 units; 3 kept
    (16, 3)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._validate import check_int
from .errors import SaveFormatError, ShapeMismatchError
from .library import ExactLibrary, count_sketch, count_sketch_map

__all__ = ["SparseLibrary", "ProjectedLibrary", "PROJECTION_METHODS"]

#: the projections a :class:`ProjectedLibrary` offers
PROJECTION_METHODS = ("gaussian", "hashing")
#: a projected library built for a known ``dim`` (a loaded one) draws its map at once when it has at most
#: this many numbers (64 MiB in float32), else at its first batch, once that batch's width confirmed ``dim``
LOAD_DRAW_ELEMENTS = 1 << 24


def _layer_size(value: Any, name: str, layer: str) -> int | None:
    """The size option for this layer: an int for every layer, or ``{layer: int}`` (layers not named, and
    ``None``, are used whole)."""
    if isinstance(value, Mapping):
        value = value.get(layer)
    return None if value is None else check_int(value, name, layer=layer)


def _reject(settings: Mapping[str, Any], key: str, name: str, own: str) -> None:
    """A clear error for the other library's size option (ExactLibrary would silently ignore it)."""
    if key in settings:
        raise TypeError(f"the {name!r} library takes {own!r}, not {key!r} (got {key}={settings[key]!r})")


class SparseLibrary(ExactLibrary):
    """An exact leader library over a fixed random subset of each layer's units (name ``"sparse"``).

    Nodes and cosines are those of the sub-vectors ``f[units]``, each L2-normalised. The units are
    drawn once (``torch.randperm`` from ``seed``), kept sorted, and saved with the library.

    Args:
        threshold: theta in (0, 1].
        n_units: units seen per layer, or ``{layer: units}`` (layers not named are used whole); a layer
            with at most ``n_units`` units, and ``None``, use the whole layer.
        seed: seed of the draw.
        **settings: the :class:`~libnet_plugin.library.ExactLibrary` settings (``device``, ``layer``,
            ``dim``, ``dtype``, ``chunk_size``, screen options...).

    Example:
        >>> lib = SparseLibrary(0.9, n_units=2, seed=0)
        >>> lib.partial_fit(torch.eye(5)[:3] + 1.0).tolist()
        [True, False, False]
        >>> lib.units.numel(), lib.nodes.shape
        (2, torch.Size([1, 2]))
    """

    name = "sparse"

    def __init__(self, threshold: float, *, n_units: int | Mapping[str, int] | None = 1024, seed: int = 0,
                 **settings: Any):
        _reject(settings, "n_components", self.name, "n_units")
        super().__init__(threshold, **settings)
        self.n_units = _layer_size(n_units, "n_units", self.layer)
        self.seed = int(seed)
        # drawn at the first batch (after its width was checked against ``dim``), or read from a saved file:
        # nothing the size of the layer is allocated for a ``dim`` that no activation has confirmed yet
        self.units: Tensor | None = None
        self._units_on: dict[torch.device, Tensor] = {}  # copies of ``units`` on the devices HAPs come from

    def __repr__(self) -> str:
        return (f"SparseLibrary(layer={self.layer!r}, threshold={self.threshold}, n_units={self.n_units}, "
                f"seed={self.seed}, size={self.size})")

    def _draw_units(self, dim: int) -> Tensor:
        if self.n_units is None or self.n_units >= dim:
            return torch.arange(dim)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randperm(dim, generator=gen)[: self.n_units].sort().values

    def embed(self, haps: Tensor) -> Tensor:
        """The sub-vectors ``haps[:, units]`` ``[B, min(n_units, D)]`` (normalised by :meth:`transform`)."""
        if self.units is None:
            self.units = self._draw_units(int(haps.shape[1]))
        if self.units.numel() == haps.shape[1]:  # the whole layer (units are sorted: 0..D-1)
            return haps.to(self.device, self.dtype)
        units = self._units_on.get(haps.device)
        if units is None:
            units = self._units_on[haps.device] = self.units.to(haps.device)
        # gather with the index broadcast over the batch rather than index_select on dim 1 (the faster of the two)
        return torch.gather(haps, 1, units.expand(haps.shape[0], -1)).to(self.device, self.dtype)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_units": self.n_units, "seed": self.seed}

    def state_dict(self) -> dict[str, Tensor]:
        """The nodes, their training indices, and the sampled ``units``."""
        if self.units is None:
            raise ShapeMismatchError(f"the sparse library of layer {self.layer!r} has not seen any data yet")
        return {**super().state_dict(), "units": self.units.clone()}

    def _stored_width(self) -> int | None:
        return None if self.units is None else int(self.units.numel())

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore nodes and units saved by :meth:`state_dict`.

        The saved units are checked against the settings (``n_units``, ``dim``) before anything is
        allocated: one or more distinct sorted integer units below ``dim``, ``min(n_units, dim)`` of them,
        as many as the nodes have features.
        """
        if "units" not in state:
            raise SaveFormatError(f"the saved sparse library of layer {self.layer!r} has no 'units' entry")
        raw = state["units"]
        want = self.n_units if self.n_units is not None else self.dim
        if raw.dim() != 1 or raw.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8) or raw.numel() == 0:
            size_ok = False
        elif self.dim is not None:
            size_ok = raw.numel() == (self.dim if want is None else min(want, self.dim))
        else:
            size_ok = want is None or raw.numel() <= want
        units = raw.to("cpu", torch.long) if size_ok else raw
        if (not size_ok or int(units.min()) < 0 or (self.dim is not None and int(units.max()) >= self.dim)
                or bool((units[1:] <= units[:-1]).any())):
            raise SaveFormatError(f"the saved units of the sparse library of layer {self.layer!r} do not fit "
                                  f"n_units={self.n_units} and {self.dim} features ({raw.dtype} of shape "
                                  f"{tuple(raw.shape)}; expected distinct sorted unit indices)")
        self.units = units
        try:
            super().load_state_dict(state)
        except BaseException:
            self.units = None
            raise
        self.units = units.clone()
        self._units_on = {}


class ProjectedLibrary(ExactLibrary):
    """An exact leader library over a fixed random projection of each layer (name ``"projected"``).

    Nodes and cosines are those of ``normalize(f @ R)`` with ``R`` a ``[D, n_components]`` random map
    drawn from ``seed``: a dense Gaussian (``method="gaussian"``, costs ``D * n_components`` multiply-adds
    per input) or a signed hashing of the units into ``n_components`` sums (``method="hashing"``, one
    pass over the input). Cosines are preserved up to about ``1 / sqrt(n_components)``. ``R`` is not
    stored: it is drawn again from ``seed`` on load, and a digest saved in the settings makes sure it
    is the same map.

    Args:
        threshold: theta in (0, 1].
        n_components: dimension after projection, or ``{layer: dimension}`` (layers not named are used
            whole); a layer with at most that many units, and ``None``, use the whole layer.
        seed: seed of the map.
        method: ``"gaussian"`` or ``"hashing"``.
        projection_digest: the digest of the expected map (set by ``load``; checked when drawn).
        **settings: the :class:`~libnet_plugin.library.ExactLibrary` settings.

    Example:
        >>> lib = ProjectedLibrary(0.9, n_components=8, seed=0)
        >>> _ = lib.partial_fit(torch.randn(20, 100))
        >>> lib.nodes.shape[1]
        8
    """

    name = "projected"

    def __init__(self, threshold: float, *, n_components: int | Mapping[str, int] | None = 1024, seed: int = 0,
                 method: str = "gaussian", projection_digest: str | None = None, **settings: Any):
        _reject(settings, "n_units", self.name, "n_components")
        super().__init__(threshold, **settings)
        if method not in PROJECTION_METHODS:
            raise ValueError(f"method of the projected library for layer {self.layer!r} must be one of "
                             f"{PROJECTION_METHODS}, got {method!r}")
        self.n_components = _layer_size(n_components, "n_components", self.layer)
        self.seed = int(seed)
        self.method = method
        self.projection_digest = projection_digest
        self._projection: Tensor | tuple[Tensor, Tensor] | None = None
        self._identity = False
        # a map of at most LOAD_DRAW_ELEMENTS numbers is drawn now for a given ``dim`` (a loaded library
        # checks its digest at load); a larger one at the first batch, once its width has confirmed ``dim``:
        # a ``dim`` read from a file that no activation has confirmed never costs ``dim * n_components``
        if self.dim is not None and self._draw_size(self.dim) <= LOAD_DRAW_ELEMENTS:
            self._draw(self.dim)

    def __repr__(self) -> str:
        return (f"ProjectedLibrary(layer={self.layer!r}, threshold={self.threshold}, n_components="
                f"{self.n_components}, method={self.method!r}, seed={self.seed}, size={self.size})")

    def _draw_size(self, dim: int) -> int:
        """Numbers the map for ``dim`` features holds (0 when the layer is used whole)."""
        if self.n_components is None or self.n_components >= dim:
            return 0
        return dim * self.n_components if self.method == "gaussian" else 2 * dim

    def _draw(self, dim: int) -> None:
        self._identity = self.n_components is None or self.n_components >= dim
        if self._identity:
            self._projection = None
            digest = "identity"
        elif self.method == "gaussian":
            gen = torch.Generator().manual_seed(self.seed)
            r = torch.randn(dim, self.n_components, generator=gen) / self.n_components ** 0.5
            digest = hashlib.sha256(r.numpy().tobytes()).hexdigest()[:16]
            self._projection = r.to(self.device, self.dtype)
        else:
            bucket, sign = count_sketch_map(dim, self.n_components, self.seed)
            h = hashlib.sha256(bucket.numpy().tobytes())
            h.update(sign.numpy().tobytes())
            digest = h.hexdigest()[:16]
            self._projection = (bucket.to(self.device), sign.to(self.device, self.dtype))
        if self.projection_digest is not None and digest != self.projection_digest:
            raise SaveFormatError(
                f"the {self.method} projection of layer {self.layer!r} drawn from seed {self.seed} differs from "
                f"the one the library was built with (digest {digest}, saved {self.projection_digest}); was it "
                "saved with another torch version?")
        self.projection_digest = digest

    @property
    def projection(self) -> Tensor | None:
        """The ``[D, n_components]`` map (``None`` before the first batch or when the layer is used whole).

        For ``method="hashing"`` the dense equivalent is built on request (one +-1 per row).
        """
        if self._projection is None:
            return None
        if isinstance(self._projection, Tensor):
            return self._projection
        bucket, sign = self._projection
        dense = torch.zeros(bucket.numel(), self.n_components, dtype=self.dtype, device=self.device)
        dense[torch.arange(bucket.numel(), device=self.device), bucket] = sign
        return dense

    def embed(self, haps: Tensor) -> Tensor:
        """The projections ``haps @ R`` ``[B, min(n_components, D)]`` (normalised by :meth:`transform`)."""
        if self._projection is None and not self._identity:
            self._draw(int(haps.shape[1]))
        x = haps.to(self.device, self.dtype)
        if self._identity:
            return x
        if isinstance(self._projection, Tensor):
            return x @ self._projection
        return count_sketch(x, self._projection, self.n_components)

    def _stored_width(self) -> int | None:
        if self.dim is None:
            return None
        return self.dim if self.n_components is None else min(self.n_components, self.dim)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "n_components": self.n_components, "seed": self.seed, "method": self.method,
                "projection_digest": self.projection_digest}
