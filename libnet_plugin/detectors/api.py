"""The detector contract: what a score is (:class:`ConsistencyScore`) and what it may use (:class:`FittedNetwork`).

A ``libnet_consistency_detector`` hook returns a :class:`ConsistencyScore`. The class declares every
member that :class:`~libnet_plugin.ConsistencyDetector` and ``libnet evaluate-detectors`` use; the
optional ones carry their defaults here, so a score overrides only what it needs. A plugin object that
only has ``name``, ``fit`` and ``score`` (the :class:`ScoreLike` protocol) is accepted too: it is wrapped
in a :class:`PluginScore`, which gives it the declared defaults (no saved state: it is refitted from the
network when a saved detector is loaded).

Example:
    >>> import torch
    >>> class OutputNorm(ConsistencyScore):
    ...     name = "output-norm"
    ...     def fit(self, net, data=None):
    ...         self.fitted_ = True
    ...         return self
    ...     def score(self, net, result):
    ...         self.check_is_fitted()
    ...         return result.outputs.norm(dim=1)
    >>> s = OutputNorm()
    >>> s.requires_training_data, s.fuses, s.config(), s.memory_bytes()
    (False, False, {'name': 'output-norm'}, 0)
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from .._batches import MultiInput
from ..errors import NotFittedError, SaveFormatError
from ..probe import LayerProbe, ProbeResult
from ._features import check_layers, layer_state
from .conformal import ConformalFusion, fisher

__all__ = ["FittedNetwork", "ConsistencyScore", "ScoreLike", "PluginScore", "FusedLayerScore", "as_consistency_score"]


@runtime_checkable
class FittedNetwork(Protocol):
    """The part of a fitted :class:`~libnet_plugin.LibraryNetwork` that a score may use.

    Attributes:
        layers: the probed layer names, in order.
        device: where the libraries live (scores return tensors there).
        batch_size: batch size for passes over data.
        probe: the layer probe (``probe.run(x)`` gives a :class:`~libnet_plugin.probe.ProbeResult`).
        libraries_ / readouts_: ``{layer: library}`` and ``{layer: readout}`` of the fitted network.
        n_classes_: number of classes of the model's outputs.

    Example:
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(torch.randn(50, 4))
        >>> isinstance(net, FittedNetwork)
        True
        >>> {k: v.shape for k, v in net.scores_from_haps(net.run(torch.randn(2, 4)).haps).items()}
        {'0': torch.Size([2, 3]), '2': torch.Size([2, 3])}
    """

    layers: list[str]
    device: torch.device
    batch_size: int
    probe: LayerProbe
    libraries_: dict[str, Any]
    readouts_: dict[str, Any]
    n_classes_: int

    def check_fitted(self) -> None:
        """Raise :class:`~libnet_plugin.errors.NotFittedError` unless the network is fitted."""
        ...

    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """One forward pass of the model over a batch, with the HAPs of every probed layer.

        Args:
            x: a batch of inputs.

        Returns:
            the :class:`~libnet_plugin.probe.ProbeResult`.
        """
        ...

    def scores_from_haps(self, haps: Mapping[str, Tensor], top_k: int | None = None,
                         layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Per-layer class evidence ``P`` (Eq. 3) from the HAPs of one probe run.

        Args:
            haps: ``{layer: [B, D]}`` HAPs of one probe run.
            top_k: library nodes per input to read (``None``: the network's setting).
            layers: layers to score (``None``: all).

        Returns:
            ``{layer: Tensor[B, C]}``.
        """
        ...


class ConsistencyScore(abc.ABC):
    """A detector score: higher = more suspicious. Subclass it and implement :meth:`fit` and :meth:`score`.

    The class attributes and methods other than :meth:`fit` and :meth:`score` are optional: their
    defaults below are what the detector assumes when a score does not override them.

    Attributes:
        name: the name the score is served under (``"cpl"``, ``"knn"``...).
        requires_training_data: ``fit`` needs the training data, not only the fitted network
            (default ``False``).
        uses_library: the score is computed from the libraries (``libnet evaluate-detectors`` counts the
            library memory for it; default ``False``).
        fuses: the score fuses per-feature values against clean reference data: calibration passes
            :meth:`features` of the clean inputs to :meth:`set_reference` (default ``False``).
        differentiable: :meth:`surrogate` gives a score that autograd can differentiate with respect to
            the activations (and so the input) when the probe keeps the graph (default ``False``: votes,
            nearest neighbours). :meth:`ConsistencyDetector.score
            <libnet_plugin.ConsistencyDetector.score>` then returns scores with a gradient for an input
            that requires grad, which adaptive attacks use (docs/method.md section 15).

    Example:
        >>> class OutputNorm(ConsistencyScore):
        ...     name = "output-norm"
        ...     def fit(self, net, data=None):
        ...         self.fitted_ = True
        ...         return self
        ...     def score(self, net, result):
        ...         self.check_is_fitted()
        ...         return result.outputs.norm(dim=1)
        >>> OutputNorm().config(), OutputNorm().state_dict()
        ({'name': 'output-norm'}, {})
    """

    name: ClassVar[str] = ""
    requires_training_data: ClassVar[bool] = False
    uses_library: ClassVar[bool] = False
    fuses: ClassVar[bool] = False
    differentiable: ClassVar[bool] = False
    #: set by :meth:`fit` (scores that track fitting otherwise override :meth:`check_is_fitted`)
    fitted_: bool = False

    @abc.abstractmethod
    def fit(self, net: FittedNetwork, data: Iterable[Any] | None = None) -> ConsistencyScore:
        """Prepare from the fitted network (and the training data when :attr:`requires_training_data`).

        Refitting forgets everything fitted before (statistics and any clean reference).

        Args:
            net: the fitted library network.
            data: the training data (inputs, or ``(inputs, labels)`` batches); ``None`` for scores that need
                only the network.

        Returns:
            self.
        """

    @abc.abstractmethod
    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """The score of each input of one probe run, higher = more suspicious.

        Args:
            net: the fitted library network.
            result: one probe run of the batch (``net.run(x)``).

        Returns:
            ``Tensor[B]`` of scores.

        Raises:
            NotFittedError: before :meth:`fit`.
        """

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """Per-feature scores (only for scores that :attr:`fuse <fuses>`).

        Args:
            net: the fitted library network.
            result: one probe run of the batch.

        Returns:
            ``Tensor[B, F]``, higher = more suspicious.
        """
        raise NotImplementedError(f"the {self.name!r} score does not fuse features")

    def surrogate(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """A differentiable ``Tensor[B]`` that grows with :meth:`score` (only when :attr:`differentiable`).

        The default is :meth:`score` itself, for scores whose arithmetic autograd follows. A score whose
        value is a step function of the activations (conformal ranks) overrides it with a smooth
        function that rises with it.

        Args:
            net: the fitted library network.
            result: one probe run of the batch, with the autograd graph when gradients are wanted.

        Returns:
            ``Tensor[B]``.
        """
        if not self.differentiable:
            raise NotImplementedError(f"the {self.name!r} score is not differentiable (its value has no useful "
                                      "gradient); attack it through a surrogate of its features instead")
        return self.score(net, result)

    def set_reference(self, features: Tensor) -> Tensor:
        """Store clean reference features (only when :attr:`fuses`).

        Args:
            features: :meth:`features` of clean inputs, ``[N, F]``.

        Returns:
            ``Tensor[N]``, the fused scores of the reference inputs.
        """
        raise NotImplementedError(f"the {self.name!r} score does not fuse features")

    def check_is_fitted(self) -> None:
        """Raise :class:`~libnet_plugin.errors.NotFittedError` unless :meth:`fit` has run."""
        if not self.fitted_:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net) first")

    def config(self) -> dict[str, Any]:
        """JSON-able settings and fitted metadata saved with a detector.

        Returns:
            a dict (default: ``{"name": name}``).
        """
        return {"name": self.name}

    def state_dict(self) -> dict[str, Tensor]:
        """Fitted tensors saved with a detector.

        Returns:
            ``{key: Tensor}`` (default: empty).
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` and :meth:`config` saved (default: refit from the network).

        Args:
            state: the saved :meth:`state_dict`.
            net: the fitted library network the detector is loaded with.
            config: the saved :meth:`config`.
        """
        self.fit(net, None)

    def memory_bytes(self) -> int:
        """Bytes of the tensors this score keeps beyond the library network.

        Returns:
            the byte count (default: that of :meth:`state_dict`).
        """
        return sum(t.numel() * t.element_size() for t in self.state_dict().values())


@runtime_checkable
class ScoreLike(Protocol):
    """The least a plugin's score object must have: ``name``, ``fit(net, data)`` and ``score(net, result)``.

    Example:
        >>> class Constant:
        ...     name = "constant"
        ...     def fit(self, net, data=None):
        ...         return self
        ...     def score(self, net, result):
        ...         return torch.zeros(result.outputs.shape[0])
        >>> isinstance(Constant(), ScoreLike), isinstance(object(), ScoreLike)
        (True, False)
    """

    name: str

    def fit(self, net: Any, data: Any = None) -> Any:
        """Prepare from the fitted network (and the training data).

        Args:
            net: the fitted library network.
            data: the training data, or ``None``.

        Returns:
            anything (ignored).
        """
        ...

    def score(self, net: Any, result: ProbeResult) -> Tensor:
        """The score of each input of one probe run.

        Args:
            net: the fitted library network.
            result: one probe run of the batch.

        Returns:
            ``Tensor[B]``, higher = more suspicious.
        """
        ...


class PluginScore(ConsistencyScore):
    """A :class:`ScoreLike` object that does not subclass :class:`ConsistencyScore`, with the declared defaults.

    Args:
        inner: the plugin's object; :meth:`fit` and :meth:`score` call it.

    Example:
        >>> class Constant:
        ...     name = "constant"
        ...     def fit(self, net, data=None):
        ...         return self
        ...     def score(self, net, result):
        ...         return torch.zeros(len(result.outputs))
        >>> s = as_consistency_score(Constant(), "constant")
        >>> s, s.name, s.fuses
        (PluginScore(<...Constant object at ...>), 'constant', False)
    """

    def __init__(self, inner: ScoreLike):
        self.inner = inner

    @property
    def name(self) -> str:  # type: ignore[override]
        """The plugin object's name.

        Returns:
            ``str(inner.name)``.
        """
        return str(self.inner.name)

    def __repr__(self) -> str:
        return f"PluginScore({self.inner!r})"

    def fit(self, net: FittedNetwork, data: Iterable[Any] | None = None) -> PluginScore:
        self.inner.fit(net, data)
        self.fitted_ = True
        return self

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        return self.inner.score(net, result)


def as_consistency_score(obj: Any, name: str) -> ConsistencyScore:
    """``obj`` as a :class:`ConsistencyScore`: itself, or a :class:`PluginScore` around a :class:`ScoreLike`.

    Args:
        obj: what a ``libnet_consistency_detector`` hook returned.
        name: the detector's name (for the error message).

    Returns:
        a :class:`ConsistencyScore`.

    Raises:
        TypeError: ``obj`` is neither.

    Example:
        >>> from libnet_plugin.detectors import MaxSoftmaxScore
        >>> as_consistency_score(MaxSoftmaxScore(), "msp")
        MaxSoftmaxScore()
        >>> as_consistency_score(42, "answer")
        Traceback (most recent call last):
        ...
        TypeError: the plugin serving the detector 'answer' returned a int, which is not a ...
    """
    if isinstance(obj, ConsistencyScore):
        return obj
    if isinstance(obj, ScoreLike):
        return PluginScore(obj)
    raise TypeError(f"the plugin serving the detector {name!r} returned a {type(obj).__name__}, which is not a "
                    "libnet_plugin.detectors.ConsistencyScore (subclass it, or give the object name, fit(net, data) "
                    "and score(net, result))")


class FusedLayerScore(ConsistencyScore):
    """Base of detectors that compute several features per layer and fuse their conformal p-values.

    Subclasses implement :meth:`_fit` (optional), :meth:`feature_names` and :meth:`features`. The
    :class:`~libnet_plugin.ConsistencyDetector` calls :meth:`fit` with the fitted library network (and the
    training data when :attr:`requires_training_data`), then :meth:`set_reference` with the features of
    clean calibration inputs, then :meth:`score` for new inputs.

    Args:
        layers: layers to use (default: every probed layer).

    Example:
        >>> class Norms(FusedLayerScore):
        ...     name = "norms"
        ...     def feature_names(self):
        ...         return [f"{layer}/norm" for layer in self.fitted_layers()]
        ...     def features(self, net, result):
        ...         return torch.stack([result.haps[k].norm(dim=1) for k in self.fitted_layers()], dim=1)
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(torch.randn(50, 4))
        >>> s = Norms().fit(net)
        >>> s.set_reference(s.features(net, net.run(torch.randn(40, 4)))).shape
        torch.Size([40])
        >>> s.score(net, net.run(torch.randn(3, 4))).shape, s.feature_names()
        (torch.Size([3]), ['0/norm', '2/norm'])
    """

    name: ClassVar[str] = "fused"
    fuses: ClassVar[bool] = True
    differentiable: ClassVar[bool] = True

    #: fitted attributes (set by fit and load; None before)
    layers_: list[str] | None = None

    def __init__(self, layers: Sequence[str] | None = None):
        self.layers = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        self.fusion = ConformalFusion()

    # -- to implement ---------------------------------------------------------------------------
    def _fit(self, net: FittedNetwork, data: Any) -> None:
        """Learn what the features need (class means, node classes...)."""

    def feature_names(self) -> list[str]:
        """Names of the per-layer features, in the order of :meth:`features`.

        Returns:
            ``["<layer>/<feature>", ...]``.
        """
        raise NotImplementedError

    def features(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """Per-feature scores from one probe run (higher = more suspicious).

        Args:
            net: the fitted library network.
            result: one probe run of the batch.

        Returns:
            ``Tensor[B, F]``.
        """
        raise NotImplementedError

    # -- the detector protocol ------------------------------------------------------------------
    def fit(self, net: FittedNetwork, data: Iterable[Any] | None = None) -> FusedLayerScore:
        """Prepare from the fitted network (and the training data when needed); forget any reference.

        Args:
            net: the fitted library network.
            data: the training data when :attr:`requires_training_data`, else ``None``.

        Returns:
            self.
        """
        net.check_fitted()
        if self.requires_training_data and data is None:
            raise ValueError(f"the {self.name!r} detector is fitted on the training data: pass train= to "
                             "ConsistencyDetector or call det.fit(train) before calibrate")
        self.layers_ = check_layers(net, self.layers, self.name)
        self.fusion = ConformalFusion()
        try:
            self._fit(net, data)
        except BaseException:
            self.layers_ = None  # all or nothing: a failed fit leaves the score unfitted
            raise
        return self

    def check_is_fitted(self) -> None:
        """Raise :class:`~libnet_plugin.errors.NotFittedError` unless :meth:`fit` has run."""
        self.fitted_layers()

    def fitted_layers(self) -> list[str]:
        """The layers the score was fitted on.

        Returns:
            the layer names.

        Raises:
            NotFittedError: before :meth:`fit`.
        """
        if self.layers_ is None:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net) first")
        return self.layers_

    def combine(self, p_values: Tensor) -> Tensor:
        """The fused score of per-feature p-values: Fisher's ``-sum log p`` (override to change).

        Args:
            p_values: ``Tensor[B, F]``.

        Returns:
            ``Tensor[B]``.
        """
        return fisher(p_values)

    def combine_on(self, p_values: Tensor, reference: Tensor) -> Tensor:
        """The fused score of ``p_values`` ``[B, F]`` as fitted on clean reference inputs whose own p-values are
        ``reference`` ``[N, F]``: what :meth:`combine` gives after :meth:`set_reference` on those inputs. A
        held-out check that recalibrates on part of the clean data calls it; the default fusion does not
        depend on the reference (override when it does).

        Args:
            p_values: ``Tensor[B, F]``.
            reference: the clean reference inputs' p-values, ``Tensor[N, F]``.

        Returns:
            ``Tensor[B]``.
        """
        return self.combine(p_values)

    def set_reference(self, features: Tensor) -> Tensor:
        """Store the features of clean reference inputs.

        Args:
            features: :meth:`features` of clean inputs, ``[N, F]``.

        Returns:
            ``Tensor[N]``, their fused scores (leave-one-out).
        """
        self.check_is_fitted()
        return self.combine(self.fusion.fit_p_values(features))

    def score(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """Fused score, higher = more suspicious; needs :meth:`set_reference` first.

        Args:
            net: the fitted library network.
            result: one probe run of the batch.

        Returns:
            float32 ``Tensor[B]``.
        """
        self.check_is_fitted()
        return self.combine(self.fusion.p_values(self.features(net, result))).float()

    def surrogate(self, net: FittedNetwork, result: ProbeResult) -> Tensor:
        """The sum over features of their values standardised on the clean reference (differentiable).

        The fused score ``-sum_j log p_j`` is a step function of the features (conformal ranks), so its
        gradient is zero almost everywhere; each ``p_j`` falls as feature ``j`` rises past the clean
        reference, and so does this sum, whose gradient never vanishes. Needs :meth:`set_reference`.

        Args:
            net: the fitted library network.
            result: one probe run of the batch (with its autograd graph).

        Returns:
            float32 ``Tensor[B]``.
        """
        self.check_is_fitted()
        return self.fusion.standardized(self.features(net, result)).sum(dim=1).float()

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able settings and fitted metadata saved with a detector.

        Returns:
            the name, the layers asked for and the fitted layers.
        """
        return {"name": self.name, "layers": self.layers, "layers_": self.layers_}

    def _state(self) -> dict[str, Tensor]:
        return {}

    def _load_state(self, state: Mapping[str, Tensor], net: FittedNetwork) -> None:
        pass

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to save (fitted statistics and the clean reference).

        Returns:
            ``{key: Tensor}``.
        """
        out = {f"fusion/{k}": v for k, v in self.fusion.state_dict().items()}
        out.update(self._state())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], net: FittedNetwork, config: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` and :meth:`config` saved, onto ``net``'s device.

        Args:
            state: the saved :meth:`state_dict`.
            net: the fitted library network the detector is loaded with.
            config: the saved :meth:`config`.
        """
        self.layers_ = check_layers(net, config.get("layers_"), self.name)
        self.fusion = ConformalFusion()
        self.fusion.load_state_dict(layer_state("fusion/", state), device=net.device)
        self._load_state(state, net)
        ref = state.get("fusion/reference")
        if ref is not None:  # the clean reference must be what set_reference stores: [N, F] sorted per feature
            try:
                n_features = len(self.feature_names())
            except NotImplementedError:
                n_features = None
            if (not ref.is_floating_point() or ref.dim() != 2 or ref.shape[0] < 1
                    or (n_features is not None and ref.shape[1] != n_features)
                    or bool((ref[1:] < ref[:-1]).any())):
                raise SaveFormatError(f"the saved clean reference of the {self.name!r} detector is {ref.dtype} of shape "
                                      f"{list(ref.shape)}, expected sorted scores [N, {n_features}] of the layers "
                                      f"{self.layers_} (modified or corrupted)")
