"""Where TUF files live, shared by the repository (writer) and every fetcher (reader).

A repository is a tree of relative paths, ``metadata/<file>`` and ``targets/<dir>/<sha256>.<name>``,
under a store prefix. The client names them with URLs of one scheme, :data:`URL_SCHEME`, that says
nothing about the transport: the store fetcher maps them to store keys, the agent's gRPC fetcher
will map them to requests. Consistent snapshots are always on, so every file but ``timestamp.json``
is immutable once written and a reader never sees half a version.
"""

from __future__ import annotations

import re

URL_SCHEME = "edgefleet-tuf:"
METADATA_DIR = "metadata/"
TARGETS_DIR = "targets/"
METADATA_BASE_URL = f"{URL_SCHEME}{METADATA_DIR}"
TARGETS_BASE_URL = f"{URL_SCHEME}{TARGETS_DIR}"

# The store's key grammar (edgefleet_core.store.base) restated here so that the client side does
# not depend on the store package.
_SEGMENT = r"[A-Za-z0-9._-]+"
_RELATIVE_PATH = re.compile(rf"^{_SEGMENT}(/{_SEGMENT})*$")


def is_safe_path(path: str) -> bool:
    """True if ``path`` is relative, of ``[A-Za-z0-9._-]`` segments, with no ``.`` or ``..``."""
    return bool(_RELATIVE_PATH.fullmatch(path)) and not any(part in (".", "..") for part in path.split("/"))


def path_from_url(url: str) -> str:
    """The repository-relative path a client URL names; :class:`ValueError` for any other URL."""
    if not url.startswith(URL_SCHEME):
        raise ValueError(f"not a TUF repository URL: {url!r}")
    path = url[len(URL_SCHEME) :]
    if not is_safe_path(path) or not path.startswith((METADATA_DIR, TARGETS_DIR)):
        raise ValueError(f"not a TUF repository path: {path!r}")
    return path


def metadata_path(filename: str) -> str:
    """``metadata/<filename>``, e.g. ``metadata/3.targets.json``."""
    return f"{METADATA_DIR}{filename}"


def target_path(target: str, sha256: str) -> str:
    """Where a target's bytes live: the hash-prefixed name python-tuf's ngclient asks for.

    ``cpu/default/resnet/1.0.0/model.onnx`` → ``targets/cpu/default/resnet/1.0.0/<sha256>.model.onnx``
    (the digest goes before the file name, not the whole path, as in the TUF specification).
    """
    directory, sep, name = target.rpartition("/")
    return f"{TARGETS_DIR}{directory}{sep}{sha256}.{name}"
