"""Conformance of every served detector to the ConsistencyScore contract (libnet_plugin/detectors/api.py).

The checks are the public ones of ``libnet_plugin.testing`` (what a plugin author runs on a detector of
their own), parametrized here over ``libnet_plugin.builtins.DETECTORS`` and served by the built-in hook, so
a new built-in detector is checked by every property without editing this module. Small seeded data only
(the checks build their own model and data).
"""

from __future__ import annotations

import pytest

import libnet_plugin as lnp
from libnet_plugin.builtins import DETECTORS
from libnet_plugin.testing import detector_checks

NAMES = sorted(DETECTORS)

#: ``{(check name, detector name): reason}`` of properties known not to hold; marked xfail(strict=True)
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def cases() -> list:
    """Every (served detector, check) pair, with the known failures marked ``xfail(strict=True)``."""
    out = []
    for name in NAMES:
        for check in detector_checks(DETECTORS[name], name=name, plugin_manager=lnp.get_plugin_manager(autoload=False)):
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[(check.name, name)])]
                     if (check.name, name) in KNOWN_FAILURES else [])
            out.append(pytest.param(check, id=f"{name}-{check.name}", marks=marks))
    return out


@pytest.mark.parametrize("check", cases())
def test_detector_conformance(check):
    check()


def test_every_check_runs_on_every_detector():
    checks = {c.values[0].name for c in cases()}
    assert len(cases()) == len(NAMES) * len(checks) and len(checks) == 8
