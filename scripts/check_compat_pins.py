"""Check that installing the project kept the packages a user already had (``make test-compat``).

    python scripts/check_compat_pins.py torch==2.14.1 torchvision==0.29.1 timm==1.0.31

Exits 1, naming each package, when an installed version is not the one asked for: the package's own
requirements would then have replaced the user's torch (pins belong in the lock, not in the package).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def main(pins: list[str]) -> int:
    bad = []
    for pin in pins:
        name, _, want = pin.partition("==")
        try:
            have = version(name)
        except PackageNotFoundError:
            have = "not installed"
        # a local build tag (2.14.1+cpu) is the same release
        if have.split("+")[0] != want:
            bad.append(f"{name}: {have}, expected {want}")
    for line in bad:
        print(f"error: {line}", file=sys.stderr)
    if not bad:
        print("kept:", ", ".join(pins))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
