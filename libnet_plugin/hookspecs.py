"""The five hooks of libnet-plugin (pluggy project name ``"libnet"``).

Built-in implementations live in :mod:`libnet_plugin.builtins` and are registered through exactly the
same path as third-party plugins. Third-party plugins are found through the ``libnet_plugin``
entry-point group (set ``LIBNET_PLUGIN_NO_AUTOLOAD=1`` to turn that off).

A plugin is any object or module with functions decorated by :data:`hookimpl`::

    import libnet_plugin as lnp

    class MyLibrary:
        @lnp.hookimpl
        def libnet_library(self, name, settings):
            if name == "mine":
                return MyLibraryImpl(**settings)
            return None        # let other plugins answer

    pm = lnp.get_plugin_manager()
    pm.register(MyLibrary())

The four factory hooks are ``firstresult``: plugins are asked in LIFO registration order (third-party
plugins are registered after the built-ins, so they are asked first) and the first non-``None`` answer
wins. ``libnet_detector_comparison`` collects every plugin's answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from .detectors.api import ConsistencyScore, ScoreLike
    from .library import Library
    from .probe import LayerProbe
    from .readout import Readout

PROJECT_NAME = "libnet"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec(firstresult=True)
def libnet_layer_probe(model: Any, layers: Sequence[str], device: Any) -> LayerProbe | None:
    """Return a layer probe for ``model``, or ``None`` if this plugin does not understand it.

    Called by :class:`~libnet_plugin.LibraryNetwork` once, when it is constructed (and on ``load``).

    Args:
        model: whatever the user passed as the model: a ``torch.nn.Module``, a path to an ONNX file,
            an ``onnxruntime.InferenceSession``, an ``onnx.ModelProto``...
        layers: the layer names the user asked for, in order.
        device: the ``torch.device`` the library network computes on.

    Returns:
        An object implementing :class:`libnet_plugin.probe.LayerProbe` (``layers``, ``run(x)`` returning
        a :class:`~libnet_plugin.probe.ProbeResult` of flattened HAPs ``[B, D_l]`` per layer plus the
        model's outputs ``[B, C]``), or ``None`` to let the next plugin try. The probe must raise
        :class:`~libnet_plugin.errors.LayerNotFoundError` for names the model does not have.
    """


@hookspec(firstresult=True)
def libnet_library(name: str, settings: Mapping[str, Any]) -> Library | None:
    """Return a new, empty library (novelty memory) implementation called ``name``.

    Called by :class:`~libnet_plugin.LibraryNetwork` once per probed layer at ``fit`` (and at ``load``,
    before the saved state is restored).

    Args:
        name: the library kind the user chose (``"exact"`` is the built-in default).
        settings: keyword settings; always holds ``threshold`` (float in (0, 1]), ``device``
            (``torch.device``) and ``layer`` (str); may hold implementation-specific options.

    Returns:
        An object implementing :class:`libnet_plugin.library.Library`, or ``None`` if ``name`` is not
        one this plugin provides.
    """


@hookspec(firstresult=True)
def libnet_readout(name: str, settings: Mapping[str, Any]) -> Readout | None:
    """Return a new readout that maps library outputs to class evidence.

    Called by :class:`~libnet_plugin.LibraryNetwork` once per probed layer at ``fit`` (and at ``load``).

    Args:
        name: the readout kind (``"hebbian"``, Eq. 2 and 3 of the paper, is the built-in default).
        settings: keyword settings; always holds ``n_classes`` (int) and ``device``.

    Returns:
        An object implementing :class:`libnet_plugin.readout.Readout`, or ``None``.
    """


@hookspec(firstresult=True)
def libnet_consistency_detector(name: str, settings: Mapping[str, Any]) -> ConsistencyScore | ScoreLike | None:
    """Return a consistency detector (a score of how inconsistent the layers are) called ``name``.

    Called by :class:`~libnet_plugin.ConsistencyDetector` (and the detector evaluation) when a
    detector is built by name.

    Args:
        name: the detector kind (``"library-fusion"`` is the built-in default; ``"cpl"`` is the paper's Eq. 5).
        settings: keyword settings, e.g. ``top_k``.

    Returns:
        A :class:`libnet_plugin.detectors.ConsistencyScore` (or an object with ``name``,
        ``fit(net, data)`` and ``score(net, probe_result)`` returning ``Tensor[B]``, higher = more
        suspicious, which is wrapped in a :class:`~libnet_plugin.detectors.PluginScore`); or ``None``.
    """


@hookspec
def libnet_detector_comparison() -> Mapping[str, tuple[str, Mapping[str, Any]]] | None:
    """List detectors for ``libnet evaluate-detectors`` to compare: ``{label: (name, settings)}``.

    Called by :func:`libnet_plugin.plugins.registered_detectors` (used by ``libnet evaluate-detectors``
    and the reproductions' detector sections) each time the comparison list is built. Every plugin may
    answer; the answers are merged in registration order, so a plugin registered later (an entry-point
    plugin, or one passed to :func:`~libnet_plugin.get_plugin_manager`) replaces a label listed earlier.

    Returns:
        A mapping of a table label to a detector ``name`` served by the ``libnet_consistency_detector``
        hook and its ``settings``; or ``None`` to list nothing.
    """


ALL_HOOKS: tuple[str, ...] = (
    "libnet_layer_probe",
    "libnet_library",
    "libnet_readout",
    "libnet_consistency_detector",
    "libnet_detector_comparison",
)
