"""Conformance of every served library to the Library protocol (libnet_plugin/library.py).

The checks are the public ones of ``libnet_plugin.testing``, parametrized here over
``libnet_plugin.builtins.LIBRARIES`` and served by the built-in hook, so a new built-in library is checked
by every property without editing this module. The HAPs are the ``fc1`` activations (32 units) of the
checks' small model; the sparse and projected libraries see 8 of them.
"""

from __future__ import annotations

import pytest

import libnet_plugin as lnp
from libnet_plugin.builtins import LIBRARIES
from libnet_plugin.testing import library_checks

NAMES = sorted(LIBRARIES)
#: settings that make a library see less than the checks' layers (fc1: 32 units, fc2: 16, out: 4)
SIZES: dict[str, dict] = {"sparse": {"n_units": 8}, "projected": {"n_components": 8}}

#: ``{(check name, library name): reason}`` of properties known not to hold; marked xfail(strict=True)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def cases() -> list:
    """Every (served library, check) pair, with the known failures marked ``xfail(strict=True)``."""
    out = []
    for name in NAMES:
        for check in library_checks(LIBRARIES[name], name=name, options=SIZES.get(name, {}),
                                    plugin_manager=lnp.get_plugin_manager(autoload=False)):
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(check.name, name)])]
                     if (check.name, name) in KNOWN_FAILURES else [])
            out.append(pytest.param(check, id=f"{name}-{check.name}", marks=marks))
    return out


@pytest.mark.parametrize("check", cases())
def test_library_conformance(check):
    check()


def test_every_check_runs_on_every_library():
    checks = {c.values[0].name for c in cases()}
    assert len(cases()) == len(NAMES) * len(checks) and len(checks) == 9


def test_a_broken_library_fails_its_check():
    from libnet_plugin.library import ExactLibrary
    from libnet_plugin.testing import check_library

    class Forgetful(ExactLibrary):  # reports every row as stored but keeps none of them
        name = "forgetful"

        def partial_fit(self, haps, indices):
            return super().partial_fit(haps, indices) | True

    with pytest.raises(AssertionError, match="check_partial_fit_reports_what_it_stores failed on 'forgetful'"):
        check_library(Forgetful)
