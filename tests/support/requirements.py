"""The images' pinned dependency lists (agent/requirements.txt, operator/requirements.txt), read strictly."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.utils import canonicalize_name

PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[0-9][A-Za-z0-9.+!-]*)$")
NOT_INSTALLED_ON_LINUX = frozenset({"colorama"})
"""Requirements that never apply on Linux (typer's Windows-only colour support)."""


def pinned(path: Path) -> dict[str, str]:
    """Canonical distribution name → pinned version, failing on any line that is not ``name==version``."""
    pins: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{number}: {raw!r} is not pinned as name==version"
        name = canonicalize_name(match["name"])
        assert name not in pins, f"{path.name}:{number}: {name} is listed twice"
        pins[name] = match["version"]
    return pins
