"""The state folder of ``edgefleet up`` (``./.edgefleet`` by default) and its lock.

Layout::

    STATE/
      lock               held (flock) while an `edgefleet up` runs: one writer at a time
      keys/              the signing keys, created on the first run (0700, files 0600)
      store/             the artifact store (file://): tuf/ the signed repository, fleet/ assignments
      cache/             optimized variants by variant id (a rebuild of the same inputs reuses them)
      api/               the embedded API's objects (see :mod:`.api`)
      trusted-root.json  the repository's root: what devices are given to trust
      .gitignore         "*": the folder holds private keys and must never be committed
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgefleet_core.atomic import write_file_atomic
from edgefleet_core.errors import SigningError
from edgefleet_core.signing.keys import INDEX_FILE, KeySet
from edgefleet_operator.local.errors import StateError

DEFAULT_STATE_DIR: Final = Path(".edgefleet")
TRUSTED_ROOT: Final = "trusted-root.json"


@dataclass(frozen=True)
class StateDir:
    """Paths of one state folder, made absolute once (relative paths must not move with the cwd)."""

    root: Path

    @classmethod
    def at(cls, path: Path) -> StateDir:
        return cls(path.absolute())

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def api_dir(self) -> Path:
        return self.root / "api"

    @property
    def trusted_root(self) -> Path:
        return self.root / TRUSTED_ROOT

    @property
    def store_url(self) -> str:
        """The default artifact store: ``store/`` as a ``file://`` URL."""
        return self.store_dir.as_uri()

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state folder for this process; :class:`StateError` when another one holds it.

        An advisory ``flock``: the kernel drops it when the holder dies, so a killed run never
        leaves a stale lock behind.
        """
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            if not (self.root / ".gitignore").exists():
                write_file_atomic(self.root / ".gitignore", b"# private signing keys live here: never commit\n*\n")
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StateError(f"cannot use {self.root} as the state folder: {exc.strerror or exc}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(
                    f"{self.root} is in use by another `edgefleet up`; stop it or give another --state"
                ) from None
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def ensure_keys(self) -> bool:
        """Create the signing keys on the first run; True when they were created now."""
        if (self.keys_dir / INDEX_FILE).is_file():
            return False
        if self.keys_dir.is_dir() and any(self.keys_dir.iterdir()):
            raise StateError(
                f"{self.keys_dir} holds files but no key set ({INDEX_FILE} is missing); "
                "restore it, or remove the state folder to start afresh"
            )
        try:
            KeySet.generate().save(self.keys_dir)
        except SigningError as exc:
            raise StateError(str(exc)) from None
        return True

    def write_trusted_root(self, root: bytes) -> bool:
        """Keep ``trusted-root.json`` equal to the repository's root; True when it was (re)written."""
        try:
            if self.trusted_root.is_file() and self.trusted_root.read_bytes() == root:
                return False
            write_file_atomic(self.trusted_root, root)
        except OSError as exc:
            raise StateError(f"cannot write {self.trusted_root}: {exc.strerror or exc}") from None
        return True
