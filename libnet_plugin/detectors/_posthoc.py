"""What the post-hoc peers (energy, maxlogit, gen, react-energy, vim, knn-normalized) read of a model.

Two things, both found from the fitted network and checked against the model's own outputs:

* **the logits** (:func:`resolve_logits`, :func:`logits_of`): ``"outputs"`` (the model's outputs) or a
  probed layer. ``"auto"`` takes the last probed layer that is a ``torch.nn.Linear`` with one output per
  class (the classifier, read before any log-softmax the model applies), else the outputs. A layer must
  give the outputs' softmax (checked on every batch); outputs that are log-probabilities (every row's
  ``logsumexp`` is 0) are refused, because energy and max-logit are constant on them.
* **the penultimate features** (:func:`resolve_penultimate`): the input of the model's last linear
  layer, as a probed layer's output (flattened) with an optional ReLU applied. The last linear layer is the
  last ``torch.nn.Linear`` of ``model.named_modules()`` (registration order) with one output per class,
  or the module named by ``classifier``; the probed layer and activation are the first pair, trying the
  layers from last to first and no activation before ReLU, for which ``act(h) W^T + b`` gives the model's
  outputs (softmax-equal) on the first training batch. When no pair does (a pooling or other function
  between the probed layer and the classifier, a model that is not a torch module), fitting refuses and
  says what to probe.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._batches import iter_batches, n_rows
from ..distributed import gather_all, world
from ..errors import LayerNotFoundError, LibnetError, NotFittedError, ShapeMismatchError
from ..probe import ProbeResult, TorchLayerProbe
from ._features import require_tensor
from .api import ConsistencyScore

ACTIVATIONS = ("auto", "none", "relu")


class PeerNotApplicableError(LibnetError, TypeError, ValueError):
    """A post-hoc peer cannot read what it needs from this model (no last linear layer it can find, no probed
    layer that feeds it, log-probability outputs without a probed logits layer). ``libnet evaluate-detectors``
    leaves such a peer out of its default comparison, saying why; named explicitly, it fails.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> log_probs = torch.log_softmax(torch.randn(2, 3), dim=1)
        >>> logits_of(ProbeResult(outputs=log_probs, haps={}), "outputs", "energy")
        Traceback (most recent call last):
        ...
        libnet_plugin.detectors._posthoc.PeerNotApplicableError: the 'energy' detector needs logits, but ...
    """


def check_logits_source(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"logits must be 'auto', 'outputs' or a probed layer's name, got {value!r}")
    return value


def check_activation(value: Any) -> str:
    if value not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {value!r}")
    return str(value)


def _torch_modules(net: Any) -> dict[str, nn.Module]:
    probe = getattr(net, "probe", None)
    if not isinstance(probe, TorchLayerProbe):
        return {}
    specs = getattr(probe, "specs", {})
    # a layer that reads a module's input or applies an activation does not give that module's output
    return {l: m for l, m in probe.modules.items()
            if l not in specs or (specs[l].where == "output" and specs[l].activation is None)}


def resolve_logits(net: Any, source: str, what: str) -> str:
    """``"outputs"`` or the probed layer that gives the logits (see the module's docstring)."""
    if source == "outputs":
        return "outputs"
    if source != "auto":
        layers = list(getattr(net, "layers", []) or [])
        if source not in layers:
            raise LayerNotFoundError(f"the {what!r} detector was asked for logits={source!r}, which the library "
                                     f"network does not probe; probed layers: {layers}")
        return source
    if net is None:
        return "outputs"
    modules = _torch_modules(net)
    n_classes = getattr(net, "n_classes_", None)
    for layer in reversed(list(net.layers)):
        m = modules.get(layer)
        if isinstance(m, nn.Linear) and m.out_features == n_classes:
            return layer
    return "outputs"


def _same_softmax(a: Tensor, b: Tensor) -> bool:
    """Whether rows ``a`` and ``b`` ``[B, C]`` have the same softmax (log-softmax within float32 rounding)."""
    la, lb = torch.log_softmax(a.detach().double(), dim=1), torch.log_softmax(b.detach().double(), dim=1)
    scale = max(1.0, float(a.detach().abs().max()), float(b.detach().abs().max())) if a.numel() else 1.0
    return bool(((la - lb).abs() <= 1e-3 * scale).all())


def logits_of(result: ProbeResult, source: str, what: str, auto: bool = False) -> Tensor:
    """The logits ``[B, C]`` (float32) of one probe run from ``source`` (see :func:`resolve_logits`).

    With ``auto`` (``logits="auto"`` resolved to the outputs) and log-probability outputs, the last probed
    layer of the outputs' shape whose softmax is the outputs' is taken (a model whose probe does not tell
    module types, such as an ONNX one).

    Args:
        result: one probe run.
        source: ``"outputs"`` or the name of a probed layer.
        what: the detector's name (for error messages).
        auto: ``source`` was resolved from ``logits="auto"``.

    Returns:
        float32 ``Tensor[B, C]``.

    Raises:
        PeerNotApplicableError: the outputs are log-probabilities and no probed layer gives their logits.
        LayerNotFoundError: ``source`` is a layer the probe run lacks.

    Example:
        >>> from libnet_plugin.probe import ProbeResult
        >>> z = torch.tensor([[1.0, 2.0, 3.0]])
        >>> logits_of(ProbeResult(outputs=z, haps={}), "outputs", "energy")
        tensor([[1., 2., 3.]])
    """
    outputs = result.outputs
    if source == "outputs":
        z = outputs.float()
        if z.numel() and bool((torch.logsumexp(z.detach().double(), dim=1).abs() < 1e-5).all()):
            if auto:
                for h in reversed(list(result.haps.values())):
                    if h.shape == outputs.shape and _same_softmax(h, outputs):
                        return h.float()
            raise PeerNotApplicableError(f"the {what!r} detector needs logits, but the model's outputs are log-probabilities "
                             "(every row's logsumexp is 0), on which it is constant: probe the layer that computes "
                             "the logits (the last linear layer) and pass logits=<that layer>")
        return z
    if source not in result.haps:
        raise LayerNotFoundError(f"the {what!r} detector reads the logits from layer {source!r}, which this probe "
                                 f"run lacks; layers: {list(result.haps)}")
    z = result.haps[source].float()
    if z.shape != outputs.shape:
        raise ShapeMismatchError(f"the {what!r} detector reads the logits from layer {source!r}, of shape "
                                 f"{tuple(z.shape)}; the model's outputs have shape {tuple(outputs.shape)}")
    if not _same_softmax(z, outputs):
        raise ValueError(f"the {what!r} detector reads the logits from layer {source!r}, whose softmax is not the "
                         "model's outputs' (a function after it changes more than a log-softmax): pass "
                         "logits='outputs' or the layer that computes the logits")
    return z


def apply_activation(h: Tensor, activation: str) -> Tensor:
    return torch.relu(h) if activation == "relu" else h


@dataclass
class Penultimate:
    """The resolved penultimate features: ``act(haps[layer])`` is the input of ``classifier`` (``weight``, ``bias``)."""

    layer: str
    activation: str
    classifier: str | None
    weight: Tensor | None  # [C, D] float32 (None when not needed and not found)
    bias: Tensor | None    # [C]

    def features(self, result: ProbeResult, what: str) -> Tensor:
        if self.layer not in result.haps:
            raise LayerNotFoundError(f"the {what!r} detector reads layer {self.layer!r}, which this probe run lacks; "
                                     f"layers: {list(result.haps)}")
        h = apply_activation(result.haps[self.layer].float(), self.activation)
        if self.weight is not None and h.shape[1] != self.weight.shape[1]:
            raise ShapeMismatchError(f"the {what!r} detector: layer {self.layer!r} gives {h.shape[1]} features, the "
                                     f"classifier {self.classifier!r} takes {self.weight.shape[1]}")
        return h

    def logits(self, h: Tensor) -> Tensor:
        assert self.weight is not None and self.bias is not None
        return h @ self.weight.to(h.device).T + self.bias.to(h.device)


def find_classifier(net: Any, name: str | None, what: str) -> tuple[str, nn.Linear]:
    """The model's last linear layer: ``name``, else the last ``nn.Linear`` with one output per class."""
    probe = getattr(net, "probe", None)
    if not isinstance(probe, TorchLayerProbe):
        raise PeerNotApplicableError(f"the {what!r} detector reads the weights of the model's last linear layer, which needs a "
                        f"torch.nn.Module model (the forward-hook probe); this network's probe is "
                        f"{type(probe).__name__}")
    modules = dict(probe.runner.named_modules())
    if name is not None:
        m = modules.get(name)
        if not isinstance(m, nn.Linear):
            raise LayerNotFoundError(f"the {what!r} detector was asked for classifier={name!r}, which is not a "
                                     f"torch.nn.Linear of the model ({type(m).__name__ if m is not None else 'absent'})")
        return name, m
    n_classes = net.n_classes_
    found = [(n, m) for n, m in modules.items() if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not found:
        raise PeerNotApplicableError(f"the {what!r} detector needs the model's last linear layer (a torch.nn.Linear with "
                         f"{n_classes} outputs, one per class), and the model has none; name it with classifier=")
    return found[-1]


def resolve_penultimate(net: Any, result: ProbeResult, layer: str | None, activation: str,
                        classifier: str | None, what: str, need_weights: bool) -> Penultimate:
    """The penultimate features of the module docstring, checked on one probe run ``result``."""
    if layer is not None and layer not in net.layers:
        raise LayerNotFoundError(f"the {what!r} detector was asked for layer={layer!r}, which the library network "
                                 f"does not probe; probed layers: {list(net.layers)}")
    if not need_weights and layer is not None and activation != "auto":
        return Penultimate(layer, activation, None, None, None)
    cname, lin = find_classifier(net, classifier, what)
    weight = lin.weight.detach().float().to(net.device)
    bias = (lin.bias.detach().float() if lin.bias is not None else torch.zeros(lin.out_features)).to(net.device)
    layers = [layer] if layer is not None else [l for l in reversed(list(net.layers))
                                                 if result.haps[l].shape[1] == lin.in_features]
    acts = ["none", "relu"] if activation == "auto" else [activation]
    tried = []
    for l in layers:
        h = result.haps[l].float()
        if h.shape[1] != lin.in_features:
            raise ShapeMismatchError(f"the {what!r} detector: layer {l!r} gives {h.shape[1]} features, the "
                                     f"classifier {cname!r} takes {lin.in_features}")
        for a in acts:
            if _same_softmax(apply_activation(h, a) @ weight.T + bias, result.outputs):
                return Penultimate(l, a, cname, weight, bias)
            tried.append(f"{l} ({'after ReLU' if a == 'relu' else 'as is'})")
    raise PeerNotApplicableError(
        f"the {what!r} detector needs the input of the model's last linear layer {cname!r} ({lin.in_features} -> "
        f"{lin.out_features}) as a probed layer's output: "
        + (f"none reproduces the model's outputs through it (tried {', '.join(tried)})" if tried else
           f"no probed layer has {lin.in_features} features (probed: {list(net.layers)})")
        + ". Probe the module whose output feeds it (pooling or reshaping between them cannot be undone), or "
          "name it with layer= and activation=")


def collect_penultimate(net: Any, data: Iterable[Any] | None, layer: str | None, activation: str,
                        classifier: str | None, what: str, need_weights: bool) -> tuple[Penultimate, Tensor]:
    """Resolve the penultimate features on the first training batch and gather them all ``[N, D]`` (float32)."""
    net.check_fitted()
    if data is None:
        raise ValueError(f"the {what!r} detector is fitted on the training data: pass train= to "
                         "ConsistencyDetector or call det.fit(train) before calibrate")
    pen: Penultimate | None = None
    parts: list[Tensor] = []
    for x, _ in iter_batches(data, net.batch_size):
        if n_rows(x) == 0:
            continue
        r = net.run(x)
        if pen is None:
            pen = resolve_penultimate(net, r, layer, activation, classifier, what, need_weights)
        parts.append(pen.features(r, what).detach())
    if pen is None and world() is None:
        raise ValueError(f"the {what!r} detector received no training inputs (empty data)")
    feats = gather_all(torch.cat(parts) if parts else torch.empty(0), net.device, f"training inputs for the {what!r} "
                       "detector")
    assert pen is not None
    return pen, feats


def penultimate_config(pen: Penultimate | None) -> dict[str, Any]:
    return {} if pen is None else {"layer_": pen.layer, "activation_": pen.activation, "classifier_": pen.classifier}


def penultimate_state(pen: Penultimate | None) -> dict[str, Tensor]:
    if pen is None or pen.weight is None or pen.bias is None:
        return {}
    return {"classifier/weight": pen.weight, "classifier/bias": pen.bias}


def load_penultimate(state: Any, net: Any, config: Any, what: str) -> Penultimate:
    layer = config.get("layer_")
    if layer not in net.layers:
        raise LayerNotFoundError(f"the saved {what!r} detector reads layer {layer!r}, which the library network does "
                                 f"not probe; probed layers: {list(net.layers)}")
    w = state.get("classifier/weight")
    b = require_tensor(state, "classifier/bias", what) if w is not None else None
    return Penultimate(str(layer), check_activation(config.get("activation_")), config.get("classifier_"),
                       None if w is None else w.float().to(net.device), None if b is None else b.float().to(net.device))


def percentile(values: Tensor, p: float) -> Tensor:
    """The ``p``-th percentile (0-100) of all ``values``, interpolated linearly as ``numpy.percentile``."""
    flat = values.reshape(-1)
    n = flat.numel()
    pos = (n - 1) * p / 100.0
    lo, hi = int(pos // 1), min(int(pos // 1) + 1, n - 1)
    a = flat.kthvalue(lo + 1).values.double()
    b = flat.kthvalue(hi + 1).values.double() if hi != lo else a
    return a + (b - a) * (pos - lo)


def optional_name(value: Any, what: str) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise ValueError(f"{what} must be None or a name, got {value!r}")
    return value


class LogitScore(ConsistencyScore):
    """Base of the scores that read the logits only (:func:`resolve_logits`); subclasses implement :meth:`from_logits`."""

    differentiable: ClassVar[bool] = True

    #: fitted attributes (set by fit and load; None before)
    logits_: str | None = None

    def __init__(self, logits: str = "auto"):
        self.logits = check_logits_source(logits)

    def fit(self, net: Any, data: Iterable[Any] | None = None) -> LogitScore:
        """Nothing to learn: find where the logits are.

        Args:
            net: the fitted library network (may be ``None`` with ``logits="outputs"``).
            data: ignored.

        Returns:
            self.
        """
        self.logits_ = resolve_logits(net, self.logits, self.name)
        return self

    def check_is_fitted(self) -> None:
        if self.logits_ is None:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net) first")

    def from_logits(self, z: Tensor) -> Tensor:
        """The score of each row of logits.

        Args:
            z: logits ``[B, C]``.

        Returns:
            ``Tensor[B]``, higher = more suspicious.
        """
        raise NotImplementedError

    def score(self, net: Any, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        assert self.logits_ is not None
        return self.from_logits(logits_of(result, self.logits_, self.name, auto=self.logits == "auto")).float()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "logits": self.logits, "logits_": self.logits_}

    def load_state_dict(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        source = config.get("logits_")
        self.logits_ = resolve_logits(net, str(source), self.name) if source else resolve_logits(net, self.logits,
                                                                                                  self.name)


class PenultimateScore(ConsistencyScore):
    """Base of the scores on the penultimate features (:func:`resolve_penultimate`), fitted on the training data.

    Subclasses implement :meth:`_fit_features` (from the training features ``[N, D]``), :meth:`from_features`,
    and save what they fit through :meth:`_state` / :meth:`_load_state` / :meth:`_config`.

    Args:
        layer: the probed layer whose output feeds the classifier (default: found).
        activation: ``"auto"`` (found), ``"none"`` or ``"relu"`` applied to that layer's output.
        classifier: the model's last linear layer (default: the last ``nn.Linear`` with one output per class).
    """

    requires_training_data: ClassVar[bool] = True
    #: the score recomputes logits with the classifier's weights (else it needs only the features)
    needs_weights: ClassVar[bool] = True

    #: fitted attributes (set by fit and load; None before)
    pen_: Penultimate | None = None

    def __init__(self, layer: str | None = None, activation: str = "auto", classifier: str | None = None):
        self.layer = optional_name(layer, "layer")
        self.activation = check_activation(activation)
        self.classifier = optional_name(classifier, "classifier")

    def _fit_features(self, net: Any, pen: Penultimate, feats: Tensor) -> None:
        raise NotImplementedError

    def from_features(self, pen: Penultimate, h: Tensor) -> Tensor:
        """The score of each row of penultimate features.

        Args:
            pen: where the penultimate features are and the last linear layer's weights.
            h: penultimate features ``[B, D]``.

        Returns:
            ``Tensor[B]``, higher = more suspicious.
        """
        raise NotImplementedError

    def _state(self) -> dict[str, Tensor]:
        return {}

    def _load_state(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        pass

    def _config(self) -> dict[str, Any]:
        return {}

    def fit(self, net: Any, data: Iterable[Any] | None = None) -> PenultimateScore:
        """Find the penultimate features on the training data and fit the score's statistics on them.

        Args:
            net: the fitted library network.
            data: the training data.

        Returns:
            self.
        """
        self.pen_ = None
        pen, feats = collect_penultimate(net, data, self.layer, self.activation, self.classifier, self.name,
                                         self.needs_weights)
        self._fit_features(net, pen, feats)
        self.pen_ = pen
        return self

    def check_is_fitted(self) -> None:
        if self.pen_ is None:
            raise NotFittedError(f"the {self.name!r} detector is not fitted; call fit(net, train) first")

    def score(self, net: Any, result: ProbeResult) -> Tensor:
        self.check_is_fitted()
        assert self.pen_ is not None
        return self.from_features(self.pen_, self.pen_.features(result, self.name)).float()

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "layer": self.layer, "activation": self.activation, "classifier": self.classifier,
                **self._config(), **penultimate_config(self.pen_)}

    def state_dict(self) -> dict[str, Tensor]:
        if self.pen_ is None:
            return {}
        return {**penultimate_state(self.pen_), **self._state()}

    def load_state_dict(self, state: Mapping[str, Tensor], net: Any, config: Mapping[str, Any]) -> None:
        pen = load_penultimate(state, net, config, self.name)
        self._load_state(state, net, config)
        self.pen_ = pen


__all__: Sequence[str] = []
