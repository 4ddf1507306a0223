"""Atomic writes: a reader sees the old file (or folder) or the whole new one, never a part of it.

The python-tuf way (``_persist_metadata``): a temporary file in the target directory, fsync,
``os.replace``, then fsync of the directory so the rename itself survives a crash. Every place
EdgeFleet keeps state or publishes an output writes through here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

PUBLIC = 0o644
"""Mode of outputs others read (models, reports, data)."""
PRIVATE = 0o600
"""Mode of secrets (private keys)."""


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes, *, mode: int = PUBLIC) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600; set the mode before the content lands, so a secret is never readable.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_dir_atomic(out_dir: Path, files: Mapping[str, bytes]) -> None:
    """Publish a folder of files all at once: a reader sees the old folder or the complete new one.

    The files are written and synced in a sibling temporary folder which then takes the place of
    ``out_dir`` by rename; an existing ``out_dir`` is moved aside first and removed after.
    """
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            if Path(name).name != name:
                raise ValueError(f"output file name must not contain a folder: {name!r}")
            with open(staging / name, "wb") as handle:
                os.fchmod(handle.fileno(), PUBLIC)
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        fsync_dir(staging)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        try:
            os.replace(staging, out_dir)
        except BaseException:
            if old is not None:
                os.replace(old, out_dir)  # put the previous folder back where it was
            raise
        fsync_dir(out_dir.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
