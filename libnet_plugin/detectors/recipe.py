"""The fused detector of issue 28 for a model whose layers nobody named: layers found by rule, not by hand.

Round 8's candidate on the MNIST net names that net's layers. Round 10 (docs/results/detectors-mnist.md)
measured the same fusion on layers every model has: the first parametrised module's output (the stem,
:func:`~libnet_plugin.probe.first_layer`) and the block outputs of ``layers="auto"``
(:func:`~libnet_plugin.probe.auto_layers`) but the last, the penultimate features, which ViM's score reads.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._batches import is_one_shot, iter_batches, n_rows
from ..probe import auto_layers

__all__ = ["FUSION_SETTINGS", "fusion_recipe"]

#: the fusion of round 8's and round 10's candidates, without their layers: ViM's score as a feature, the
#: truncated product of the conformal p-values (tau 0.1) and the exponential tail beyond the clean range
FUSION_SETTINGS: dict[str, Any] = {"peers": ["vim"], "combine": "truncated", "truncation": 0.1,
                                   "tail": "exponential"}


def fusion_recipe(model: nn.Module, data: Any) -> dict[str, Any]:
    """The keywords of :meth:`ConsistencyDetector.from_model <libnet_plugin.ConsistencyDetector.from_model>`
    that build round 10's fused detector on ``model``.

    The library distances and class Gaussians are taken on the stem's output and on every block output of
    ``layers="auto"`` but the last; the network also probes that last one (the final classifier's input),
    where ViM reads the penultimate features. On the MNIST net of ``libnet evaluate-detectors`` this gives
    ``conv1``, ``conv2:input`` and ``fc1:input``: measured there only (at parity with the best post-hoc peer
    on 55 of 60 development cells, against round 8's hand-named 59 and the default's 22; see
    docs/results/detectors-mnist.md). It needs the training data at fit (labels, or the model's answers).

    Args:
        model: a ``torch.nn.Module`` whose last linear layer is the classifier (ViM reads its input).
        data: the training data as :meth:`LibraryNetwork.fit <libnet_plugin.LibraryNetwork.fit>` takes it (a
            Tensor, ``(X, y)``, Dataset, DataLoader, dicts of inputs...), or one batch of it: only the first
            non-empty batch is run, once (the model's answers are not used).

    Returns:
        ``{"layers": [...], "method": "library-gaussian-fusion", "settings": {...}}``, to pass on with ``**``.

    Raises:
        LayerNotFoundError: the model has fewer than two parametrised modules.
        ValueError: ``data`` holds no input, or can be iterated only once (a generator: it would be spent).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(),
        ...                       nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> recipe = fusion_recipe(model, torch.zeros(2, 1, 6, 6))
        >>> recipe["layers"], recipe["settings"]["gaussian_layers"]
        (['0', '2:input', '5:input', '7:input'], ['0', '2:input', '5:input'])
    """
    if is_one_shot(data):
        raise ValueError("fusion_recipe runs the model on the first batch of data, and this data can be iterated "
                         "only once: pass re-iterable data (a Tensor, Dataset, DataLoader) or one batch")
    x = next((x for x, _ in iter_batches(data, 64) if n_rows(x)), None)
    if x is None:
        raise ValueError("fusion_recipe needs inputs to find the layers from; got no input")
    stem, *blocks = auto_layers(model, x, stem=True)  # one forward pass finds both
    features = list(dict.fromkeys([stem, *blocks[:-1]]))
    settings = {"layers": features, "gaussian_layers": list(features), **FUSION_SETTINGS,
                "peers": list(FUSION_SETTINGS["peers"])}
    return {"layers": list(dict.fromkeys([*features, blocks[-1]])), "method": "library-gaussian-fusion",
            "settings": settings}
