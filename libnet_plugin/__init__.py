"""libnet-plugin: library networks (Lee, 2019) for any classifier, behind a pluggy core.

>>> import libnet_plugin as lnp
>>> sorted(lnp.hookspecs.ALL_HOOKS)[:2]
['libnet_consistency_detector', 'libnet_detector_comparison']
"""

__version__ = "0.1.0"

from . import hookspecs  # noqa: E402
from .errors import (  # noqa: E402
    LayerNotFoundError, LibnetError, NonFiniteError, NotFittedError, SaveFormatError, ShapeMismatchError,
)
from .hookspecs import hookimpl  # noqa: E402
from .library import ExactLibrary, leader_reference  # noqa: E402
from .network import LibraryNetwork  # noqa: E402
from .consistency_detector import ConsistencyDetector  # noqa: E402
from .plugins import get_plugin_manager  # noqa: E402
from .probe import ProbeResult, TorchLayerProbe  # noqa: E402
from .readout import HebbianReadout  # noqa: E402

__all__ = [
    "__version__", "LibraryNetwork", "ConsistencyDetector", "ExactLibrary", "HebbianReadout", "TorchLayerProbe", "ProbeResult",
    "leader_reference", "get_plugin_manager", "hookimpl", "hookspecs",
    "LibnetError", "NotFittedError", "LayerNotFoundError", "ShapeMismatchError", "NonFiniteError", "SaveFormatError",
]
