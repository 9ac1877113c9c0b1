"""Plugin manager factory.

>>> import libnet_plugin as lnp
>>> pm = lnp.get_plugin_manager(autoload=False)
>>> pm.hook.libnet_library(name="exact", settings={"threshold": 0.7, "device": "cpu", "layer": "fc1"})
ExactLibrary(layer='fc1', threshold=0.7, size=0)
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import pluggy

from . import hookspecs
from .detectors.api import ConsistencyScore, as_consistency_score
from .errors import LibnetError

ENTRY_POINT_GROUP = "libnet_plugin"
#: Set this environment variable to ``1`` (or ``true``/``yes``) to skip loading entry-point plugins.
NO_AUTOLOAD_ENV = "LIBNET_PLUGIN_NO_AUTOLOAD"

_default_pm: pluggy.PluginManager | None = None


def _autoload_disabled() -> bool:
    return os.environ.get(NO_AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def get_plugin_manager(autoload: bool | None = None, plugins: Iterable[Any] = ()) -> pluggy.PluginManager:
    """Create a new plugin manager with the hookspecs and the built-in plugins registered.

    Args:
        autoload: load third-party plugins from the ``libnet_plugin`` entry-point group. ``None``
            (default) loads them unless the environment variable ``LIBNET_PLUGIN_NO_AUTOLOAD`` is set.
        plugins: extra plugin objects to register (after the built-ins, so they are asked first).

    Returns:
        A fresh ``pluggy.PluginManager``; nothing global is modified.

    Example:
        >>> pm = get_plugin_manager(autoload=False)
        >>> pm.has_plugin("libnet-builtins")
        True
    """
    from . import builtins

    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(builtins, name="libnet-builtins")
    if autoload is None:
        autoload = not _autoload_disabled()
    if autoload:
        load_entry_point_plugins(pm)
    for plugin in plugins:
        pm.register(plugin)
    return pm


def load_entry_point_plugins(pm: pluggy.PluginManager, group: str = ENTRY_POINT_GROUP) -> list[str]:
    """Register every plugin of the entry-point ``group``; return the names registered.

    A plugin whose optional dependencies are missing (``ImportError``) is skipped with a warning naming
    it, so one broken extra never breaks the core.
    """
    import warnings
    from importlib.metadata import entry_points

    loaded = []
    for ep in entry_points(group=group):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            plugin = ep.load()
        except ImportError as exc:
            warnings.warn(f"libnet plugin {ep.name!r} ({ep.value}) could not be imported and is skipped: {exc}",
                          RuntimeWarning, stacklevel=3)
            continue
        pm.register(plugin, name=ep.name)
        loaded.append(ep.name)
    return loaded


def default_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager used when an object is not given one (created lazily)."""
    global _default_pm
    if _default_pm is None:
        _default_pm = get_plugin_manager()
    return _default_pm


def _call(pm: pluggy.PluginManager | None, hook: str, what: str, **kwargs: Any) -> Any:
    pm = pm or default_plugin_manager()
    result = getattr(pm.hook, hook)(**kwargs)
    if result is None:
        raise LibnetError(f"no registered plugin provides {what}; plugins: {sorted(n for n, _ in pm.list_name_plugin())}")
    return result


def make_probe(model: Any, layers: list[str], device: Any, pm: pluggy.PluginManager | None = None) -> Any:
    """Ask the ``libnet_layer_probe`` hook for a probe of ``model`` (first answer wins)."""
    pm = pm or default_plugin_manager()
    result = pm.hook.libnet_layer_probe(model=model, layers=list(layers), device=device)
    if result is None and type(model).__name__ == "ExportedProgram":
        raise TypeError("a torch.export.ExportedProgram is probed through its module: pass ep.module() (the layer "
                        "names are the eager model's, so a detector fitted on the eager model loads onto it)")
    if result is None:
        raise TypeError(
            f"no layer probe understands a model of type {type(model).__module__}.{type(model).__qualname__}; "
            "pass a torch.nn.Module, or install the ONNX adapter (pip install 'libnet-plugin[onnx]') "
            "for ONNX files, ModelProto or InferenceSession objects"
        )
    return result


def make_library(name: str, settings: Mapping[str, Any], pm: pluggy.PluginManager | None = None) -> Any:
    """Ask the ``libnet_library`` hook for a library called ``name``."""
    return _call(pm, "libnet_library", f"a library named {name!r}", name=name, settings=dict(settings))


def make_readout(name: str, settings: Mapping[str, Any], pm: pluggy.PluginManager | None = None) -> Any:
    """Ask the ``libnet_readout`` hook for a readout called ``name``."""
    return _call(pm, "libnet_readout", f"a readout named {name!r}", name=name, settings=dict(settings))


def make_detector(name: str, settings: Mapping[str, Any], pm: pluggy.PluginManager | None = None) -> ConsistencyScore:
    """Ask the ``libnet_consistency_detector`` hook for a detector called ``name``.

    Returns:
        A :class:`~libnet_plugin.detectors.ConsistencyScore` (a plugin's object with only ``name``,
        ``fit`` and ``score`` comes wrapped in a :class:`~libnet_plugin.detectors.PluginScore`).
    """
    found = _call(pm, "libnet_consistency_detector", f"a consistency detector named {name!r}",
                  name=name, settings=dict(settings))
    return as_consistency_score(found, name)


def registered_detectors(pm: pluggy.PluginManager | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
    """Every detector the plugins list for comparison (``libnet_detector_comparison``): ``{label: (name, settings)}``.

    The plugins' lists are merged in registration order, so a plugin registered later replaces a label.

    Example:
        >>> import libnet_plugin as lnp
        >>> registered_detectors(lnp.get_plugin_manager(autoload=False))["knn"]
        ('knn', {})
    """
    pm = pm or default_plugin_manager()
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for listed in reversed(pm.hook.libnet_detector_comparison()):  # pluggy answers last-registered first
        for label, (name, settings) in (listed or {}).items():
            out[str(label)] = (str(name), dict(settings))
    return out
