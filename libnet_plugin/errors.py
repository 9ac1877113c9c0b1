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
    """Base class of every error raised by libnet-plugin on bad input or state."""


class NotFittedError(LibnetError, ValueError, AttributeError):
    """Raised when a method that needs a fitted object is called before ``fit``.

    Like scikit-learn's ``NotFittedError`` it derives from both ``ValueError`` and ``AttributeError``.
    """


class LayerNotFoundError(LibnetError, KeyError):
    """A requested layer does not exist in the model, or never produced an output."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(LibnetError, ValueError):
    """An input or activation does not have the shape the fitted object expects."""


class NonFiniteError(LibnetError, ValueError):
    """An input or activation contains NaN or infinity."""


class SaveFormatError(LibnetError, ValueError):
    """A saved file is missing, corrupted, truncated, or from an incompatible version."""


class SaveIntegrityError(SaveFormatError):
    """A file loaded with a key is unsigned, or its signature does not verify with that key (edited, or signed
    with another key)."""


class LibraryTooLargeWarning(UserWarning):
    """A library keeps more than half of its layer's training inputs: its theta is too close to 1 for that layer."""
