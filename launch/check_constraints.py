#!/usr/bin/env python3
"""Check a venv against launch/constraints.txt (and constraints-gcs.txt, the worker-only
pins) after ``remote_setup.sh`` installed into it.

``pip install -c`` only constrains what it resolves; a package already there, or one
installed later without ``-c``, can still differ. So after installing, every pinned
package that is installed must have its pinned version, and the ones training needs
(``REQUIRED``) must be installed at all. Run it with the venv's own Python:

    .venv/bin/python launch/check_constraints.py [FILE ...]   # default: both files
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

#: Installed on every worker; the rest of the file pins whatever else is there.
REQUIRED = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")
#: constraints.txt (the development venv) and the packages only workers install.
DEFAULT_FILES = ("constraints.txt", "constraints-gcs.txt")


def canonical(name: str) -> str:
    """PEP 503 names: ``orbax_checkpoint`` and ``Orbax.Checkpoint`` are one package."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            if not sep:
                raise SystemExit(f"{path}: not NAME==VERSION: {line!r}")
            pins[canonical(name.split("[", 1)[0])] = version.split(";", 1)[0].strip()
    return pins


def installed() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions()
            if d.metadata["Name"]}


def problems(pins: dict[str, str], have: dict[str, str]) -> list[str]:
    out = [f"{name}: {have[name]} installed, constraints say {version}"
           for name, version in sorted(pins.items()) if name in have and have[name] != version]
    out += [f"{name}: not installed" for name in REQUIRED if canonical(name) not in have]
    return out


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [Path(__file__).with_name(f) for f in DEFAULT_FILES]
    pins = {}
    for path in paths:
        pins.update(read_pins(path))
    found = problems(pins, installed())
    for line in found:
        print(f"check_constraints: {line}", file=sys.stderr)
    if not found:
        print(f"check_constraints: {sum(n in pins for n in installed())} pinned packages "
              f"match {', '.join(p.name for p in paths)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
