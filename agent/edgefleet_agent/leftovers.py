"""Temp files that an interrupted atomic write leaves in the agent's state, removed at start-up.

Every write of state goes through a temp file that is renamed into place (``edgefleet_core.atomic``:
``.NAME.XXXX.tmp``; python-tuf's metadata writes: ``tmpXXXX`` beside the metadata). A process killed
between the two leaves the temp file behind; nothing reads it, but on a small device disk they add
up with every power cut. Model slots (``models/``) clear their own leftovers
(:meth:`~edgefleet_agent.slots.ModelSlots.clear_leftovers`) and partial downloads (``downloads/``)
are kept on purpose, to be resumed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

_KEPT: Final = frozenset({"models", "downloads"})
"""Top-level folders that manage their own unfinished files."""
_TUF_DIRS: Final = frozenset({"metadata", "root_history"})
"""Folders where python-tuf writes through ``tempfile.NamedTemporaryFile`` (prefix ``tmp``)."""


def _interrupted(path: Path) -> bool:
    name = path.name
    if name.startswith(".") and name.endswith(".tmp"):
        return True
    return name.startswith("tmp") and path.parent.name in _TUF_DIRS


def clear_interrupted_writes(state_dir: Path) -> list[str]:
    """Remove what interrupted atomic writes left under ``state_dir``; the paths removed, relative.

    Call it at start-up, before anything writes state (a temp file in use would be removed).
    """
    removed: list[str] = []
    if not state_dir.is_dir():
        return removed
    for folder, dirs, files in os.walk(state_dir):
        here = Path(folder)
        if here == state_dir:
            dirs[:] = [d for d in dirs if d not in _KEPT]
        for name in files:
            path = here / name
            if not _interrupted(path):
                continue
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot remove %s, left by an interrupted write: %s", path, exc)
                continue
            removed.append(str(path.relative_to(state_dir)))
    return sorted(removed)
