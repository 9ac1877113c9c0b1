r"""A griffe extension for the documentation site (mkdocs.yml), for two habits of this code base's docstrings.

Examples are headed ``Example:``, which the Google-style parser reads as an admonition: they become
``Examples:`` sections, so that mkdocstrings renders the doctests as code. Sphinx roles
(``:class:`~libnet_plugin.probe.ProbeResult```) become inline code (```ProbeResult```).

Example:
    >>> fix_docstring("See :class:`~libnet_plugin.probe.ProbeResult`.\n\nExample:\n    >>> 1\n    1")
    'See `ProbeResult`.\n\nExamples:\n    >>> 1\n    1'
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`(~?)([\w.]+)`")
#: an ``Args:`` section that only refers elsewhere ("See ...") is a paragraph, not a list of parameters
_ARGS_SEE = re.compile(r"^(\s*)Args:\n\s*(See [^\n]*)$", re.M)


def fix_docstring(text: str) -> str:
    """``Example:`` headings to ``Examples:``, Sphinx roles to inline code, ``Args: See ...`` to a sentence."""
    text = _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)
    text = _ARGS_SEE.sub(r"\1Arguments: \2", text)
    return _EXAMPLE.sub(r"\1Examples:", text)


class ExampleSections(griffe.Extension):
    """Apply :func:`fix_docstring` to every docstring as it is loaded."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = fix_docstring(obj.docstring.value)
