"""A drop-in adversarial / out-of-domain detector for inference code, calibrated on clean data only.

:class:`ConsistencyDetector` wraps a fitted :class:`~libnet_plugin.LibraryNetwork` and one consistency
score served by the ``libnet_consistency_detector`` hook (``"library-fusion"`` by default; the paper's
``"cpl"``, the library-based ``"library-margin"`` and ``"library-distance"``, and the baselines ``"msp"``,
``"mahalanobis"``, ``"knn"`` of :mod:`libnet_plugin.detectors`; any third-party plugin). :meth:`ConsistencyDetector.calibrate` sets the
decision threshold from clean inputs only, and :meth:`ConsistencyDetector.guard` turns the model into a
module that returns its output and the flags from ONE forward pass (the detector reuses the activations
the model computes anyway).

Example:
    >>> import torch
    >>> from torch import nn
    >>> import libnet_plugin as lnp
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    >>> train, clean = torch.randn(400, 8), torch.randn(200, 8)
    >>> det = lnp.ConsistencyDetector.from_model(model, train, layers=["0", "2"], thresholds=0.9,
    ...                                          method="library-margin").calibrate(clean, fpr=0.05)
    >>> det.score(clean[:4]).shape, det.predict(clean[:4]).dtype
    (torch.Size([4]), torch.bool)
    >>> guarded = det.guard()
    >>> out = guarded(clean[:4])
    >>> out.output.shape, out.flagged.shape
    (torch.Size([4, 3]), torch.Size([4]))
"""

from __future__ import annotations

import copy
import math
import os
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import pluggy
import torch
from torch import Tensor, nn

from ._batches import MultiInput, as_inputs, input_tensors, iter_batches, n_rows
from ._eval_view import EvalView
from .detectors.api import ConsistencyScore
from .distributed import gather_all, world
from .errors import LayerNotFoundError, LibnetError, NonFiniteError, NotFittedError, SaveFormatError, ShapeMismatchError
from .network import LibraryNetwork
from .plugins import make_detector
from .probe import ProbeResult, TorchLayerProbe, check_inputs_finite
from .serialization import load_checked, save_atomic

__all__ = ["ConsistencyDetector", "DetectorGuard", "GuardOutput", "ModelChangedError", "model_fingerprint"]

_KIND = "ConsistencyDetector"
#: held while a detector builds (or checks) the eval-mode view of its model for the guard
_VIEW_LOCK = threading.Lock()


class ModelChangedError(LibnetError, ValueError):
    """The model's weights or layers differ from those the detector was fitted on.

    Example:
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
        >>> det = lnp.ConsistencyDetector.from_model(model, torch.randn(50, 4), layers=["0", "2"], thresholds=0.9,
        ...                                          method="cpl").calibrate(torch.randn(40, 4), fpr=0.1)
        >>> with torch.no_grad():
        ...     _ = model[0].weight.add_(1.0)
        >>> det.score(torch.randn(2, 4))
        Traceback (most recent call last):
        ...
        libnet_plugin.consistency_detector.ModelChangedError: the model changed since the detector was fitted ...
    """


class GuardOutput(NamedTuple):
    """What :class:`DetectorGuard` returns for a batch.

    Attributes:
        output: the model's output ``[B, C]`` (rows of rejected non-finite inputs are NaN).
        flagged: ``BoolTensor[B]``, True where the detector flags the input.
        score: ``Tensor[B]``, the detector's score (higher = more suspicious; ``inf`` for non-finite input).

    Example:
        >>> out = GuardOutput(output=torch.zeros(2, 3), flagged=torch.tensor([False, True]),
        ...                   score=torch.tensor([0.5, 9.0]))
        >>> out.flagged.tolist(), out.output.shape
        ([False, True], torch.Size([2, 3]))
    """

    output: Tensor
    flagged: Tensor
    score: Tensor


# --------------------------------------------------------------------------------------------------
# model fingerprints
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: Any) -> list[list[Any]] | None:
    """A cheap fingerprint of a torch model's parameters and buffers: ``[[name, shape, sum, sum of squares]]``.

    Computed in float64; ``None`` for models that are not ``torch.nn.Module`` (ONNX sessions carry their
    weights inside the file). Weights that are neither parameters nor buffers but are in the model's
    ``state_dict`` (the packed weights of quantised modules, e.g. from ``quantize_dynamic``) are included
    too, dequantised, named ``key[i]`` (the ``i``-th tensor the key holds).

    Example:
        >>> model_fingerprint(nn.Linear(2, 1, bias=False).requires_grad_(False).apply(
        ...     lambda m: m.weight.fill_(1.0) if isinstance(m, nn.Linear) else None))
        [['weight', [1, 2], 2.0, 2.0]]
    """
    if not isinstance(model, nn.Module):
        return None
    out = []
    with torch.no_grad():
        named = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in named + _packed_tensors(model, {n for n, _ in named}):
            d = (t.dequantize() if t.is_quantized else t).detach().double()
            out.append([name, list(t.shape), float(d.sum()), float((d * d).sum())])
    return out


def _packed_tensors(model: nn.Module, seen: set[str]) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` of the ``state_dict`` entries that are not parameters or buffers: quantised tensors,
    tuples of tensors and packed-parameter objects (``torch.ScriptObject``), unpacked; named ``key[i]``, or
    ``key[]`` for a tensor entry (only for modules that hold packed parameters)."""
    if not any(isinstance(v, torch.ScriptObject) for m in model.modules() for v in vars(m).values()):
        return []  # the usual model: its state_dict holds its parameters and buffers only

    def flat(value: Any, name: str) -> list[tuple[str, Tensor]]:
        if isinstance(value, Tensor):
            return [(name, value)]
        if isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
            try:
                value = value.__getstate__()
            except RuntimeError:
                return []
        if isinstance(value, (tuple, list)):
            return [item for i, v in enumerate(value) for item in flat(v, f"{name}[{i}]")]
        return []  # a dtype, a number, ...

    out = []
    for key, value in model.state_dict(keep_vars=True).items():
        if key not in seen:
            out += flat(value, key) if not isinstance(value, Tensor) else [(f"{key}[]", value)]
    return out


#: attribute under which a wrapper keeps the model: ``torch.compile`` (``OptimizedModule``) and
#: ``nn.DataParallel`` / ``DistributedDataParallel``
_WRAPPER_ATTRS = ("_orig_mod", "module")


def _wrapper_prefix(model: Any) -> str:
    """The prefix the wrappers around ``model`` add to its module names: ``"_orig_mod."`` (``torch.compile``),
    ``"module."`` (``nn.DataParallel``, ``DistributedDataParallel``), both when nested, ``""`` for a bare model."""
    prefix = ""
    while True:
        if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            prefix, model = prefix + "_orig_mod.", model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            prefix, model = prefix + "module.", model.module
        else:
            return prefix


def _strip_wrappers(names: Sequence[str]) -> list[str]:
    """``names`` without the wrapper prefixes (``_orig_mod.``, ``module.``) that all of them share."""
    names = list(names)
    while names:
        atom = names[0].split(".", 1)[0]
        if atom not in _WRAPPER_ATTRS or not all(n.startswith(atom + ".") for n in names):
            return names
        names = [n[len(atom) + 1:] for n in names]
    return names


def _apply_prefix_map(name: str, prefix_map: Mapping[str, str]) -> str:
    """``name`` with its longest prefix in ``prefix_map`` replaced (``""`` matches every name)."""
    for old in sorted(prefix_map, key=len, reverse=True):
        if name.startswith(old):
            return prefix_map[old] + name[len(old):]
    return name


def _fingerprint_diff(saved: Sequence[Sequence[Any]], now: Sequence[Sequence[Any]]) -> str | None:
    """Describe the first difference between two fingerprints, or ``None`` when they match.

    Names are compared without the wrapper prefixes they all share (``_orig_mod.``, ``module.``), so a
    model and its ``torch.compile`` / ``DataParallel`` wrapper have the same fingerprint. Packed weights
    (``key[i]`` names) are compared only when ``saved`` has them (a saved fingerprint may lack them).
    """
    if not any("[" in r[0] for r in saved):
        now = [r for r in now if "[" not in r[0]]
    a = dict(zip(_strip_wrappers([r[0] for r in saved]), saved))
    b = dict(zip(_strip_wrappers([r[0] for r in now]), now))
    if a.keys() != b.keys():
        missing, extra = sorted(a.keys() - b.keys()), sorted(b.keys() - a.keys())
        return f"tensors missing now: {missing[:5]}, new tensors: {extra[:5]}"
    for name, ra in a.items():
        rb = b[name]
        if list(ra[1]) != list(rb[1]):
            return f"{name!r} had shape {list(ra[1])}, now {list(rb[1])}"
        for i, what in ((2, "sum"), (3, "sum of squares")):
            x, y = float(ra[i]), float(rb[i])
            if not math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-6):
                return f"the {what} of {name!r} changed from {x:.9g} to {y:.9g}"
    return None


def _layer_renames(saved: Sequence[str], model: Any, prefix_map: Mapping[str, str] | None) -> dict[str, str]:
    """How the saved layer names read in ``model``: ``{saved name: name in model}`` for the names that change.

    With ``prefix_map``, its prefixes are replaced. Otherwise, when the saved names are not all modules of a
    torch ``model``, the wrapper prefixes they share are dropped and ``model``'s own added (a detector
    fitted on ``torch.compile(m)`` or ``nn.DataParallel(m)`` moves to ``m`` and back).
    """
    def base(name: str) -> str:
        return name.rpartition("#")[0] if "#" in name else name

    if prefix_map is not None:
        if not isinstance(prefix_map, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in prefix_map.items()):
            raise TypeError(f"prefix_map must map saved name prefixes (str) to prefixes in the model (str), "
                            f"got {prefix_map!r}")
        new = [_apply_prefix_map(n, prefix_map) for n in saved]
    elif isinstance(model, nn.Module):
        modules = {n for n, _ in model.named_modules() if n}
        if all(base(n) in modules for n in saved):
            return {}
        new = [_wrapper_prefix(model) + n for n in _strip_wrappers(saved)]
        if not all(base(n) in modules for n in new):
            return {}  # the probe names what is missing
    else:
        return {}
    return {old: n for old, n in zip(saved, new) if old != n}


def _prefix_hint(saved: Any, model: nn.Module) -> dict[str, str] | None:
    """A ``prefix_map`` under which every saved layer name is a module of ``model``, if one is found."""
    if not isinstance(saved, list) or not saved or not all(isinstance(n, str) for n in saved):
        return None
    names = [n for n, _ in model.named_modules() if n]
    known = set(names)
    first = saved[0].split("#")[0]
    for name in names:
        if name.endswith("." + first):
            prefix = name[: -len(first)]
            if all(prefix + n.split("#")[0] in known for n in saved):
                return {"": prefix}
    return None


def _rename_config(cfg: dict[str, Any], renames: Mapping[str, str]) -> dict[str, Any]:
    """A copy of a saved detector's settings with its layer names replaced (lists of names, dicts keyed by them)."""
    def rename(value: Any) -> Any:
        if isinstance(value, list):
            return [renames.get(v, v) if isinstance(v, str) else v for v in value]
        if isinstance(value, dict):
            return {renames.get(k, k): v for k, v in value.items()}
        return value

    cfg = dict(cfg)
    net = dict(cfg["network"])
    for key in ("layers", "thresholds", "thresholds_param", "hap_dims", "library_configs", "readout_configs"):
        if key in net:
            net[key] = rename(net[key])
    cfg["network"] = net
    if isinstance(cfg.get("settings"), dict) and "layers" in cfg["settings"]:
        cfg["settings"] = {**cfg["settings"], "layers": rename(cfg["settings"]["layers"])}
    if isinstance(cfg.get("scorer"), dict):
        cfg["scorer"] = {k: rename(v) if k != "name" else v for k, v in cfg["scorer"].items()}
    return cfg


def _conformal_rank(n: int, fpr: float) -> int:
    """1-based rank of the threshold among ``n`` sorted clean scores: ``ceil((n + 1)(1 - fpr))``."""
    return math.ceil((n + 1) * (1.0 - fpr))


def _calibration_rank(n: int, fpr: float) -> int:
    """:func:`_conformal_rank` of ``n`` clean scores, or ``ValueError`` when ``n`` is too few for ``fpr``."""
    rank = _conformal_rank(n, fpr)
    if n == 0 or rank > n:
        need = math.ceil(1.0 / fpr) - 1 if n else 1
        raise ValueError(f"calibrate needs at least {max(need, 2)} clean inputs for fpr={fpr:g} (the threshold is "
                         f"the ceil((n + 1)(1 - fpr))-th smallest clean score), got {n}")
    return rank


def _score_finite_rows(x: Tensor | MultiInput, finite: Tensor,
                       score_rows: Callable[[Any], tuple[Tensor, Tensor | None]], n_classes: int, device: Any,
                       want_outputs: bool) -> tuple[Tensor, Tensor | None]:
    """Scores ``[B]`` (and outputs ``[B, C]``) of a batch with non-finite rows under ``on_nonfinite="flag"``:
    ``inf`` (and NaN outputs) where ``finite`` is False, and the model never sees those rows; ``score_rows``
    scores the others."""
    scores = torch.full((n_rows(x),), float("inf"), device=device)
    outputs = torch.full((n_rows(x), n_classes), float("nan"), device=device) if want_outputs else None
    keep = finite.nonzero().flatten()
    if keep.numel():
        kept, kept_outputs = score_rows(x[keep])
        scores[keep.to(scores.device)] = kept.to(scores.device)
        if outputs is not None and kept_outputs is not None:
            outputs[keep.to(outputs.device)] = kept_outputs.to(outputs.device, outputs.dtype)
    return scores, outputs


def _score_each_row(x: Tensor | MultiInput, score_row: Callable[[Any], tuple[Tensor, Tensor | None]],
                    n_classes: int, device: Any, want_outputs: bool) -> tuple[Tensor, Tensor | None]:
    """Scores (and outputs) of a batch whose activations or outputs overflowed, scored row by row with
    ``score_row``; a single row scores ``inf`` with NaN outputs."""
    if n_rows(x) == 1:
        nan = torch.full((1, n_classes), float("nan"), device=device)
        return torch.full((1,), float("inf"), device=device), (nan if want_outputs else None)
    rows = [score_row(x[i:i + 1]) for i in range(n_rows(x))]
    scores = torch.cat([r[0].to(device) for r in rows])
    return scores, (torch.cat([r[1].to(device) for r in rows]) if want_outputs else None)


def _check_fpr(fpr: Any) -> float:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not (0.0 < float(fpr) < 1.0):
        raise ValueError(f"fpr must be a number in the open interval (0, 1), got {fpr!r}")
    return float(fpr)


def _finite_rows(x: Tensor | MultiInput) -> Tensor | None:
    """``BoolTensor[B]``: rows whose floating inputs are all finite; ``None`` when no input is floating."""
    floats = [t for t in input_tensors(x) if t.is_floating_point()]
    if not floats:
        return None
    if all(bool(torch.isfinite(t.sum())) for t in floats):  # one pass: a NaN or inf makes the sum non-finite
        return torch.ones(floats[0].shape[0], dtype=torch.bool, device=floats[0].device)
    rows = [torch.isfinite(t).reshape(t.shape[0], -1 if t.shape[0] else 0).all(dim=1) for t in floats]
    return torch.stack(rows).all(dim=0)


def _check_saved_detector(path: Any, cfg: Mapping[str, Any]) -> None:
    """The types and required entries of a saved detector's own settings (else :class:`SaveFormatError`);
    the network's settings are checked by :meth:`LibraryNetwork.from_state`."""
    def bad(entry: str, want: str) -> SaveFormatError:
        value = cfg.get(entry)
        return SaveFormatError(f"{str(path)!r}: the saved detector setting {entry!r} should be {want}, got "
                               f"{type(value).__name__} {str(value)[:80]!r} (modified or corrupted)")

    for entry in ("network", "method", "settings"):
        if entry not in cfg:
            raise SaveFormatError(f"{str(path)!r}: saved detector settings lack the entry {entry!r}")
    if not isinstance(cfg["network"], Mapping):
        raise bad("network", "a JSON object")
    if not isinstance(cfg["method"], str) or not cfg["method"]:
        raise bad("method", "a detector name")
    if not isinstance(cfg["settings"], Mapping):
        raise bad("settings", "a JSON object")
    if cfg.get("scorer") is not None and not isinstance(cfg["scorer"], Mapping):
        raise bad("scorer", "a JSON object or null")
    if not isinstance(cfg.get("scorer_fitted", False), bool):
        raise bad("scorer_fitted", "true or false")
    if cfg.get("on_nonfinite", "flag") not in ("flag", "raise"):
        raise bad("on_nonfinite", "'flag' or 'raise'")
    if cfg.get("calibration") is not None and not isinstance(cfg["calibration"], Mapping):
        raise bad("calibration", "a JSON object or null")
    fingerprint = cfg.get("fingerprint")
    if fingerprint is not None and not (isinstance(fingerprint, list) and all(
            isinstance(r, list) and len(r) == 4 and isinstance(r[0], str) and isinstance(r[1], list)
            and all(isinstance(d, int) and not isinstance(d, bool) for d in r[1])
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in r[2:]) for r in fingerprint)):
        raise bad("fingerprint", "a list of [name, shape, sum, sum of squares] or null")


def _packed_slots(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(module, attribute)`` of every packed-parameter object (``torch.ScriptObject``) the model holds: a
    quantised module's weights, replaced by a new object when they change."""
    return [(m, k) for m in model.modules() for k, v in vars(m).items() if isinstance(v, torch.ScriptObject)]


def _tensor_versions(model: nn.Module, packed: Sequence[tuple[nn.Module, str]] = ()) -> tuple[tuple[int, int], ...]:
    """Identity and version of every parameter and buffer, and for a model with packed parameters (``packed``,
    from :func:`_packed_slots`) the identity of those objects and of every module: equal as long as no weight
    was touched or replaced."""
    versions = tuple((id(t), t._version) for t in list(model.parameters()) + list(model.buffers()))
    if not packed:
        return versions
    return (versions + tuple((id(getattr(m, k, None)), -1) for m, k in packed)
            + tuple((id(m), -2) for m in model.modules()))


class _ModelWatch:
    """Notices when a model's weights change after a detector was fitted on it.

    :meth:`record` keeps the model's :func:`model_fingerprint` and the identity and version of its tensors;
    :meth:`check` compares the versions (cheap) and, when a tensor was touched or replaced, the
    fingerprints, raising :class:`ModelChangedError` when they differ.

    Attributes:
        fingerprint: the recorded fingerprint (``None``: nothing recorded, or a model that is not torch).
    """

    def __init__(self) -> None:
        self.fingerprint: list[list[Any]] | None = None
        self._versions: tuple | None = None
        self._packed: list[tuple[nn.Module, str]] = []

    def record(self, model: Any, fingerprint: list[list[Any]] | None = None) -> None:
        """Record ``model`` (with ``fingerprint``: that one, e.g. read from a file, instead of the model's)."""
        self.fingerprint = model_fingerprint(model) if fingerprint is None else fingerprint
        torch_model = self.fingerprint is not None and isinstance(model, nn.Module)
        self._packed = _packed_slots(model) if torch_model else []
        self._versions = _tensor_versions(model, self._packed) if torch_model else None

    def check(self, model: Any) -> None:
        """Raise :class:`ModelChangedError` if ``model``'s weights differ from the recorded ones."""
        if self.fingerprint is None or not isinstance(model, nn.Module):
            return
        if _tensor_versions(model, self._packed) == self._versions:
            return  # fast path: no tensor was replaced or modified in place
        diff = _fingerprint_diff(self.fingerprint, model_fingerprint(model))
        if diff is not None:
            if model.training:
                cause = ("the model is in training mode, so each of its forward passes outside the detector "
                         "updates its batch-norm statistics and a refit would not last: call model.eval() "
                         "when you are done training, then refit the LibraryNetwork and the detector")
            else:
                cause = "the libraries no longer describe it: refit the LibraryNetwork and the detector"
            raise ModelChangedError(f"the model changed since the detector was fitted ({diff}); {cause}")
        self._packed = _packed_slots(model)
        self._versions = _tensor_versions(model, self._packed)


def _check_input_shape(shape: Sequence[int] | None, x: Tensor | MultiInput) -> None:
    """Raise :class:`ShapeMismatchError` when a tensor batch's per-input shape is not ``shape`` (``None``: any)."""
    if shape is not None and isinstance(x, Tensor) and tuple(x.shape[1:]) != tuple(shape):
        raise ShapeMismatchError(f"input batch has shape {tuple(x.shape)} (per input {tuple(x.shape[1:])}); "
                                 f"the detector was fitted on inputs of shape [B, {', '.join(map(str, shape))}]")


def _score_with_graph(net: LibraryNetwork, scorer: ConsistencyScore, x: Tensor, exact: bool,
                      probe: TorchLayerProbe | None = None) -> tuple[Tensor, Tensor]:
    """The score (``exact``) or the surrogate of one batch, and the model's outputs, with the graph to ``x``
    (``probe``: the probe to run, default the network's)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"a score with a gradient needs a torch.Tensor batch, got {type(x).__name__}")
    _check_input_shape(net.input_shape_, x)
    check_inputs_finite(x, "an input batch scored with a gradient")
    if not isinstance(net.probe, TorchLayerProbe):
        raise TypeError(f"the {type(net.probe).__name__} probe does not keep the autograd graph; scores "
                        "with a gradient need the torch probe")
    r = (probe or net.probe).run(x, grad=True)
    smooth = scorer.surrogate(net, r)
    if not exact:
        return smooth, r.outputs
    value = scorer.score(net, r)
    if not value.requires_grad:  # a step function of the activations: pass the surrogate's gradient on
        value = value.detach().to(smooth.dtype) + (smooth - smooth.detach())
    finite = torch.isfinite(value)
    return torch.where(finite, value, torch.full_like(value, float("inf"))).float(), r.outputs


def _eval_view_probe(probe: Any, model: Any, cached: tuple | None) -> tuple | None:
    """``(probe, view, view probe)``: the torch ``probe`` on an eval-mode view of ``model`` (see
    :mod:`libnet_plugin._eval_view`), so that the guard's forward passes run in eval mode whatever another
    thread does to ``model.training``. ``cached`` (an earlier result) is returned while the model's module
    tree is unchanged. ``None`` (the network's own probe is used) for another probe (a subclass may hold the
    model elsewhere), an exported or compiled model, or a model the view cannot cover (view probe ``None``)."""
    if (type(probe) is not TorchLayerProbe or not isinstance(model, nn.Module) or probe.model is not model
            or probe.exported or probe.runner is not model):  # an export has no modes; compiled: the view can't
        return None
    if cached is not None and cached[0] is probe and (cached[1] is None or cached[1].sync()):
        return cached
    with _VIEW_LOCK:  # the first call, or the model's module tree changed: build the view (again)
        view = EvalView.of(model)
        view_probe = None
        if view is not None:
            view_probe = copy.copy(probe)  # shares copied_layers: both learn which layers need copies
            view_probe.model = view_probe.runner = view.root  # the runner: what the probe's forward calls
            view_probe._encoders = {k: view.views[id(m)] for k, m in probe._encoders.items()}
            view_probe.modules = {name: view.views[id(m)] for name, m in probe.modules.items()}
            view_probe._base_modules = {name: view.views[id(m)] for name, m in probe._base_modules.items()}
        return probe, view, view_probe


# --------------------------------------------------------------------------------------------------
# the detector
# --------------------------------------------------------------------------------------------------


_TRAIN_DEPRECATED = ("ConsistencyDetector(..., train=...) fits inside the constructor and is deprecated: use "
                     "ConsistencyDetector.from_model(model, train, layers=...), or ConsistencyDetector(net, ...)"
                     ".fit(train) for a LibraryNetwork")


def _check_detector_settings(net: Any, method: Any, on_nonfinite: Any, network: Mapping[str, Any]) -> None:
    """The detector's own settings, and no ``network`` settings (layers, thresholds, ...) beside a built
    ``LibraryNetwork`` (``ValueError`` naming them)."""
    if on_nonfinite not in ("flag", "raise"):
        raise ValueError(f"on_nonfinite must be 'flag' or 'raise', got {on_nonfinite!r}")
    if not isinstance(method, str) or not method:
        raise TypeError(f"method must be a detector name (str), got {method!r}")
    given = [k for k, v in network.items() if v is not None and not (k == "network_options" and not v)]
    if isinstance(net, LibraryNetwork) and given:
        raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only used when building from a "
                         "model; this detector was given a LibraryNetwork, which already has its layers, thresholds "
                         "and device")


def _network_from_model(model: Any, layers: Sequence[str] | None, thresholds: Any, train: Any, device: Any,
                        network_options: Mapping[str, Any] | None,
                        plugin_manager: pluggy.PluginManager | None) -> LibraryNetwork:
    """The (unfitted) :class:`LibraryNetwork` a detector built from a model uses; ``thresholds=None``: the
    network's default."""
    if train is None:
        raise ValueError("building a ConsistencyDetector from a model needs the training data: use "
                         "ConsistencyDetector.from_model(model, train, layers=...)")
    options = dict(network_options or {})
    if thresholds is not None and "thresholds" in options:
        raise ValueError(f"thresholds={thresholds!r} and network_options={{'thresholds': {options['thresholds']!r}}} "
                         "both set the thresholds: pass one")
    if thresholds is not None:
        options["thresholds"] = thresholds
    return LibraryNetwork(model, "auto" if layers is None else layers, device=device, plugin_manager=plugin_manager,
                          **options)


#: The score a ConsistencyDetector uses when no method is given (chosen on development splits, see
#: docs/method.md section 16); the paper's CPL stays available as ``method="cpl"``.
DEFAULT_METHOD = "library-fusion"


class ConsistencyDetector:
    """Flag inputs on which the layers of a trained classifier disagree (adversarial or out of domain).

    Build it on a :class:`~libnet_plugin.LibraryNetwork` (fitted, or fitted by :meth:`fit`), or from a model
    in one call with :meth:`from_model`. :meth:`calibrate` then sets the decision threshold from clean
    data only. Scores are higher for more suspicious inputs (like pytorch-ood's detectors).

    Args:
        net: a fitted (or not yet fitted) ``LibraryNetwork``. A model is accepted with ``train`` only for
            the deprecated one-call form (use :meth:`from_model`).
        layers, thresholds, device, network_options: the network :meth:`from_model` builds (see there;
            ``layers`` defaults to ``"auto"``); given with a ``LibraryNetwork`` they raise ``ValueError``.
        method: the score, by name, served by the ``libnet_consistency_detector`` hook:
            ``"library-fusion"`` (the default, the project's recommended detector: per-layer library
            distances and the model's confidence fused conformally; it needs :meth:`calibrate` before
            scoring), ``"cpl"`` (the paper's Eq. 5), ``"library-margin"``, ``"library-distance"``,
            ``"msp"``, ``"mahalanobis"``, ``"knn"``, or a third-party name.
        settings: keyword settings of the score (e.g. ``{"top_k": 20}`` for CPL).
        train: deprecated (``FutureWarning``): fits in the constructor; use :meth:`from_model`, or
            ``ConsistencyDetector(net).fit(train)``.
        on_nonfinite: what :meth:`score`, :meth:`predict` and the guard do with inputs holding NaN or
            infinity, and with finite inputs whose activations or outputs overflow (a half-precision
            model): ``"flag"`` (default: score ``inf``, flagged, per row; the model is not run on
            non-finite inputs) or ``"raise"`` (:class:`~libnet_plugin.errors.NonFiniteError`).
            :meth:`calibrate` and :meth:`fit` always raise: clean data must be finite. Whatever this
            setting, a score that comes out NaN or infinite is reported as ``inf`` and flagged.
        plugin_manager: a ``pluggy.PluginManager`` (default: the network's, else the process-wide one).
        progress: show progress bars while fitting (default: only on a terminal).

    Attributes:
        net: the library network.
        scorer: the score object returned by the hook.
        threshold_: the calibrated threshold (inputs with ``score > threshold_`` are flagged).
        fpr_: the false-positive rate asked for at calibration.
        n_calibration_: number of clean inputs used to calibrate.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
        >>> net = LibraryNetwork(model, ["0", "2"], thresholds=0.9).fit(torch.randn(400, 8))
        >>> det = ConsistencyDetector(net).calibrate(torch.randn(100, 8), fpr=0.1)
        >>> det.predict(torch.randn(5, 8)).shape
        torch.Size([5])
    """

    def __init__(self, net: Any, layers: Sequence[str] | None = None, thresholds: Any = None, *,
                 method: str = DEFAULT_METHOD, settings: Mapping[str, Any] | None = None, train: Any = None,
                 device: Any = None, network_options: Mapping[str, Any] | None = None,
                 on_nonfinite: str = "flag", plugin_manager: pluggy.PluginManager | None = None,
                 progress: bool | None = None):
        network = {"layers": layers, "thresholds": thresholds, "device": device, "network_options": network_options}
        _check_detector_settings(net, method, on_nonfinite, network)
        if not isinstance(net, LibraryNetwork):
            net = _network_from_model(net, layers, thresholds, train, device, network_options, plugin_manager)
        if train is not None:
            warnings.warn(_TRAIN_DEPRECATED, FutureWarning, stacklevel=2)
        self.net: LibraryNetwork = net
        self.method = method
        self.settings = dict(settings or {})
        self.on_nonfinite = on_nonfinite
        self.plugin_manager = plugin_manager if plugin_manager is not None else net.plugin_manager
        self.progress = progress
        self.scorer: ConsistencyScore = make_detector(method, self.settings, self.plugin_manager)
        self._scorer_fitted = False
        self._watch = _ModelWatch()
        if train is not None:
            self.fit(train)
        elif net.is_fitted:
            self._watch.record(net.model)

    @classmethod
    def from_model(cls, model: Any, train: Any, layers: Sequence[str] | None = None,
                   **options: Any) -> ConsistencyDetector:
        """Build a :class:`LibraryNetwork` on ``model`` and fit it and the detector on ``train``, in one call.

        ``from_model(model, train, layers=...)`` is ``ConsistencyDetector(LibraryNetwork(model, layers, ...),
        ...).fit(train)``; :meth:`calibrate` comes next.

        Args:
            model: a ``torch.nn.Module`` (an ONNX model with the ONNX adapter).
            train: training data, as :meth:`LibraryNetwork.fit` accepts it.
            layers: the layers to probe; ``None`` (the default): ``"auto"``, block outputs after their
                activation (:func:`~libnet_plugin.probe.auto_layers`).
            **options: the network's ``thresholds`` (a number, ``{layer: theta}`` or ``"auto"``, the default;
                see :func:`libnet_plugin.thresholds.choose_thresholds`), ``device`` and ``network_options``
                (other ``LibraryNetwork`` keywords, e.g. ``{"top_k": 3, "auto_thresholds": {...}}``; a
                score's own ``top_k``, such as CPL's, goes in ``settings``); the constructor's ``method``,
                ``settings``, ``on_nonfinite``, ``plugin_manager``, ``progress``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
            >>> det = ConsistencyDetector.from_model(model, torch.randn(300, 8), layers=["0", "2"],
            ...                                      thresholds=0.9, method="cpl")
            >>> det.net.is_fitted, det.net.thresholds_
            (True, {'0': 0.9, '2': 0.9})
        """
        network = {k: options.pop(k) for k in ("thresholds", "device", "network_options") if k in options}
        if "train" in options:
            raise TypeError("from_model takes the training data as its second argument, not train=")
        net = _network_from_model(model, layers, network.get("thresholds"), train, network.get("device"),
                                  network.get("network_options"), options.get("plugin_manager"))
        return cls(net, **options).fit(train)

    def __repr__(self) -> str:
        thr = getattr(self, "threshold_", None)
        return (f"ConsistencyDetector(method={self.method!r}, settings={self.settings}, layers={self.net.layers}, "
                f"threshold={thr}, fpr={getattr(self, 'fpr_', None)})")

    # ------------------------------------------------------------------ state helpers
    @property
    def is_calibrated(self) -> bool:
        return hasattr(self, "threshold_")

    @property
    def requires_training_data(self) -> bool:
        """Whether the score is fitted on the training data (``"mahalanobis"``, ``"knn"``)."""
        return self.scorer.requires_training_data

    def _check_model(self) -> None:
        """Raise :class:`ModelChangedError` if the model's weights changed since the detector was fitted."""
        self._watch.check(self.net.model)

    def _ensure_scorer(self) -> None:
        self.net.check_fitted()
        if self._scorer_fitted:
            return
        if self.requires_training_data:
            raise NotFittedError(f"the {self.method!r} detector is fitted on the training data: call "
                                 "det.fit(train) (or build it with ConsistencyDetector.from_model) before calibrate")
        self.scorer.fit(self.net, None)
        self._scorer_fitted = True

    def _check_calibrated(self) -> None:
        if not self.is_calibrated:
            raise NotFittedError("this ConsistencyDetector is not calibrated: call det.calibrate(clean_data, fpr=0.05) "
                                 "with clean inputs before predict() or guard()")

    # ------------------------------------------------------------------ fitting and calibration
    def fit(self, train: Any) -> ConsistencyDetector:
        """Fit the library network (if it is not fitted yet) and the score on the training data.

        Args:
            train: training inputs as :meth:`LibraryNetwork.fit` accepts them (labels are used only by
                ``"knn"``'s votes).

        Returns:
            ``self``; any earlier calibration is dropped.
        """
        if not self.net.is_fitted:
            self.net.fit(train, progress=self.progress)
        scorer = make_detector(self.method, self.settings, self.plugin_manager).fit(self.net, train)
        # all or nothing: the detector changes only once the new score is fitted
        self.scorer, self._scorer_fitted = scorer, True
        self._watch.record(self.net.model)
        for attr in ("threshold_", "fpr_", "n_calibration_", "calibration_scores_"):
            self.__dict__.pop(attr, None)
        return self

    def calibrate(self, clean: Any = None, fpr: float = 0.05, *, features: Tensor | None = None) -> ConsistencyDetector:
        """Set the decision threshold so that about ``fpr`` of clean inputs are flagged.

        The threshold is the ``ceil((n + 1)(1 - fpr))``-th smallest score of the ``n`` clean inputs (the
        conformal quantile): a new clean input exchangeable with them is flagged with probability at most
        ``fpr``, and at least ``fpr - 1 / (n + 1)``. Scores fused over layers first take their clean
        reference from these inputs (leave-one-out), so calibration data should not be training data.

        Args:
            clean: clean inputs (a Tensor, ``(X, y)``, Dataset, DataLoader or batches), held out from the
                training data; at least ``ceil(1 / fpr) - 1`` of them (19 for ``fpr=0.05``).
            fpr: the false-positive rate to aim at, in (0, 1).
            features: instead of ``clean``, what :meth:`calibration_features` returned for them: one pass
                over the clean inputs then serves several calibrations (other FPRs, a held-out check).

        Returns:
            ``self``, with ``threshold_``, ``fpr_``, ``n_calibration_`` and ``calibration_scores_`` set.

        Raises:
            ValueError: ``fpr`` outside (0, 1), too few clean inputs, non-finite clean inputs, or both or
                neither of ``clean`` and ``features``.
        """
        fpr = _check_fpr(fpr)
        if (clean is None) == (features is None):
            raise ValueError("calibrate needs the clean inputs or their calibration_features(clean), exactly one of "
                             f"them; got {'both' if clean is not None else 'neither'}")
        data = self.calibration_features(clean) if features is None else features
        rank = _calibration_rank(int(data.shape[0]), fpr)
        scores = self.scorer.set_reference(data) if self.scorer.fuses else data
        ordered = scores.detach().double().sort().values
        self.calibration_scores_ = ordered.float()
        self.threshold_ = float(ordered[rank - 1])
        self.fpr_ = fpr
        self.n_calibration_ = int(data.shape[0])
        return self

    def calibration_features(self, clean: Any) -> Tensor:
        """What :meth:`calibrate` is built from, per clean input: a fused score's features ``[N, F]``, else
        its scores ``[N]`` (under ``torch.distributed``, every rank's, in rank order).

        ``calibrate(clean, fpr)`` is ``calibrate(features=calibration_features(clean), fpr=fpr)``.
        """
        self._ensure_scorer()
        self._check_model()
        parts = []
        for x, _ in iter_batches(clean, self.net.batch_size):
            if n_rows(x) == 0:
                continue
            check_inputs_finite(x, "a clean calibration batch")
            r = self.net.run(x)
            parts.append(self.scorer.features(self.net, r) if self.scorer.fuses else self.scorer.score(self.net, r))
        local = torch.cat(parts) if parts else torch.empty(0)
        if world() is None:  # gather_all would refuse an empty local part; calibrate says what is wrong
            return local
        return gather_all(local, self.net.device, "clean calibration inputs")  # every rank's, in rank order

    def calibration_data(self, clean: Any) -> Tensor:
        """Deprecated alias (``FutureWarning``) of :meth:`calibration_features`."""
        warnings.warn("ConsistencyDetector.calibration_data is deprecated: use calibration_features",
                      FutureWarning, stacklevel=2)
        return self.calibration_features(clean)

    def calibrate_on(self, data: Tensor, fpr: float) -> ConsistencyDetector:
        """Deprecated alias (``FutureWarning``) of ``calibrate(features=data, fpr=fpr)``."""
        warnings.warn("ConsistencyDetector.calibrate_on(data, fpr) is deprecated: use "
                      "calibrate(features=data, fpr=fpr)", FutureWarning, stacklevel=2)
        return self.calibrate(features=data, fpr=fpr)

    # ------------------------------------------------------------------ scoring
    def _score_result(self, r: ProbeResult) -> Tensor:
        """The score of one probe run; a NaN or infinite score becomes ``inf`` (always flagged: fail closed)."""
        scores = self.scorer.score(self.net, r).float()
        return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, float("inf")))

    def _run_and_score(self, x: Tensor | MultiInput, want_outputs: bool,
                       run: Callable[[Any], ProbeResult] | None = None) -> tuple[Tensor, Tensor | None]:
        """Scores (and outputs) of finite inputs; under ``on_nonfinite="flag"`` a row whose activations or
        outputs overflow (e.g. a half-precision model) scores ``inf`` with NaN outputs, the others as usual.
        ``run`` is the probe run (default: the network's)."""
        try:
            r = (run or self.net.run)(x)
        except NonFiniteError:
            if self.on_nonfinite == "raise":
                raise
            return _score_each_row(x, lambda row: self._run_and_score(row, want_outputs, run), self.net.n_classes_,
                                   self.net.device, want_outputs)
        return self._score_result(r), (r.outputs if want_outputs else None)

    def _score_batch(self, x: Tensor | MultiInput, want_outputs: bool = False,
                     run: Callable[[Any], ProbeResult] | None = None) -> tuple[Tensor, Tensor | None]:
        """Scores ``[B]`` (and the model's outputs ``[B, C]``) of one batch, handling non-finite rows (``run``:
        see :meth:`_run_and_score`; the input's type and shape are checked here)."""
        if not isinstance(x, (Tensor, MultiInput)):
            raise TypeError(f"inputs must be a torch.Tensor (or a MultiInput of several), got {type(x).__name__}")
        if isinstance(x, Tensor) and x.dim() == 0:
            raise ValueError("inputs must have a leading batch dimension, got a 0-d tensor")
        _check_input_shape(self.net.input_shape_, x)
        finite = _finite_rows(x)
        if finite is None or bool(finite.all()):
            return self._run_and_score(x, want_outputs, run)
        if self.on_nonfinite == "raise":
            check_inputs_finite(x)
        return _score_finite_rows(x, finite, lambda rows: self._run_and_score(rows, want_outputs, run),
                                  self.net.n_classes_, self.net.device, want_outputs)

    def score(self, x: Any) -> Tensor:
        """Suspicion score per input, higher = more suspicious.

        Under autograd (grad enabled, ``x`` a tensor that requires grad) a :attr:`differentiable` score
        keeps the graph: ``det.score(x).sum().backward()`` gives ``x.grad``, for adaptive attacks. The
        value is the exact score; when that value is a step function of the activations (the conformal
        ranks of fused scores), the gradient is the :meth:`surrogate`'s (a straight-through estimate).
        A score that is not differentiable returns its values without a graph.

        Args:
            x: inputs ``[B, ...]`` (a Tensor), or any data :meth:`LibraryNetwork.fit` accepts (batches are
                concatenated).

        Returns:
            ``Tensor[B]`` (float32) on the network's device; ``inf`` for non-finite inputs when
            ``on_nonfinite="flag"``.

        Example:
            >>> import torch
            >>> from torch import nn
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
            >>> det = ConsistencyDetector.from_model(model, torch.randn(300, 8), ["0", "2"], thresholds=0.9,
            ...                                      method="library-distance").calibrate(torch.randn(100, 8))
            >>> x = torch.randn(4, 8, requires_grad=True)
            >>> det.score(x).sum().backward()
            >>> x.grad.shape, bool(x.grad.abs().sum() > 0)
            (torch.Size([4, 8]), True)
        """
        self._ensure_scorer()
        if self.scorer.fuses and not self.is_calibrated:
            raise NotFittedError(f"the {self.method!r} score fuses per-layer p-values against clean reference data: "
                                 "call det.calibrate(clean_data, fpr=0.05) first")
        self._check_model()
        if self._keeps_graph(x):
            return _score_with_graph(self.net, self.scorer, x, exact=True)[0]
        if isinstance(x, (Tensor, MultiInput)):
            return self._score_batch(x)[0]
        parts = [self._score_batch(xb)[0] for xb, _ in iter_batches(x, self.net.batch_size) if n_rows(xb)]
        if not parts:
            raise ValueError("score received no inputs (empty data)")
        return torch.cat(parts)

    __call__ = score

    @property
    def differentiable(self) -> bool:
        """Whether the score has a gradient (see :meth:`score`; ``ConsistencyScore.differentiable``)."""
        self._ensure_scorer()
        return bool(self.scorer.differentiable)

    def surrogate(self, x: Tensor) -> Tensor:
        """A differentiable ``Tensor[B]`` that rises with the score: the gradient :meth:`score` passes on.

        For scores whose value autograd follows (``"msp"``) it equals the score; for fused scores it is the
        sum of the per-layer features standardised on the clean calibration data. Raises ``TypeError`` for
        a score that is not :attr:`differentiable`.
        """
        self._ensure_scorer()
        if not self.differentiable:
            raise TypeError(f"the {self.method!r} score is not differentiable; adaptive attacks need a surrogate "
                            "of its features (libnet_plugin.experiments.adaptive)")
        if self.scorer.fuses and not self.is_calibrated:
            raise NotFittedError(f"the {self.method!r} surrogate standardises features on clean reference data: "
                                 "call det.calibrate(clean_data, fpr=0.05) first")
        self._check_model()
        return _score_with_graph(self.net, self.scorer, x, exact=False)[0]

    def _keeps_graph(self, x: Any) -> bool:
        """Score ``x`` with the autograd graph: grad enabled, a tensor that requires grad, a differentiable score."""
        return isinstance(x, Tensor) and x.requires_grad and torch.is_grad_enabled() and self.differentiable

    def predict(self, x: Any) -> Tensor:
        """``BoolTensor[B]``: True where ``score(x) > threshold_`` (needs :meth:`calibrate`)."""
        self._check_calibrated()
        return self.score(x) > self.threshold_

    def score_and_output(self, x: Tensor | MultiInput) -> GuardOutput:
        """The model's output, flags and scores of one batch from a single forward pass (see :meth:`guard`).

        For an input that requires grad (grad enabled) and a :attr:`differentiable` score, the output and
        the score keep the autograd graph, as in :meth:`score`.
        """
        x = as_inputs(x)
        self._check_calibrated()
        self._ensure_scorer()
        self._check_model()
        probe = self._eval_probe()  # eval semantics whatever another thread does to model.training
        if self._keeps_graph(x):
            # both keep the graph
            graph_scores, graph_outputs = _score_with_graph(self.net, self.scorer, x, exact=True, probe=probe)
            return GuardOutput(output=graph_outputs, flagged=graph_scores.detach() > self.threshold_,
                               score=graph_scores)
        scores, outputs = self._score_batch(x, want_outputs=True, run=None if probe is None else probe.run)
        return GuardOutput(output=outputs, flagged=scores > self.threshold_, score=scores)

    def _eval_probe(self) -> TorchLayerProbe | None:
        """The network's torch probe on an eval-mode view of the model (see :func:`_eval_view_probe`)."""
        cache = _eval_view_probe(self.net.probe, self.net.model, self.__dict__.get("_eval_probe_cache"))
        if cache is not None:
            self._eval_probe_cache = cache
        return None if cache is None else cache[2]

    def guard(self) -> DetectorGuard:
        """Wrap the model: a module returning ``GuardOutput(output, flagged, score)`` in one forward pass."""
        self._check_calibrated()
        return DetectorGuard(self)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes kept: ``{"library": ..., "detector": ...}`` (library network tensors; the score's own)."""
        lib = sum(t.numel() * t.element_size() for t in self.net.state_tensors().values())
        return {"library": int(lib), "detector": int(self.scorer.memory_bytes())}

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, key: bytes | str | None = None) -> None:
        """Save network, score and calibration to one safetensors file, atomically (the model is not saved).

        Scores that keep no tensors (the default :meth:`ConsistencyScore.state_dict`) are refitted from
        the network at load. With ``key`` (bytes or str) the file is signed (HMAC-SHA256 over its
        settings, calibration and tensor digests): ``load(path, model, key=key)`` then refuses any edit
        made without the key (a shifted threshold, another method).
        """
        tensors, config = _saved_state(self)
        save_atomic(path, tensors, kind=_KIND, config=config, key=key)

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any, *, map_location: Any = None, device: Any = None,
             plugin_manager: pluggy.PluginManager | None = None, check_model: bool = True,
             prefix_map: Mapping[str, str] | None = None,
             key: bytes | str | None = None) -> ConsistencyDetector:
        """Load a detector saved by :meth:`save` onto ``model``.

        A detector fitted on ``torch.compile(m)`` (module names ``_orig_mod.*``) or ``nn.DataParallel(m)``
        (``module.*``) loads onto ``m`` and the other way round: the wrapper prefixes are dropped or added,
        and the weights are compared by their names without them.

        Args:
            path: the saved file.
            model: the model the detector was fitted on (layers are matched by name).
            map_location / device: where to put the libraries (e.g. ``"cpu"``).
            plugin_manager: where to find the score plugin (default: the process-wide manager).
            check_model: compare the model's weights with the fingerprint saved at fitting and raise
                :class:`ModelChangedError` when they differ.
            prefix_map: ``{saved prefix: prefix in model}`` for layer and weight names, e.g.
                ``{"backbone.": "model.backbone."}`` for a model now held inside another module (the
                longest matching prefix is replaced; ``""`` matches every name). Default: the automatic
                mapping of wrapper prefixes above.
            key: the key the file was signed with (``save(path, key=...)``): a file that is unsigned or
                does not verify is refused (:class:`~libnet_plugin.errors.SaveIntegrityError`). Without
                it, a signed file is checked against its digests only.
        """
        tensors, cfg = load_checked(path, kind=_KIND, key=key)
        _check_saved_detector(path, cfg)
        cfg = _config_for_model(cfg, model, prefix_map)
        net = _load_network(path, cfg, tensors, model, device if device is not None else map_location,
                            plugin_manager, prefix_map)
        method, settings = cfg["method"], cfg["settings"]
        try:
            det = cls(net, method=method, settings=settings, on_nonfinite=cfg.get("on_nonfinite", "flag"),
                      plugin_manager=plugin_manager)
        except (LibnetError, TypeError, ValueError) as exc:
            raise SaveFormatError(f"{str(path)!r}: the saved detector {method!r} with settings {settings} cannot be "
                                  f"built: {exc}") from exc
        if check_model:
            _check_saved_fingerprint(path, cfg.get("fingerprint"), model)
        _restore_fitted(path, det, cfg, tensors, model)
        return det


# --------------------------------------------------------------------------------------------------
# loading a saved detector (the parts of ConsistencyDetector.load)
# --------------------------------------------------------------------------------------------------


def _saved_state(det: ConsistencyDetector) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(tensors, config)``: what :meth:`ConsistencyDetector.save` writes (and ``load`` reads back)."""
    det.net.check_fitted()
    tensors = {f"network/{k}": v for k, v in det.net.state_tensors().items()}
    tensors.update({f"detector/{k}": v for k, v in det.scorer.state_dict().items()})
    if det.is_calibrated:
        tensors["calibration/scores"] = det.calibration_scores_
    config = {
        "network": det.net.config(), "method": det.method, "settings": det.settings,
        "scorer": det.scorer.config(), "scorer_fitted": det._scorer_fitted,
        "on_nonfinite": det.on_nonfinite, "fingerprint": det._watch.fingerprint,
        "calibration": ({"threshold": det.threshold_, "fpr": det.fpr_, "n": det.n_calibration_}
                        if det.is_calibrated else None),
    }
    return tensors, config


def _config_for_model(cfg: dict[str, Any], model: Any, prefix_map: Mapping[str, str] | None) -> dict[str, Any]:
    """A saved detector's settings with its layer and weight names as they read in ``model`` (see ``load``)."""
    saved_layers = cfg["network"].get("layers")
    if isinstance(saved_layers, list) and all(isinstance(n, str) for n in saved_layers):
        renames = _layer_renames(saved_layers, model, prefix_map)
        if renames:
            cfg = _rename_config(cfg, renames)
    if prefix_map is not None and isinstance(cfg.get("fingerprint"), list):
        cfg = {**cfg, "fingerprint": [[_apply_prefix_map(r[0], prefix_map), *r[1:]]
                                      if isinstance(r, list) and r and isinstance(r[0], str) else r
                                      for r in cfg["fingerprint"]]}
    return cfg


def _load_network(path: Any, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor], model: Any, device: Any,
                  plugin_manager: pluggy.PluginManager | None,
                  prefix_map: Mapping[str, str] | None) -> LibraryNetwork:
    """The saved detector's library network on ``model``; a missing layer's error suggests a ``prefix_map``."""
    net_cfg = cfg["network"]
    net_tensors = {k[len("network/"):]: v for k, v in tensors.items() if k.startswith("network/")}
    try:
        return LibraryNetwork.from_state(net_tensors, net_cfg, model, device=device, plugin_manager=plugin_manager)
    except LayerNotFoundError as exc:
        if prefix_map is not None or not isinstance(model, nn.Module):
            raise
        saved_layers = net_cfg.get("layers")
        hint = _prefix_hint(saved_layers, model)
        raise LayerNotFoundError(f"{exc}. {str(path)!r} was fitted on the layers {saved_layers}"
                                 + (f"; if the model is now held inside another module, load with prefix_map={hint}"
                                    if hint else "")) from exc


def _check_saved_fingerprint(path: Any, fingerprint: list[list[Any]] | None, model: Any) -> None:
    """Raise unless ``model``'s weights match the fingerprint saved with the detector (torch models only)."""
    if fingerprint is None and isinstance(model, nn.Module):
        raise SaveFormatError(f"{str(path)!r} has no fingerprint of the torch model it was fitted on, so it cannot "
                              "be checked against the model given; refit, or pass check_model=False if you know "
                              "it is the same model")
    if fingerprint is not None:
        now = model_fingerprint(model)
        diff = _fingerprint_diff(fingerprint, now) if now is not None else None
        if diff is not None:
            raise ModelChangedError(f"{str(path)!r} was fitted on a model whose weights differ from the model given "
                                    f"({diff}); pass the same model, or refit")


def _restore_fitted(path: Any, det: ConsistencyDetector, cfg: Mapping[str, Any], tensors: Mapping[str, Tensor],
                    model: Any) -> None:
    """Give a loaded detector what was fitted: the model's fingerprint, the score's state, the calibration."""
    if cfg.get("fingerprint") is not None:
        det._watch.record(model, cfg["fingerprint"])
    if cfg.get("scorer_fitted"):
        _restore_scorer(path, det.scorer, det.net, cfg, tensors)
        det._scorer_fitted = True
    cal = cfg.get("calibration")
    if cal is not None and not det._scorer_fitted and (det.scorer.fuses or det.requires_training_data):
        raise SaveFormatError(f"{str(path)!r} is calibrated, but the fitted state of its {cfg['method']!r} score is "
                              "missing (modified or corrupted)")
    if cal is not None:
        det.threshold_, det.fpr_, det.n_calibration_, det.calibration_scores_ = _saved_calibration(path, cal, tensors)


def _restore_scorer(path: Any, scorer: ConsistencyScore, net: LibraryNetwork, cfg: Mapping[str, Any],
                    tensors: Mapping[str, Tensor]) -> None:
    """Load the score's saved fitted state (:class:`SaveFormatError` when it does not fit its settings)."""
    state = {k[len("detector/"):]: v for k, v in tensors.items() if k.startswith("detector/")}
    try:
        scorer.load_state_dict(state, net, cfg.get("scorer") or {})
    except SaveFormatError:
        raise
    except (LibnetError, KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as exc:
        raise SaveFormatError(f"{str(path)!r}: the saved state of the {cfg['method']!r} detector does not fit "
                              f"its settings (modified or corrupted): {exc!r}") from exc


def _saved_calibration(path: Any, cal: Mapping[str, Any],
                       tensors: Mapping[str, Tensor]) -> tuple[float, float, int, Tensor]:
    """``(threshold, fpr, n, sorted scores)`` of a saved calibration, checked to be the conformal quantile of
    its scores (else :class:`SaveFormatError`)."""
    if "calibration/scores" not in tensors:
        raise SaveFormatError(f"{str(path)!r} lacks the tensor 'calibration/scores'")
    try:
        threshold, fpr, n = float(cal["threshold"]), float(cal["fpr"]), int(cal["n"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SaveFormatError(f"{str(path)!r}: the saved calibration is unreadable ({exc!r})") from exc
    scores = tensors["calibration/scores"].float()
    problem = None
    if not math.isfinite(threshold):
        problem = f"the threshold is {threshold} (a detector with it would flag nothing, or everything)"
    elif not 0.0 < fpr < 1.0:
        problem = f"the calibrated FPR is {fpr}, outside (0, 1)"
    elif scores.dim() != 1 or scores.shape[0] != n or n < 1:
        problem = f"{n} calibration inputs are recorded but the scores have shape {list(scores.shape)}"
    elif not bool(torch.isfinite(scores).all()) or bool((scores[1:] < scores[:-1]).any()):
        problem = "the calibration scores are not finite and sorted"
    elif _conformal_rank(n, fpr) > n:
        problem = f"{n} calibration inputs are too few for the recorded FPR {fpr}"
    elif float(torch.tensor(threshold, dtype=torch.float32)) != float(scores[_conformal_rank(n, fpr) - 1]):
        problem = f"the threshold {threshold!r} is not the conformal quantile of the saved calibration scores"
    if problem is not None:
        raise SaveFormatError(f"{str(path)!r} was modified or corrupted: {problem}")
    return threshold, fpr, n, scores


class DetectorGuard(nn.Module):
    """The model wrapped with its detector: ``forward(x)`` gives the output and the flags in one pass.

    The library network's probe runs the model once with forward hooks on the probed layers; the
    detector scores the activations captured during that pass, so guarding costs the library look-ups,
    not a second forward pass. Gradients are not kept (inference only).

    The forward pass always has eval semantics (dropout off, batch-norm running statistics read and never
    updated), whatever the model's mode and whatever another thread does to it meanwhile (``train()``,
    ``eval()``, also of this guard): it runs on an eval-mode view of the model, module objects of its
    own whose ``training`` is fixed to ``False``, sharing the model's parameters, buffers and hooks
    (:mod:`libnet_plugin._eval_view`). Two exceptions run the model itself, as :meth:`ConsistencyDetector.score`
    does: TorchScript and ``torch.compile`` models, modules whose ``forward`` was replaced on the instance
    (accelerate's hooks), and probes other than the torch one; call ``model.eval()`` before serving those.

    Args:
        detector: a calibrated :class:`ConsistencyDetector`.

    Example:
        >>> guarded = det.guard()  # doctest: +SKIP
        >>> out = guarded(x)  # doctest: +SKIP
        >>> logits, suspicious = out.output, out.flagged  # doctest: +SKIP
    """

    def __init__(self, detector: ConsistencyDetector):
        super().__init__()
        detector._check_calibrated()
        self.detector = detector
        if isinstance(detector.net.model, nn.Module):
            self.model = detector.net.model  # registered so .eval()/.to() reach it

    def forward(self, *args: Any, **kwargs: Any) -> GuardOutput:
        """``guarded(x)``, ``guarded(ids, mask)`` or ``guarded(input_ids=..., attention_mask=...)``, as the model."""
        if kwargs and args:
            raise TypeError("call the guarded model with positional inputs or with keyword inputs, not both")
        if kwargs:
            return self.detector.score_and_output(MultiInput(kwargs))
        return self.detector.score_and_output(args[0] if len(args) == 1 else MultiInput(args))

    @property
    def runs_on_eval_view(self) -> bool:
        """Whether the forward pass runs on an eval-mode view of the model (else on the model itself, in its
        own mode: one of the exceptions above)."""
        return self.detector._eval_probe() is not None

    def extra_repr(self) -> str:
        d = self.detector
        return f"method={d.method!r}, threshold={d.threshold_:.6g}, fpr={d.fpr_:g}"
