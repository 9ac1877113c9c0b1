"""Exceptions raised by libnet-plugin.

Every exception the library raises on bad user input derives from :class:`LibnetError`, so callers can
catch them in one place, and also from the builtin type a Python user would expect (``ValueError``,
``KeyError``...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "LibraryTooLargeWarning",
    "LibnetError",
    "NotFittedError",
    "LayerNotFoundError",
    "ShapeMismatchError",
    "NonFiniteError",
    "SaveFormatError",
    "SaveIntegrityError",
]


class LibnetError(Exception):
    """Base class of every error raised by libnet-plugin on bad input or state.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> try:
        ...     lnp.LibraryNetwork(model, layers=["0"], thresholds=0.9).predict(torch.randn(2, 4))
        ... except lnp.LibnetError as e:
        ...     print(type(e).__name__)
        NotFittedError
    """


class NotFittedError(LibnetError, ValueError, AttributeError):
    """Raised when a method that needs a fitted object is called before ``fit``.

    Like scikit-learn's ``NotFittedError`` it derives from both ``ValueError`` and ``AttributeError``.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> lnp.LibraryNetwork(model, layers=["0"], thresholds=0.9).predict(torch.randn(2, 4))
        Traceback (most recent call last):
        ...
        libnet_plugin.errors.NotFittedError: this LibraryNetwork is not fitted yet; call fit(train) before using it
    """


class LayerNotFoundError(LibnetError, KeyError):
    """A requested layer does not exist in the model, or never produced an output.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> lnp.LibraryNetwork(model, layers=["nope"], thresholds=0.9).fit(torch.randn(20, 4))
        Traceback (most recent call last):
        ...
        libnet_plugin.errors.LayerNotFoundError: layer 'nope' does not exist in the Sequential. Valid layer names: ['0', '1', '2']
    """

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LibnetError, ValueError):
    """An input or activation does not have the shape the fitted object expects.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(torch.randn(50, 4))
        >>> net.predict(torch.randn(2, 5))
        Traceback (most recent call last):
        ...
        libnet_plugin.errors.ShapeMismatchError: input batch has shape (2, 5) (per input (5,)); ...
    """


class NonFiniteError(LibnetError, ValueError):
    """An input or activation contains NaN or infinity.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(torch.randn(50, 4))
        >>> net.predict(torch.full((2, 4), float("nan")))
        Traceback (most recent call last):
        ...
        libnet_plugin.errors.NonFiniteError: the input batch contains non-finite values (8 NaN, 0 inf) ...
    """


class SaveFormatError(LibnetError, ValueError):
    """A saved file is missing, corrupted, truncated, or from an incompatible version.

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "net.pt")
        ...     with open(path, "wb") as f:
        ...         _ = f.write(b"not a saved network")
        ...     try:
        ...         lnp.LibraryNetwork.load(path, model)
        ...     except lnp.SaveFormatError as e:
        ...         print(type(e).__name__)
        SaveFormatError
    """


class SaveIntegrityError(SaveFormatError):
    """A file loaded with a key is unsigned, or its signature does not verify with that key (edited, or signed
    with another key).

    Example:
        >>> import torch
        >>> import libnet_plugin as lnp
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
        >>> net = lnp.LibraryNetwork(model, layers=["0", "2"], thresholds=0.9).fit(torch.randn(50, 4))
        >>> import os, tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     path = os.path.join(d, "net.pt")
        ...     net.save(path, key="secret")
        ...     try:
        ...         lnp.LibraryNetwork.load(path, model, key="another")
        ...     except lnp.SaveIntegrityError as e:
        ...         print(type(e).__name__, isinstance(e, lnp.SaveFormatError))
        SaveIntegrityError True
    """


class LibraryTooLargeWarning(UserWarning):
    """A library keeps more than half of its layer's training inputs: its theta is too close to 1 for that layer."""
