"""libnet-plugin: library networks (Lee, 2019) for any classifier, behind a pluggy core.

>>> import libnet_plugin as lnp
>>> sorted(lnp.hookspecs.ALL_HOOKS)[:2]
['libnet_consistency_detector', 'libnet_detector_comparison']
>>> from libnet_plugin._version import __version__
>>> lnp.__version__ == __version__
True
"""

from . import hookspecs
from ._batches import MultiInput, as_inputs
from ._version import __version__
from .consistency_detector import ConsistencyDetector, GuardOutput, ModelChangedError
from .distributed import DistributedFitError
from .errors import (
    LayerNotFoundError,
    LibnetError,
    NonFiniteError,
    NotFittedError,
    SaveFormatError,
    SaveIntegrityError,
    ShapeMismatchError,
)
from .forking import prepare_for_fork
from .hookspecs import hookimpl
from .inspection import InspectionReport, InspectOptions, inspect
from .library import ExactLibrary, leader_reference
from .network import LibraryNetwork
from .plugins import get_plugin_manager
from .probe import ProbeResult, TorchLayerProbe
from .readout import HebbianReadout

__all__ = [
    "__version__", "LibraryNetwork", "ConsistencyDetector", "ExactLibrary", "HebbianReadout", "TorchLayerProbe", "ProbeResult",
    "leader_reference", "get_plugin_manager", "inspect", "InspectOptions", "InspectionReport", "hookimpl", "hookspecs",
    "prepare_for_fork", "GuardOutput", "MultiInput", "as_inputs",
    "LibnetError", "ModelChangedError", "DistributedFitError", "NotFittedError", "LayerNotFoundError", "ShapeMismatchError",
    "NonFiniteError", "SaveFormatError",
    "SaveIntegrityError",
]
