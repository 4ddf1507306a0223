"""Serves a TUF repository's files to python-tuf's ngclient straight out of an artifact store.

The only piece of the client side that knows about stores. The agent's gRPC fetcher implements the
same ``FetcherInterface`` over the same URLs (:mod:`edgefleet_core.signing.layout`).
"""

from __future__ import annotations

from collections.abc import Iterator

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet_core.errors import StoreError
from edgefleet_core.signing.layout import path_from_url
from edgefleet_core.store.base import ArtifactStore, validate_key

CHUNK_BYTES = 1024 * 1024
"""Read size: ngclient stops asking after the chunk that crosses the signed length (endless data)."""


class StoreFetcher(FetcherInterface):
    """Reads ``edgefleet-tuf:`` URLs from ``store`` under ``prefix``, in :data:`CHUNK_BYTES` ranges."""

    def __init__(self, store: ArtifactStore, prefix: str = "tuf/", *, chunk_bytes: int = CHUNK_BYTES) -> None:
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
        self._store = store
        self._prefix = prefix
        self._chunk_bytes = chunk_bytes

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            key = validate_key(f"{self._prefix}{path_from_url(url)}")
            # Checked up front, not in the generator: ngclient learns that a root version does not
            # exist (the end of root rotation) from a 404 raised here.
            found = self._store.stat(key)
        except (ValueError, StoreError) as e:
            raise DownloadError(f"cannot fetch {url}: {e}") from e
        if found is None:
            raise DownloadHTTPError(f"{url} is not in the store", 404)
        return self._chunks(url, key)

    def _chunks(self, url: str, key: str) -> Iterator[bytes]:
        offset = 0
        while True:
            try:
                chunk = self._store.get_range(key, offset, self._chunk_bytes)
            except StoreError as e:
                raise DownloadError(f"cannot fetch {url}: {e}") from e
            if not chunk:
                return
            offset += len(chunk)
            yield chunk
