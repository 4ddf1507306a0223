"""The local-directory artifact store (embedded mode): one file per key under a root folder.

Writes are atomic the python-tuf way: a temp file in the target directory, fsync, ``os.replace``,
then fsync of the directory so the rename itself survives a crash. Temp files carry a ``~`` in
their name, a character keys may not contain, so they can never be mistaken for (or collide with)
an object.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from pathlib import Path

from edgefleet_core.errors import StoreError, StoreLimitExceeded, StoreNotFound
from edgefleet_core.store.base import ObjectStat, validate_key

_TEMP_MARK = ".~tmp-"


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise StoreError(f"invalid range: offset {offset} and length {length} must not be negative")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalStore:
    """An :class:`~edgefleet_core.store.base.ArtifactStore` over a directory.

    Keys ``a/b/c`` map to ``root/a/b/c``. A key may not be both an object and a "folder" of other
    keys here (S3 allows ``a`` and ``a/b`` side by side; a file system does not): such a write is a
    :class:`StoreError`. Symbolic links that lead outside ``root`` are refused.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    # -- paths -------------------------------------------------------------------------------

    def _real_root(self) -> Path:
        return Path(os.path.realpath(self.root))

    def _path(self, key: str) -> Path:
        """The file of ``key``; refuses a path that symlinks lead outside the root."""
        validate_key(key)
        path = self.root.joinpath(*key.split("/"))
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root()):
            raise StoreError(f"key {key!r} resolves outside the store root {self.root} (symbolic link)")
        return path

    def _makedirs(self, directory: Path, key: str) -> None:
        """Create ``directory`` and missing parents, fsyncing each parent that gained an entry."""
        missing: list[Path] = []
        current = directory
        while not current.is_dir():
            # is_dir() again: a concurrent writer may have made the folder since the loop's test.
            if current.is_symlink() or (current.exists() and not current.is_dir()):
                raise StoreError(f"cannot store {key!r}: {current} is an object, not a folder")
            missing.append(current)
            current = current.parent
        for folder in reversed(missing):
            with contextlib.suppress(FileExistsError):  # a concurrent writer made it first
                folder.mkdir()
            _fsync_dir(folder.parent)

    # -- protocol ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            self._write(key, path, data)
        except OSError as exc:  # permissions, a full disk, a read-only mount
            raise StoreError(f"cannot write {key!r} under {self.root}: {exc}") from exc

    def create(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        try:
            self._makedirs(path.parent, key)
            temp = path.with_name(f"{path.name}{_TEMP_MARK}{secrets.token_hex(8)}")
            try:
                with open(temp, "xb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                # link() never replaces: of racing creators exactly one succeeds, and a reader sees
                # the whole object or none (unlike an O_EXCL file written in place).
                os.link(temp, path)
            except FileExistsError:
                return False
            finally:
                temp.unlink(missing_ok=True)
            _fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot create {key!r} under {self.root}: {exc}") from exc
        return True

    def _write(self, key: str, path: Path, data: bytes) -> None:
        self._makedirs(path.parent, key)
        if path.is_dir():
            raise StoreError(f"cannot store {key!r}: {path} is a folder of other keys")
        temp = path.with_name(f"{path.name}{_TEMP_MARK}{secrets.token_hex(8)}")
        try:
            with open(temp, "xb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    def get(self, key: str, *, max_bytes: int) -> bytes:
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                size = os.fstat(handle.fileno()).st_size
                if size > max_bytes:
                    raise StoreLimitExceeded(f"object {key!r} is {size} bytes, over the cap of {max_bytes}")
                # Read one byte past the cap: a file that grew since fstat is caught, not read whole.
                data = handle.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise StoreNotFound(f"no object {key!r} in {self.root}") from exc
        except IsADirectoryError as exc:
            raise StoreNotFound(f"no object {key!r} in {self.root} (it is a folder of other keys)") from exc
        except OSError as exc:  # permissions, I/O errors: the store failed, say so in its terms
            raise StoreError(f"cannot read object {key!r} in {self.root}: {exc.strerror or exc}") from exc
        if len(data) > max_bytes:
            raise StoreLimitExceeded(f"object {key!r} grew past the cap of {max_bytes} bytes while read")
        return data

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        _check_range(offset, length)
        path = self._path(key)
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                return handle.read(length)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise StoreNotFound(f"no object {key!r} in {self.root}") from exc
        except OSError as exc:
            raise StoreError(f"cannot read object {key!r} in {self.root}: {exc.strerror or exc}") from exc

    def stat(self, key: str) -> ObjectStat | None:
        path = self._path(key)
        try:
            info = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not path.is_file():
            return None
        return ObjectStat(key=key, size=info.st_size)

    def list(self, prefix: str = "") -> list[str]:
        root = self.root
        if not root.is_dir():
            return []
        real_root = self._real_root()
        keys: list[str] = []
        # followlinks=False: a linked folder is not walked, so nothing outside the root is listed.
        for dirpath, _dirnames, filenames in os.walk(root):
            folder = Path(dirpath)
            for name in filenames:
                path = folder / name
                key = path.relative_to(root).as_posix()
                if not key.startswith(prefix):
                    continue
                try:
                    validate_key(key)  # skips temp files (their '~') and anything else not ours
                except StoreError:
                    continue
                if Path(os.path.realpath(path)).is_relative_to(real_root) and path.is_file():
                    keys.append(key)
        keys.sort()
        return keys

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except (IsADirectoryError, NotADirectoryError):
            return
        except PermissionError as exc:
            if exc.errno == errno.EISDIR or path.is_dir():  # macOS reports a folder as EPERM
                return
            raise
        _fsync_dir(path.parent)
