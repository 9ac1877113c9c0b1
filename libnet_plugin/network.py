"""LibraryNetwork: per-layer libraries plus Hebbian readouts on top of any classifier."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import pluggy
import torch
from torch import Tensor

from ._batches import MultiInput, collect, is_one_shot, iter_batches, n_rows, progress_bar
from ._validate import check_int, check_layers
from ._version import __version__
from .errors import LibnetError, LibraryTooLargeWarning, NotFittedError, ShapeMismatchError
from .fitting import (  # noqa: F401  (the fit engine's names stay importable from here)
    CACHE_FALLBACK_BYTES,
    CACHE_SHARE,
    StreamFit,
    check_cache_bytes,
    default_cache_bytes,
    fit_network,
    resolve_thresholds,
    stream_fit,
)
from .library import NodeLibrary
from .metrics import ConfusionAccumulator, agreement_counts, cpl
from .plugins import make_library, make_probe, make_readout
from .probe import ConfigurableProbe, ProbeResult
from .readout import WeightedReadout
from .serialization import load_checked, save_atomic

__all__ = ["DEFAULT_THRESHOLDS", "LibraryNetwork", "stream_fit", "StreamFit", "default_cache_bytes"]

ThresholdSpec = float | Mapping[str, float] | str

#: The default ``thresholds`` of :class:`LibraryNetwork` and :class:`~libnet_plugin.ConsistencyDetector`:
#: ``"auto"`` chooses each layer's theta from the training data so that its library holds a set fraction of
#: the inputs (docs/method.md section 13). A fixed theta is tuned for one model: the cosines between a
#: layer's activation patterns depend on the model and the layer (docs/method.md section 7 lists the values
#: tuned for the paper's MNIST network, which its reproduction passes explicitly).
DEFAULT_THRESHOLDS = "auto"

#: The keyword options of :class:`LibraryNetwork` beyond its named parameters (documented there).
_NETWORK_OPTIONS = ("auto_thresholds", "plugin_manager", "batch_dims")


def _check_network_settings(model: Any, layers: list[str], auto_layers: bool, thresholds: Any, auto_thresholds: Any,
                            batch_dims: Any) -> None:
    """The checks of :class:`LibraryNetwork`'s settings that need no forward pass: layers (or ``"auto"``), the
    thresholds and their ``"auto"`` options together (``ValueError`` naming the setting)."""
    if auto_layers:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"layers='auto' reads a torch.nn.Module's forward pass; name the layers of this "
                            f"{type(model).__name__}")
        if isinstance(thresholds, Mapping) or batch_dims:
            raise ValueError("thresholds={layer: theta} and batch_dims name layers: with them, name the layers "
                             "too (layers='auto' picks them at fit)")
    elif not layers:
        raise ValueError("layers must name at least one layer (or be 'auto')")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {layers}")
    if auto_thresholds is not None and not (isinstance(thresholds, str) and thresholds == "auto"):
        raise ValueError(f"auto_thresholds={auto_thresholds!r} sets how thresholds='auto' chooses theta, but "
                         f"thresholds={thresholds!r} was given: pass thresholds='auto', or drop auto_thresholds")
    if auto_thresholds is not None and not isinstance(auto_thresholds, Mapping):
        raise TypeError(f"auto_thresholds must be a dict of options of thresholds.choose_thresholds, "
                        f"got {type(auto_thresholds).__name__}")


def _pick_auto_layers(net: LibraryNetwork, train: Any) -> None:
    """``layers="auto"``: pick ``net``'s layers from the first non-empty batch of ``train``."""
    if is_one_shot(train):
        raise ValueError("layers='auto' looks at the first training batch before fitting, and this data can "
                         "be iterated only once: pass re-iterable data (a Tensor, Dataset, DataLoader) or "
                         "name the layers")
    first = next((x for x, _ in iter_batches(train, net.batch_size) if n_rows(x)), None)
    if first is None:
        raise ValueError("layers='auto' needs training inputs to pick the layers from; got no input")
    net._resolve_auto_layers(first)


log = logging.getLogger(__name__)


def _resolve_device(device: Any, model: Any) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, torch.nn.Module):
        for t in model.parameters():
            return t.device
    return torch.device("cpu")


def _check_saved_settings(cfg: Any) -> None:
    """The types and required entries of a saved network's settings (else :class:`SaveFormatError`, naming the
    entry), checked before anything is built from them."""
    from .errors import SaveFormatError

    def bad(entry: str, want: str, value: Any) -> SaveFormatError:
        return SaveFormatError(f"the saved network settings are malformed: {entry} should be {want}, got "
                               f"{type(value).__name__} {str(value)[:80]!r} (modified or corrupted)")

    def count(v: Any, minimum: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    if not isinstance(cfg, Mapping):
        raise bad("the settings", "a JSON object", cfg)
    for entry in ("layers", "thresholds", "top_k", "library", "library_options", "readout", "readout_options",
                  "batch_size", "n_classes", "n_train", "input_shape", "library_configs", "readout_configs"):
        if entry not in cfg:
            raise SaveFormatError(f"saved network settings lack the entry {entry!r}")
    layers = cfg["layers"]
    if (not isinstance(layers, list) or not layers or not all(isinstance(l, str) for l in layers)
            or len(set(layers)) != len(layers)):
        raise bad("'layers'", "a list of distinct layer names", layers)
    for entry, minimum in (("top_k", 1), ("batch_size", 1), ("n_classes", 2), ("n_train", 1)):
        if not count(cfg[entry], minimum):
            raise bad(repr(entry), f"an integer >= {minimum}", cfg[entry])
    for entry in ("library", "readout"):
        if not isinstance(cfg[entry], str):
            raise bad(repr(entry), "a name", cfg[entry])
    for entry in ("library_options", "readout_options"):
        if not isinstance(cfg[entry], Mapping):
            raise bad(repr(entry), "a JSON object", cfg[entry])
    for entry in ("auto_thresholds", "probe", "batch_dims"):
        if cfg.get(entry) is not None and not isinstance(cfg[entry], Mapping):
            raise bad(repr(entry), "a JSON object or null", cfg[entry])
    shape = cfg["input_shape"]
    if shape is not None and not (isinstance(shape, list) and all(count(d, 0) for d in shape)):
        raise bad("'input_shape'", "a list of sizes or null", shape)
    thetas = cfg["thresholds"]
    for entry in ("thresholds", "library_configs", "readout_configs"):
        value = cfg[entry]
        if not isinstance(value, Mapping):
            raise bad(repr(entry), "a JSON object with one entry per layer", value)
        missing = [l for l in layers if l not in value]
        if missing:
            raise SaveFormatError(f"the saved network settings are malformed: {entry!r} has no entry for the "
                                  f"layer(s) {missing[:5]} (modified or corrupted)")
    for l in layers:
        if isinstance(thetas[l], bool) or not isinstance(thetas[l], (int, float)):
            raise bad(f"the threshold of layer {l!r}", "a number", thetas[l])
        for entry in ("library_configs", "readout_configs"):
            if not isinstance(cfg[entry][l], Mapping):
                raise bad(f"{entry!r} of layer {l!r}", "a JSON object", cfg[entry][l])


def _check_loaded(layer: str, lib: Any, readout: Any, n_classes: int) -> None:
    """A loaded library and readout agree with each other and hold finite values (else SaveFormatError)."""
    from .errors import SaveFormatError

    problem = None
    dim = getattr(lib, "dim", None)
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        problem = f"its library settings give no layer width (dim {dim!r})"
    elif lib.size < 1:
        problem = "its library has no nodes (a fitted library stores at least its first input)"
    elif isinstance(lib, NodeLibrary) and not bool(torch.isfinite(lib.nodes).all()):
        problem = "its library nodes hold NaN or infinity"
    elif isinstance(readout, WeightedReadout):
        w = readout.weight
        if tuple(w.shape) != (lib.size, n_classes):
            problem = f"its readout is {list(w.shape)} for {lib.size} nodes and {n_classes} classes"
        elif not bool(torch.isfinite(w).all()):
            problem = "its readout weights hold NaN or infinity"
    if problem is not None:
        raise SaveFormatError(f"the saved network's layer {layer!r} is inconsistent: {problem} (modified or corrupted)")


def _check_labels(y: Tensor, n_classes: int) -> None:
    """Labels must be integer class indices ``[B]`` in ``[0, n_classes)``."""
    if y.is_floating_point() or y.dim() != 1:
        raise ValueError(f"labels must be integer class indices of shape [B], got {y.dtype} of shape {list(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, {n_classes}) (the model has {n_classes} classes), got values "
                         f"from {int(y.min())} to {int(y.max())}")


def _thresholds_json(thresholds: Any) -> Any:
    """The ``thresholds`` hyperparameter as JSON (``"auto"``, a number or ``{layer: number}``)."""
    if isinstance(thresholds, str):
        return thresholds
    if isinstance(thresholds, Mapping):
        return {str(k): float(v) for k, v in thresholds.items()}
    return float(thresholds)


def _warn_about_fit(net: Any, fitted: Any) -> None:
    """The warnings of a fit that went through but is of little use: one answer for every input, a constant
    layer, layers with the same activations, a library keeping most of the data (``stacklevel``: fit's caller)."""
    if fitted.answers.numel() and bool((fitted.answers == fitted.answers[0]).all()):
        warnings.warn(f"the model answers class {int(fitted.answers[0])} for every training input: every library "
                      "node is linked to that class, so the layers' predictions and the detectors cannot tell "
                      "inputs apart (an untrained or collapsed model?)", stacklevel=3)
    for l in fitted.constant_layers:
        zero = all(not bool(lib.nodes.any()) for lib in [net.libraries_[l]] if isinstance(lib, NodeLibrary))
        warnings.warn(f"layer {l!r} is constant: its activations are {'all zero' if zero else 'the same'} for "
                      f"every one of the {net.n_train_} training inputs, so its library cannot tell inputs "
                      "apart (whatever its theta); probe another layer (a dead ReLU or a layer the inputs do "
                      "not reach?)", stacklevel=3)
    if fitted.same_haps:
        warnings.warn(f"the probed layers {net.layers} carry the very same activations for every training "
                      "input (one tensor recorded under several names, e.g. a model's output and the layer "
                      "that computes it), so their predictions always agree and CPL is vacuous: probe "
                      "layers that compute different things", stacklevel=3)
    advice = ("lower that layer's theta" if net.auto_thresholds is None else
              "thresholds='auto' chose it: pass a lower theta for that layer, thresholds={layer: theta}")
    if net.auto_thresholds is None:
        advice += " (or use thresholds='auto')"
    for l, size in net.library_sizes_.items():
        if size > 0.5 * net.n_train_ and l not in fitted.constant_layers:
            warnings.warn(f"the library of layer {l!r} keeps {size} of its {net.n_train_} training inputs (more "
                          f"than half) at theta {net.thresholds_[l]:g}: it stores the data rather than a summary "
                          f"of it; {advice}", LibraryTooLargeWarning, stacklevel=3)


class LibraryNetwork:
    """Library networks (Lee, 2019) for chosen layers of a trained classifier.

    For every probed layer a library stores the normalised activation patterns (HAPs) that were novel
    when the training set passed through (cosine to everything stored ``< threshold``); a Hebbian
    readout links the nodes to the model's own answers, so each layer makes its own prediction.

    Args:
        model: a ``torch.nn.Module`` (built in); an ONNX path, ``onnx.ModelProto`` or
            ``onnxruntime.InferenceSession`` with the ONNX adapter installed.
        layers: the layers to probe, in order: ``model.named_modules()`` names for torch, or layer specs
            (``"fc1:input"``: what the module receives; ``"conv1:relu"``: its output after ReLU; see
            :func:`~libnet_plugin.probe.parse_layer_spec`). ``"auto"`` (the default; torch modules): block
            outputs after their activation, picked at :meth:`fit` from the first training batch by the rule of
            :func:`~libnet_plugin.probe.auto_layers` (logged; ``layers`` holds them then, and a saved network
            keeps them).
        thresholds: theta in (0, 1], one for all layers or ``{layer: theta}`` for each; or ``"auto"`` (the
            default, :data:`DEFAULT_THRESHOLDS`: a fixed theta suits one model's layers only) to choose each
            layer's theta from the training data at ``fit`` (see
            :func:`libnet_plugin.thresholds.choose_thresholds`; options in ``auto_thresholds``). Kept
            as given; the theta of each fitted library is in ``thresholds_``.
        top_k: nodes used per prediction (Eq. 3) when a call does not say otherwise.
        device: where libraries live and compute (default: the model's device, else CPU).
        library: library kind served by the ``libnet_library`` hook (``"exact"``).
        library_options: extra settings passed to every library (e.g. ``{"n_units": 1024}``).
        readout: readout kind served by the ``libnet_readout`` hook (``"hebbian"``).
        readout_options: extra settings passed to every readout, for the ``"hebbian"`` readout
            ``{"width": w}``, the width of g in Eq. 2 (default 0.01, the paper's); saved with the network.
        batch_size: batch size used when data is given as a Tensor or a Dataset.
        cache_bytes: memory budget (bytes) for keeping the HAPs of the model's forward pass over the training
            data: when those of all probed layers fit, the model runs **once** and both passes of the fit
            (and ``thresholds="auto"``'s sample) read them; else the second pass reads the batches that fit
            and runs the model on the rest (:func:`~libnet_plugin.fitting.fit_network`). ``"auto"`` (the
            default): a quarter of the memory available when ``fit`` starts (:func:`default_cache_bytes`);
            ``0`` always streams. Not saved; the budget and the passes made are logged (logger
            ``libnet_plugin.network``) and kept in ``cache_bytes_`` and ``n_forward_passes_``.
        **options: the keyword options below (any other name raises ``TypeError``).
        auto_thresholds: options of :func:`libnet_plugin.thresholds.choose_thresholds` (e.g.
            ``{"target": 0.2}``) for ``thresholds="auto"``; with any other ``thresholds`` it raises
            ``ValueError``.
        plugin_manager: a ``pluggy.PluginManager`` from :func:`libnet_plugin.get_plugin_manager`
            (default: the process-wide one).
        batch_dims: ``{layer: dim}``, the dimension of a layer's output that holds the batch, for a
            module that puts it elsewhere without a ``batch_first`` flag the probe reads (see
            :meth:`~libnet_plugin.probe.TorchLayerProbe.set_batch_dims`; the ONNX probe takes it too);
            saved with the network.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> x = torch.randn(64, 4)
        >>> net = LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(x)
        >>> sorted(net.library_sizes_)
        ['0', '2']
        >>> net.predict_scores(x[:5])["2"].shape
        torch.Size([5, 3])
        >>> net.consistency(x[:5]).shape
        torch.Size([5])
    """

    def __init__(self, model: Any, layers: Sequence[str] | str = "auto", thresholds: ThresholdSpec = DEFAULT_THRESHOLDS,
                 top_k: int = 3, device: Any = None, *, library: str = "exact",
                 library_options: Mapping[str, Any] | None = None, readout: str = "hebbian",
                 readout_options: Mapping[str, Any] | None = None, batch_size: int = 256,
                 cache_bytes: int | str = "auto", **options: Any):
        unknown = sorted(set(options) - set(_NETWORK_OPTIONS))
        if unknown:
            raise TypeError(f"LibraryNetwork got unexpected keyword arguments {unknown}; the other options are "
                            f"{list(_NETWORK_OPTIONS)}")
        auto_thresholds, plugin_manager, batch_dims = (options.get(k) for k in _NETWORK_OPTIONS)
        #: layers="auto": the layers are picked (:func:`~libnet_plugin.probe.auto_layers`) from the first batch
        #: that :meth:`fit` (or :meth:`run`) sees; ``layers`` and ``probe`` are set then
        self.auto_layers = isinstance(layers, str) and layers == "auto"
        layers = [] if self.auto_layers else [layers] if isinstance(layers, str) else list(layers)
        _check_network_settings(model, layers, self.auto_layers, thresholds, auto_thresholds, batch_dims)
        self.model = model
        self.layers = layers
        is_auto = isinstance(thresholds, str) and thresholds == "auto"
        self.auto_thresholds = dict(auto_thresholds or {}) if is_auto else None
        # the hyperparameter as given; checked now so that a bad value fails before any pass over data
        self.thresholds = dict(thresholds) if isinstance(thresholds, Mapping) else thresholds
        if not is_auto:
            resolve_thresholds(thresholds, layers)
        self.top_k = check_int(top_k, "top_k")
        self.device = _resolve_device(device, model)
        self.library = library
        self.library_options = dict(library_options or {})
        self.readout = readout
        self.readout_options = dict(readout_options or {})
        self.batch_size = check_int(batch_size, "batch_size")
        self.cache_bytes = check_cache_bytes(cache_bytes)
        self.plugin_manager = plugin_manager
        self.probe: Any = make_probe(model, layers, self.device, plugin_manager) if layers else None
        self.batch_dims = {str(k): v for k, v in batch_dims.items()} if batch_dims else None
        if self.batch_dims:
            if not callable(getattr(self.probe, "set_batch_dims", None)):
                raise TypeError(f"batch_dims= is read by the torch and ONNX probes; the {type(self.probe).__name__} probe of "
                                "this model does not take it")
            self.probe.set_batch_dims(self.batch_dims)

    # ------------------------------------------------------------------ settings and state
    def __repr__(self) -> str:
        sizes = self.library_sizes_ if self.is_fitted else None
        return (f"LibraryNetwork(layers={self.layers}, thresholds={self.thresholds!r}, top_k={self.top_k}, "
                f"device={str(self.device)!r}, library={self.library!r}, sizes={sizes})")

    @property
    def is_fitted(self) -> bool:
        return hasattr(self, "libraries_")

    def check_fitted(self) -> None:
        """Raise :class:`~libnet_plugin.errors.NotFittedError` unless :meth:`fit` (or :meth:`load`) has run."""
        if not self.is_fitted:
            raise NotFittedError("this LibraryNetwork is not fitted yet; call fit(train) before using it")

    @property
    def library_sizes_(self) -> dict[str, int]:
        """``{layer: number of library nodes}``."""
        self.check_fitted()
        return {l: self.libraries_[l].size for l in self.layers}

    @property
    def thresholds_(self) -> dict[str, float]:
        """``{layer: theta}`` of the fitted libraries (the thetas ``"auto"`` chose, or those given)."""
        self.check_fitted()
        return {l: float(self.libraries_[l].threshold) for l in self.layers}

    def new_library(self, layer: str, threshold: float, **extra: Any) -> Any:
        """An empty library for ``layer`` at theta ``threshold``, of this network's kind and options."""
        settings = {**self.library_options, **extra, "threshold": threshold, "device": self.device,
                    "layer": layer}
        return make_library(self.library, settings, self.plugin_manager)

    def _new_readout(self, n_classes: int, **extra: Any) -> Any:
        settings = {**self.readout_options, **extra, "n_classes": n_classes, "device": self.device}
        return make_readout(self.readout, settings, self.plugin_manager)

    # ------------------------------------------------------------------ probing
    def run(self, x: Tensor | MultiInput) -> ProbeResult:
        """One probe run of the model over a batch ``x`` ``[B, ...]``: its outputs and every layer's HAPs.

        Raises:
            TypeError: ``x`` is not a tensor.
            ShapeMismatchError: ``x`` has another per-input shape than the training inputs.
        """
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        shape = self.input_shape_ if self.is_fitted else None
        if shape is not None and isinstance(x, Tensor) and tuple(x.shape[1:]) != tuple(shape):
            raise ShapeMismatchError(f"input batch has shape {tuple(x.shape)} (per input {tuple(x.shape[1:])}); "
                                     f"the network was fitted on inputs of shape [B, {', '.join(map(str, shape))}]")
        self._resolve_auto_layers(x)
        return self.probe.run(x)

    def _resolve_auto_layers(self, x: Tensor | MultiInput) -> None:
        """``layers="auto"``: pick the layers from the batch ``x`` (once) and build the probe for them."""
        if self.layers:
            return
        from .probe import auto_layers

        layers = auto_layers(self.model, x)
        log.info("layers='auto' picked %s", layers)
        self.probe = make_probe(self.model, layers, self.device, self.plugin_manager)
        self.layers = layers

    # ------------------------------------------------------------------ fitting
    def fit(self, train: Any, *, progress: bool | None = None, cache_dtype: Any = None) -> LibraryNetwork:
        """Build the libraries (first pass) and the Hebbian readouts (cached HAPs or a second pass).

        Args:
            train: the training inputs, in the order that defines the libraries: a Tensor ``[N, ...]``,
                an ``(X, y)`` pair, a Dataset, a DataLoader, or any iterable of batches (labels are
                ignored: the readout uses the model's own answers). A one-shot iterator works only
                while the HAPs fit ``cache_bytes``.
            progress: show tqdm progress bars (default: only on a terminal).
            cache_dtype: ``"float16"`` or ``"bfloat16"`` keeps the HAPs for the second pass (and
                ``thresholds="auto"``'s sample) in that dtype: twice as many fit ``cache_bytes``, at the cost
                of rounding the readouts' cosines (docs/scale.md, section 6); ``None``: float32.

        Returns:
            ``self``, with ``libraries_``, ``readouts_``, ``library_sizes_``, ``n_classes_``, ``n_train_``,
            ``hap_dims_``, ``input_shape_``, ``n_forward_passes_`` (runs of the model over the training data)
            and ``cache_bytes_`` (the budget used). All or nothing: when fitting raises, an earlier fit stays.
        """
        if not self.layers:  # layers="auto": picked from the first training batch
            _pick_auto_layers(self, train)
        done = fit_network(self, train, self._new_readout, progress, cache_dtype)
        fitted = done.fitted
        # all or nothing: the network's fitted state changes only here, once everything above succeeded
        self.adopt_fitted(done.libraries, {l: r[0] for l, r in fitted.readouts.items()},
                          n_classes=fitted.n_classes, n_train=fitted.n_train, input_shape=fitted.input_shape)
        if done.report is not None:
            self.auto_thresholds_report_ = done.report
        self.n_forward_passes_ = done.forward_passes
        self.cache_bytes_ = done.budget
        log.info("fit: %d forward pass%s of the model over the %d training inputs (%s)", done.forward_passes,
                 "" if done.forward_passes == 1 else "es", self.n_train_, done.how)
        _warn_about_fit(self, fitted)
        return self

    def adopt_fitted(self, libraries: Mapping[str, Any], readouts: Mapping[str, Any], *, n_classes: int,
                     n_train: int, input_shape: Sequence[int] | None) -> LibraryNetwork:
        """Take libraries and readouts fitted elsewhere (e.g. one threshold of a sweep); return self.

        Args:
            libraries / readouts: one per probed layer, as the library and readout hooks return them.
            n_classes / n_train / input_shape: what the fit saw (classes, inputs, per-input shape).
        """
        missing = [l for l in self.layers if l not in libraries or l not in readouts]
        if missing:
            raise ValueError(f"adopt_fitted needs a library and a readout for every probed layer; missing {missing}")
        self.libraries_ = {l: libraries[l] for l in self.layers}
        self.readouts_ = {l: readouts[l] for l in self.layers}
        self.n_classes_ = int(n_classes)
        self.n_train_ = int(n_train)
        self.input_shape_ = tuple(input_shape) if input_shape is not None else None
        return self

    @property
    def hap_dims_(self) -> dict[str, int]:
        """``{layer: features per input}`` of the HAPs the libraries were fitted on."""
        self.check_fitted()
        return {l: int(self.libraries_[l].dim) for l in self.layers}

    # ------------------------------------------------------------------ prediction
    def scores_from_haps(self, haps: Mapping[str, Tensor], top_k: int | None = None,
                         layers: Sequence[str] | None = None) -> dict[str, Tensor]:
        """Eq. 3 evidence per layer from HAPs already computed (e.g. by a guard reusing a forward).

        Args:
            haps: ``{layer: Tensor[B, D]}`` as a probe returns them.
            top_k: nodes per prediction (default: the network's ``top_k``).
            layers: the layers to score (default: all probed layers); ``haps`` needs only these.
        """
        self.check_fitted()
        k = self.top_k if top_k is None else int(top_k)
        return {l: self.readouts_[l].scores(self.libraries_[l].similarity(haps[l]), k)
                for l in self._layer_subset(layers)}

    def exemplars_from_haps(self, haps: Mapping[str, Tensor], k: int = 5,
                            layers: Sequence[str] | None = None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Training indices ``{layer: LongTensor[B, k]}`` and cosines ``{layer: Tensor[B, k]}`` of the
        ``k`` nodes nearest to each HAP (most similar first; ``k`` clipped to the library size)."""
        if int(k) < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.check_fitted()
        idx, sims = {}, {}
        for l in self._layer_subset(layers):
            h = self.libraries_[l].similarity(haps[l])
            sims[l], top = h.topk(min(int(k), h.shape[1]), dim=1)
            idx[l] = self.libraries_[l].node_indices.to(top.device)[top]
        return idx, sims

    def _layer_subset(self, layers: Sequence[str] | None) -> list[str]:
        return check_layers(layers, self.layers)

    def _collect(self, x: Any, fn) -> Any:
        """Apply ``fn(probe_result)`` -> dict/Tensor to a Tensor or every batch of an iterable; concatenate."""
        self.check_fitted()
        return collect(x, self.run, fn, self.batch_size)

    def predict_scores(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer class evidence P (Eq. 3).

        Args:
            x: inputs ``[B, ...]`` (or any data ``fit`` accepts; batches are concatenated).
            top_k: nodes per prediction (default: the network's ``top_k``).

        Returns:
            ``{layer: Tensor[B, C]}`` on the network's device.
        """
        return self._collect(x, lambda r: self.scores_from_haps(r.haps, top_k))

    def predict(self, x: Any, top_k: int | None = None) -> dict[str, Tensor]:
        """Per-layer predicted class: ``{layer: LongTensor[B]}`` (argmax of :meth:`predict_scores`)."""
        return {l: p.argmax(dim=1) for l, p in self.predict_scores(x, top_k).items()}

    def consistency(self, x: Any, top_k: int = 20) -> Tensor:
        """CPL (Eq. 5): mean cosine between the layers' softmax(P) over all layer pairs.

        Returns:
            ``Tensor[B]`` in [0, 1]; low values mean the layers disagree (suspicious input).
        """
        if len(self.layers) < 2:
            raise ValueError(f"consistency needs at least two probed layers, this network has {self.layers}")
        return self._collect(x, lambda r: cpl(self.scores_from_haps(r.haps, top_k)))

    def evaluate(self, test: Any, top_k: int | None = None, *, progress: bool | None = None) -> dict[str, dict[str, float]]:
        """Agreement of each layer's prediction with the model, and accuracy against labels.

        Args:
            test: data as in :meth:`fit`; labels, when present, give accuracies.
            top_k: nodes per prediction (default: the network's ``top_k``).

        Returns:
            ``{layer: {"top1_agreement", "top3_agreement", "accuracy", "model_accuracy", "n"}}`` where
            top-1 agreement is the fraction of inputs whose argmax P equals the model's answer, top-3
            whether the model's answer is among the 3 largest entries of P, and the accuracies are
            ``nan`` when no labels were given.
        """
        self.check_fitted()
        counts = {l: [0, 0, 0] for l in self.layers}
        n = n_lab = model_correct = 0
        for x, y in progress_bar(iter_batches(test, self.batch_size), "evaluate", progress):
            if n_rows(x) == 0:
                continue
            if y is not None:
                _check_labels(y, self.n_classes_)
            r = self.run(x)
            ans = r.answers
            for l, p in self.scores_from_haps(r.haps, top_k).items():
                top1, top3, correct = agreement_counts(p, ans, y)
                counts[l][0] += top1
                counts[l][1] += top3
                counts[l][2] += correct or 0
            n += n_rows(x)
            if y is not None:
                n_lab += n_rows(x)
                model_correct += int((ans == y.to(ans.device)).sum())
        if n == 0:
            raise ValueError("evaluate received no inputs (empty data)")
        nan = float("nan")
        return {l: {"top1_agreement": c[0] / n, "top3_agreement": c[1] / n,
                    "accuracy": c[2] / n_lab if n_lab else nan,
                    "model_accuracy": model_correct / n_lab if n_lab else nan, "n": n}
                for l, c in counts.items()}

    def confusion_index(self, test: Any, top_k: int | None = None, *, progress: bool | None = None) -> dict[str, Tensor]:
        """Confusion index (Eq. 4) per layer: ``{layer: Tensor[C, C]}``.

        Row d1, column d2 is ``CA(d1, d2) / CA(d1, d1)`` over test inputs of true class d1 that the
        layer predicts correctly; the diagonal is shown as 0, a class with no such input gives NaN.
        ``test`` must carry labels.
        """
        self.check_fitted()
        acc = {l: ConfusionAccumulator(self.n_classes_, self.device) for l in self.layers}
        n = 0
        for x, y in progress_bar(iter_batches(test, self.batch_size), "confusion index", progress):
            if y is None:
                raise ValueError("confusion_index needs labels: pass (X, y), a labelled Dataset or DataLoader")
            if n_rows(x) == 0:
                continue
            for l, p in self.scores_from_haps(self.run(x).haps, top_k).items():
                acc[l].update(p, y)
            n += n_rows(x)
        if n == 0:
            raise ValueError("confusion_index received no inputs (empty data)")
        return {l: a.result() for l, a in acc.items()}

    def exemplars(self, x: Tensor, k: int = 5, *, return_similarities: bool = False) -> Any:
        """Training inputs behind the ``k`` library nodes most similar to each input, per layer.

        Args:
            x: inputs ``[B, ...]``.
            k: nodes per input (clipped to the library size).
            return_similarities: also return the cosines.

        Returns:
            ``{layer: LongTensor[B, k]}`` indices into the training data (in the order ``fit`` saw it),
            most similar first; with ``return_similarities`` a pair ``(indices, cosines)`` of such dicts.
        """
        self.check_fitted()
        idx, sims = self.exemplars_from_haps(self.run(x).haps, k)
        return (idx, sims) if return_similarities else idx

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict[str, Any]:
        """The JSON-able settings saved with the network (what :meth:`from_state` reads back)."""
        return {
            "layers": self.layers, "thresholds": self.thresholds_, "thresholds_param": _thresholds_json(self.thresholds),
            "auto_thresholds": self.auto_thresholds, "top_k": self.top_k,
            "library": self.library, "library_options": self.library_options,
            "readout": self.readout, "readout_options": self.readout_options,
            "batch_size": self.batch_size, "n_classes": self.n_classes_, "n_train": self.n_train_,
            "input_shape": list(self.input_shape_) if self.input_shape_ is not None else None,
            "hap_dims": self.hap_dims_,
            "library_configs": {l: self.libraries_[l].config() for l in self.layers},
            "readout_configs": {l: self.readouts_[l].config() for l in self.layers},
            "versions": {"libnet_plugin": __version__, "torch": torch.__version__},
            "probe": self.probe.config() if isinstance(self.probe, ConfigurableProbe) else None,
            **({"batch_dims": self.batch_dims} if self.batch_dims else {}),
        }

    def state_tensors(self) -> dict[str, Tensor]:
        """All tensors of the fitted network, keyed ``library/<i>/<name>`` and ``readout/<i>/<name>`` where
        ``i`` is the layer's position in ``layers`` (layer names may contain any character)."""
        self.check_fitted()
        out = {}
        for i, l in enumerate(self.layers):
            out.update({f"library/{i}/{k}": v for k, v in self.libraries_[l].state_dict().items()})
            out.update({f"readout/{i}/{k}": v for k, v in self.readouts_[l].state_dict().items()})
        return out

    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
        """Save the fitted network to one safetensors file (settings as JSON metadata), atomically.

        The model itself is not saved; pass it again to :meth:`load`. With ``key`` (bytes or str) the file
        is signed (HMAC-SHA256 over its settings and tensor digests): ``load(path, model, key=key)`` then
        refuses any edit made without the key.
        """
        save_atomic(path, self.state_tensors(), kind="LibraryNetwork", config=self.config(), key=key)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, map_location: Any = None, device: Any = None,
             plugin_manager: pluggy.PluginManager | None = None, key: bytes | str | None = None) -> LibraryNetwork:
        """Load a network saved by :meth:`save` onto ``model`` (a torch model, or an ONNX model with the
        ONNX adapter; layers are matched by name).

        Args:
            path: the saved file.
            model: the model the libraries were built from (or an equivalent export of it).
            map_location / device: where to put the libraries (e.g. ``"cpu"`` for a file saved on GPU).
            key: the key the file was signed with (``save(path, key=...)``): a file that is unsigned or
                does not verify is refused (:class:`~libnet_plugin.errors.SaveIntegrityError`). Without
                it, a signed file is checked against its digests only.
        """
        tensors, cfg = load_checked(path, kind="LibraryNetwork", key=key)
        return cls.from_state(tensors, cfg, model, device=device if device is not None else map_location,
                               plugin_manager=plugin_manager)

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], cfg: dict[str, Any], model: Any, device: Any = None,
                    plugin_manager: pluggy.PluginManager | None = None) -> LibraryNetwork:
        """Rebuild a fitted network from saved tensors and :meth:`config` settings, onto ``model``."""
        from .errors import SaveFormatError

        _check_saved_settings(cfg)
        # files written before thresholds_ existed hold only the fitted thetas: they stand for the hyperparameter
        thresholds = cfg.get("thresholds_param", cfg["thresholds"])
        settings = dict(thresholds=thresholds, top_k=cfg["top_k"],
                        auto_thresholds=cfg.get("auto_thresholds") if thresholds == "auto" else None,
                        library=cfg["library"],
                        library_options=cfg["library_options"], readout=cfg["readout"],
                        readout_options=cfg["readout_options"], batch_size=cfg["batch_size"],
                        batch_dims=cfg.get("batch_dims"))
        try:
            net = cls(model, cfg["layers"], device=device, plugin_manager=plugin_manager, **settings)
        except LibnetError:
            raise  # e.g. LayerNotFoundError: the model given lacks a saved layer
        except (TypeError, ValueError) as exc:
            raise SaveFormatError(f"the saved network settings are not valid: {exc}") from exc
        return _restore_fitted(net, tensors, cfg)


def _restore_fitted(net: LibraryNetwork, tensors: dict[str, Tensor], cfg: dict[str, Any]) -> LibraryNetwork:
    """Fill a freshly built ``net`` with the saved probe settings, libraries and readouts of a file
    (:meth:`LibraryNetwork.from_state`); ``SaveFormatError`` names what does not fit."""
    from .errors import SaveFormatError

    lib_cfgs, ro_cfgs = cfg["library_configs"], cfg["readout_configs"]
    if cfg.get("probe") and isinstance(net.probe, ConfigurableProbe):
        try:
            net.probe.restore(cfg["probe"])
        except LibnetError:
            raise
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise SaveFormatError(f"the saved probe settings are malformed (modified or corrupted): {exc!r}") from exc
    libraries, readouts = {}, {}
    for i, l in enumerate(net.layers):
        lc = {k: v for k, v in lib_cfgs[l].items() if k not in ("name", "threshold")}
        rc = {k: v for k, v in ro_cfgs[l].items() if k not in ("name", "n_classes")}
        try:
            lib = net.new_library(l, float(cfg["thresholds"][l]), **lc)
            ro = net._new_readout(cfg["n_classes"], **rc)
            for obj, prefix in ((lib, f"library/{i}/"), (ro, f"readout/{i}/")):
                part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                try:
                    obj.load_state_dict(part)
                except KeyError as exc:
                    raise SaveFormatError(f"saved network lacks the tensor {prefix}{exc.args[0]} of layer {l!r}") from exc
        except SaveFormatError:
            raise
        except (LibnetError, TypeError, ValueError, IndexError, RuntimeError, OverflowError) as exc:
            raise SaveFormatError(f"the saved library or readout of layer {l!r} does not fit its settings "
                                  f"(modified or corrupted): {exc}") from exc
        _check_loaded(l, lib, ro, int(cfg["n_classes"]))
        libraries[l], readouts[l] = lib, ro
    return net.adopt_fitted(libraries, readouts, n_classes=cfg["n_classes"], n_train=cfg["n_train"],
                            input_shape=cfg["input_shape"])
