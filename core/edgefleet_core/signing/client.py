"""The reading side of TUF: python-tuf's ngclient ``Updater`` behind a small API that raises our errors.

Every check (signatures and thresholds, expiry, version monotonicity, snapshot consistency, lengths
and hashes, root rotation) is python-tuf's; this module only chooses where trusted state lives,
bounds what a caller downloads, and turns python-tuf's refusals into :class:`VerificationError`
(the python-tuf class name leads the ``reason``). It knows nothing about stores: bytes arrive
through any ``FetcherInterface`` that serves :mod:`edgefleet_core.signing.layout` URLs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib import parse

from tuf.api.exceptions import DownloadError, RepositoryError

# python-tuf re-exports these without ``as`` aliases, which mypy's strict mode rejects.
from tuf.api.metadata import Metadata, TargetFile, Targets  # type: ignore[attr-defined]
from tuf.ngclient.config import UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from edgefleet_core.errors import VerificationError
from edgefleet_core.signing.layout import METADATA_BASE_URL, TARGETS_BASE_URL


@contextlib.contextmanager
def _refusals(what: str) -> Iterator[None]:
    try:
        yield
    except (RepositoryError, DownloadError) as e:
        raise VerificationError(what, f"{type(e).__name__}: {e}") from e


class TufClient:
    """Verified access to one TUF repository, trusting ``trusted_root`` (root metadata bytes) to start.

    ``metadata_dir`` keeps what was verified last (newer roots, timestamp, snapshot, targets): it is
    what makes rollback and freeze detectable across runs, so keep it between runs. ``targets_dir``,
    if given, caches verified targets (re-verified on every use).
    """

    def __init__(
        self,
        fetcher: FetcherInterface,
        trusted_root: bytes,
        metadata_dir: Path,
        targets_dir: Path | None = None,
        *,
        config: UpdaterConfig | None = None,
    ) -> None:
        self._fetcher = fetcher
        self._trusted_root = trusted_root
        self._metadata_dir = metadata_dir
        self._targets_dir = targets_dir
        self._config = config
        self._metadata_dir.mkdir(parents=True, exist_ok=True)
        if targets_dir is not None:
            targets_dir.mkdir(parents=True, exist_ok=True)
        self._updater = self._new_updater()  # refuses a malformed trusted root right away
        self._refreshed = False

    def _new_updater(self) -> Updater:
        with _refusals("trusted root"):
            return Updater(
                metadata_dir=str(self._metadata_dir),
                metadata_base_url=METADATA_BASE_URL,
                target_base_url=TARGETS_BASE_URL,
                fetcher=self._fetcher,
                config=self._config,
                # Always start from the root the caller trusts; newer roots verified earlier are
                # taken from metadata_dir's root history, so rotations are not repeated remotely.
                bootstrap=self._trusted_root,
            )

    def refresh(self) -> None:
        """Fetch and verify root (following rotations), timestamp, snapshot and targets."""
        if self._refreshed:
            # An Updater refreshes once in its life; a new one resumes from metadata_dir.
            self._updater = self._new_updater()
        self._refreshed = True
        with _refusals("metadata"):
            self._updater.refresh()

    def _ensure_refreshed(self) -> Updater:
        if not self._refreshed:
            self.refresh()
        return self._updater

    def target_info(self, path: str) -> TargetFile | None:
        """The signed length, hashes and custom fields of a target, or ``None`` if it is not listed."""
        updater = self._ensure_refreshed()
        with _refusals(path):
            return updater.get_targetinfo(path)

    def targets_for(self, prefix: str) -> list[TargetFile]:
        """Every listed target whose path starts with ``prefix``, sorted by path."""
        updater = self._ensure_refreshed()
        # The Updater has no public listing. The targets.json it persisted is the one it verified
        # in this refresh; each entry is then looked up through the Updater again, so what we
        # return comes from the verified in-memory set, not from the file.
        with _refusals("targets"):
            listed = Metadata[Targets].from_bytes((self._metadata_dir / "targets.json").read_bytes())
            found = [updater.get_targetinfo(p) for p in sorted(listed.signed.targets) if p.startswith(prefix)]
        return [info for info in found if info is not None]

    def download(self, path: str, *, max_length: int) -> bytes:
        """The target's bytes, verified against its signed length and hashes; at most ``max_length``."""
        info = self.target_info(path)
        if info is None:
            raise VerificationError(path, "not listed in the signed targets metadata")
        if info.length > max_length:
            raise VerificationError(path, f"signed length {info.length} is over the limit of {max_length} bytes")
        cache = None if self._targets_dir is None else self._targets_dir / parse.quote(info.path, "")
        if cache is not None and self._updater.find_cached_target(info, str(cache)) is not None:
            return self._verified(info, cache.read_bytes())
        with tempfile.TemporaryDirectory(dir=self._targets_dir) as scratch:
            landing = Path(scratch, "target")
            with _refusals(path):
                self._updater.download_target(info, str(landing))
            data = self._verified(info, landing.read_bytes())
            if cache is not None:
                with landing.open("rb") as f:
                    os.fsync(f.fileno())
                os.replace(landing, cache)
        return data

    @staticmethod
    def _verified(info: TargetFile, data: bytes) -> bytes:
        # ngclient verified the file; checking the bytes we actually return closes the gap between
        # its check and our read.
        with _refusals(info.path):
            info.verify_length_and_hashes(data)
        return data
