"""python-tuf's network seam over the gateway: ``edgefleet-tuf:`` URLs become FetchMetadata/FetchTarget streams.

ngclient verifies everything it receives (signatures, lengths, hashes); this fetcher adds what only
the transport can do:

* the length cap ngclient passes to ``download_bytes``/``download_file`` is sent as the request's
  ``max_length`` and enforced on what arrives (the gateway is not trusted to honour it);
* every chunk is checked to be contiguous and consistent with the file's announced length;
* immutable files (every target and versioned metadata: consistent snapshots make them
  write-once) are appended to ``STATE/downloads/<sha256 of path>.part`` as they arrive, and an
  interrupted stream — or a process that died — resumes from the partial file's length;
* a target's bytes are checked against the sha256 embedded in its file name before ngclient sees
  any of them, so a chunk corrupted in transit is refetched once from the start and a file that
  still does not match is refused; the partial file is deleted either way, never kept.

Files are handed to ngclient only once complete, so nothing it reads can be un-read by a retry.
The gateway is called synchronously because ngclient is synchronous; the agent runs updates in a
worker thread.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

import grpc
from tuf.api.exceptions import (
    DownloadError,
    DownloadHTTPError,
    DownloadLengthMismatchError,
    LengthOrHashMismatchError,
)
from tuf.ngclient.fetcher import FetcherInterface

from edgefleet_agent.connection import Backoff, BackoffPolicy, rpc_status
from edgefleet_core.failpoints import failpoint
from edgefleet_core.signing.layout import METADATA_DIR, TARGETS_DIR, path_from_url
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

DOWNLOADS_DIR = "downloads"
READ_BYTES = 1024 * 1024
"""Size of the pieces a completed file is handed to ngclient in."""
DEFAULT_MAX_ATTEMPTS = 5
"""Interrupted attempts in a row (without any new byte arriving) before a fetch gives up."""
DEFAULT_IDLE_TIMEOUT_S = 180.0
"""A call with no chunk for this long is cancelled and resumed (a gateway that stalls without closing).

A chunk is up to 1 MiB and arrives whole, so this also bounds the slowest link that can finish a
download: 1 MiB in 180 s is about 47 kbit/s (a poor cellular link), not a stalled gateway."""
DEFAULT_CALL_TIMEOUT_S = 600.0
"""Deadline of one call; a longer download simply resumes in a new call."""
STOP_POLL_S = 0.1
"""How often a call in progress checks ``stop`` (and the idle timeout) while no chunk arrives."""
PARTIAL_MAX_AGE_S = 7 * 24 * 3600.0
"""Partial downloads older than this are removed at start-up: nothing is going to resume them."""

_METADATA_NAME = re.compile(r"^(?:(?P<version>[1-9][0-9]{0,19})\.)?(?P<role>.+)\.json$")
_DIGEST_PREFIX = re.compile(r"^(?P<sha256>[0-9a-f]{64})\.")
# UNKNOWN is how grpc reports a transport torn down mid-stream (e.g. "Stream removed" after a TLS
# record failed its MAC check on a corrupted byte); the gateway never answers UNKNOWN on purpose.
_RESUMABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


class _Interrupted(Exception):  # control flow inside this module, never escapes
    """The stream ended before the eof chunk; resume by offset."""


class _OffsetBeyondEnd(Exception):
    """The gateway said the resume offset is past the end of the file (OUT_OF_RANGE)."""


def clean_partials(state_dir: Path, *, older_than: float | None = None) -> list[str]:
    """Remove ``STATE/downloads/*.part``: all of them, or those not modified for ``older_than`` seconds.

    Call it when no download is in progress (one at a time: the worker's thread is idle).
    """
    downloads = state_dir / DOWNLOADS_DIR
    removed: list[str] = []
    try:
        entries = list(downloads.glob("*.part"))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        try:
            if older_than is not None and now - entry.stat().st_mtime < older_than:
                continue
            entry.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("cannot remove the partial download %s: %s", entry, e)
            continue
        removed.append(entry.name)
    return removed


class _Watchdog:
    """Cancels a call that stalls (no chunk for ``idle`` seconds) or whose fetch was told to stop.

    gRPC's blocking iterator only returns on a message or the end of the call, so ``stop`` and the
    idle limit are checked from a helper thread that cancels the call; the iterator then raises.
    """

    def __init__(self, call: _ChunkStream, stop: Callable[[], bool], idle: float) -> None:
        self._call = call
        self._stop = stop
        self._idle = idle
        self._last = time.monotonic()
        self._done = threading.Event()
        self.reason: str | None = None
        """``"stopped"`` or ``"idle"`` once the watchdog cancelled the call."""
        self._thread = threading.Thread(target=self._watch, name="edgefleet-fetch-watchdog", daemon=True)
        self._thread.start()

    def alive(self) -> None:
        """A chunk arrived."""
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(STOP_POLL_S, self._idle)):
            if self._stop():
                self.reason = "stopped"
            elif time.monotonic() - self._last > self._idle:
                self.reason = "idle"
            else:
                continue
            self._call.cancel()
            return

    def close(self) -> None:
        self._done.set()


class _ChunkStream(Protocol):
    def __iter__(self) -> Iterator[fleet_pb2.Chunk]: ...
    def cancel(self) -> bool: ...


@dataclass(frozen=True)
class _Request:
    """One file to fetch: how to ask for it and how to keep what arrives."""

    path: str
    """Repository path, ``metadata/…`` or ``targets/…``: names the file in messages and partials."""
    open_stream: Callable[[int, int], _ChunkStream]
    """(offset, max_length) → the gateway's chunk stream."""
    immutable: bool
    """Written once in the repository, so a partial copy may be resumed, even by a later process."""
    sha256: str | None
    """Digest the complete file must have (a target's file-name prefix)."""


class _Sink:
    """Where the bytes of one file accumulate: a ``.part`` file (resumable) or memory."""

    def __init__(self, partial: Path | None, *, fault_point: str | None = None) -> None:
        self.partial = partial
        self._memory = io.BytesIO()
        self._fault_point = fault_point
        """Failpoint hit after each chunk is kept (fault tests kill the process mid-download there)."""

    def size(self) -> int:
        if self.partial is None:
            return self._memory.tell()
        try:
            return self.partial.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, data: bytes) -> None:
        if self.partial is None:
            self._memory.write(data)
            return
        # Flushed per chunk (closing the file): what survives a crash is a prefix of the file.
        with self.partial.open("ab") as f:
            f.write(data)
        if self._fault_point is not None:
            failpoint(self._fault_point)

    def discard(self) -> None:
        self._memory = io.BytesIO()
        if self.partial is not None:
            self.partial.unlink(missing_ok=True)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for piece in self.pieces(remove=False):
            digest.update(piece)
        return digest.hexdigest()

    def pieces(self, *, remove: bool) -> Iterator[bytes]:
        """The complete file in :data:`READ_BYTES` pieces; ``remove`` deletes it once read (or abandoned)."""
        if self.partial is None:
            data = self._memory.getvalue()
            for start in range(0, len(data), READ_BYTES):
                yield data[start : start + READ_BYTES]
            return
        try:
            with self.partial.open("rb") as f:
                while piece := f.read(READ_BYTES):
                    yield piece
        finally:
            if remove:
                self.partial.unlink(missing_ok=True)


class _ChunkCheck:
    """The order and bounds every chunk of one call must keep (fleet.proto ``Chunk``)."""

    def __init__(self, path: str, offset: int, cap: int) -> None:
        self.path = path
        self.expected = offset
        self.cap = cap
        self.total: int | None = None

    def accept(self, chunk: fleet_pb2.Chunk) -> bool:
        """Check one chunk; True when it is the last one. :class:`DownloadError` on any violation."""
        if self.total is None:
            if chunk.total_length > self.cap:
                raise DownloadLengthMismatchError(
                    f"{self.path}: the gateway announced {chunk.total_length} bytes, over the limit of {self.cap}"
                )
            self.total = chunk.total_length
        if chunk.offset != self.expected or chunk.total_length != self.total:
            raise DownloadError(
                f"{self.path}: broken chunk stream (chunk at {chunk.offset} of {chunk.total_length} bytes, "
                f"expected {self.expected} of {self.total})"
            )
        if not chunk.data and not (chunk.eof and self.expected == self.total):
            # Only the eof chunk of a file that is complete (or empty) may be empty: anything else
            # is a gateway keeping us busy without progress.
            raise DownloadError(f"{self.path}: empty chunk at {chunk.offset} that is not the end of the file")
        end = self.expected + len(chunk.data)
        if end > self.total:  # total <= cap, so this is also the endless-data defence
            raise DownloadLengthMismatchError(
                f"{self.path}: the gateway sent more than the {self.total} bytes it announced"
            )
        self.expected = end
        if chunk.eof and end != self.total:
            raise DownloadError(f"{self.path}: last chunk ends at {end}, not at {self.total}")
        return chunk.eof


class GrpcTufFetcher(FetcherInterface):
    """Fetches a TUF repository's files from the gateway's FetchMetadata/FetchTarget streams.

    ``channel`` is an mTLS channel to the fleet port. ``state_dir`` holds ``downloads/`` (partial
    files). ``stop`` is polled between chunks and attempts: when it returns True the fetch ends
    with a :class:`DownloadError` (the agent is stopping or the update was superseded).
    ``sleep`` waits between attempts (``threading.Event.wait`` makes the wait interruptible).
    """

    def __init__(
        self,
        channel: grpc.Channel,
        state_dir: Path,
        *,
        backoff: BackoffPolicy | None = None,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        stop: Callable[[], bool] = lambda: False,
        sleep: Callable[[float], object] | None = None,
        rand: Callable[[], float] | None = None,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
        call_timeout: float = DEFAULT_CALL_TIMEOUT_S,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        if idle_timeout <= 0 or call_timeout <= 0:
            raise ValueError(f"timeouts must be positive, not {idle_timeout} and {call_timeout}")
        self._idle_timeout = idle_timeout
        self._call_timeout = call_timeout
        self._stub = fleet_pb2_grpc.FleetGatewayStub(channel)
        self.downloads = state_dir / DOWNLOADS_DIR
        self._policy = backoff or BackoffPolicy()
        self._max_attempts = max_attempts
        self._stop = stop
        self._sleep = sleep
        self._rand = rand
        self._caps = threading.local()

    # ngclient passes its cap to download_file/download_bytes but not to fetch(); capture it here.
    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[Any]]:
        self._caps.value = max_length
        try:
            with super().download_file(url, max_length) as f:
                yield f
        finally:
            self._caps.value = None

    def _fetch(self, url: str) -> Iterator[bytes]:
        cap: int | None = getattr(self._caps, "value", None)
        self._caps.value = None
        if cap is None:
            raise DownloadError(f"{url}: fetch needs a length cap; use download_file or download_bytes")
        try:
            path = path_from_url(url)
        except ValueError as e:
            raise DownloadError(str(e)) from e
        request = self._metadata_request(path) if path.startswith(METADATA_DIR) else self._target_request(path)
        if request.immutable:
            self.downloads.mkdir(parents=True, exist_ok=True)
            partial: Path | None = self.downloads / f"{hashlib.sha256(path.encode()).hexdigest()}.part"
        else:
            partial = None
        # `agent.update.download=3*off->kill` dies with three chunks of targets kept to resume.
        fault_point = "agent.update.download" if path.startswith(TARGETS_DIR) else None
        return self._complete_file(request, _Sink(partial, fault_point=fault_point), cap)

    def _complete_file(self, request: _Request, sink: _Sink, cap: int) -> Iterator[bytes]:
        # A generator, so that its errors reach ngclient as raised: FetcherInterface.fetch would
        # wrap a LengthOrHashMismatchError raised by _fetch itself into a plain DownloadError.
        self._download_verified(request, sink, cap)
        yield from sink.pieces(remove=True)

    def _open(self, method: Callable[..., _ChunkStream], request: object) -> _ChunkStream:
        return method(request, timeout=self._call_timeout)

    def _metadata_request(self, path: str) -> _Request:
        match = _METADATA_NAME.fullmatch(path[len(METADATA_DIR) :])
        if match is None:
            raise DownloadError(f"{path}: not a metadata file name")
        role = match["role"]
        version = int(match["version"] or 0)

        def open_stream(offset: int, max_length: int) -> _ChunkStream:
            request = fleet_pb2.FetchMetadataRequest(role=role, version=version, offset=offset, max_length=max_length)
            return self._open(self._stub.FetchMetadata, request)

        return _Request(path=path, open_stream=open_stream, immutable=version > 0, sha256=None)

    def _target_request(self, path: str) -> _Request:
        target_path = path[len(TARGETS_DIR) :]
        match = _DIGEST_PREFIX.match(target_path.rpartition("/")[2])

        def open_stream(offset: int, max_length: int) -> _ChunkStream:
            request = fleet_pb2.FetchTargetRequest(target_path=target_path, offset=offset, max_length=max_length)
            return self._open(self._stub.FetchTarget, request)

        return _Request(
            path=path, open_stream=open_stream, immutable=True, sha256=None if match is None else match["sha256"]
        )

    def _download_verified(self, request: _Request, sink: _Sink, cap: int) -> None:
        """Download completely; for a target, refetch once from 0 if the digest does not match."""
        for attempt in range(2):
            self._download(request, sink, cap)
            if request.sha256 is None:
                return
            actual = sink.sha256()
            if actual == request.sha256:
                return
            sink.discard()
            logger.warning(
                "%s: downloaded bytes hash to %s, not the published digest; %s",
                request.path,
                actual,
                "fetching it again from the start" if attempt == 0 else "refusing it",
            )
        # A RepositoryError, not a DownloadError: the bytes arrived, they are not the published ones.
        raise LengthOrHashMismatchError(f"{request.path}: content does not match its sha256 {request.sha256}")

    def _download(self, request: _Request, sink: _Sink, cap: int) -> None:
        backoff = Backoff(self._policy, rand=self._rand or random.random, sleep=self._wait_fn())
        if not request.immutable:
            sink.discard()
        restarted = False
        while True:
            if self._stop():
                raise DownloadError(f"{request.path}: download stopped")
            offset = sink.size()
            if offset > cap:  # a leftover longer than this file can be: not ours to resume
                sink.discard()
                offset = 0
            if offset:
                logger.info("%s: resuming at byte %d", request.path, offset)
            try:
                self._stream(request, sink, offset, cap)
                return
            except _OffsetBeyondEnd as e:
                if offset == 0 or restarted:
                    sink.discard()
                    raise DownloadError(f"{request.path}: the gateway refused offset {offset}") from e
                sink.discard()
                restarted = True
            except _Interrupted as e:
                if sink.size() > offset:
                    backoff.reset()  # progress: only failures in a row count
                if not request.immutable:
                    sink.discard()
                if backoff.attempts + 1 >= self._max_attempts:
                    raise DownloadError(
                        f"{request.path}: interrupted {backoff.attempts + 1} times in a row ({e}); "
                        f"{sink.size()} bytes kept to resume later"
                    ) from e
                delay = backoff.wait()
                logger.info("%s: stream interrupted (%s); retrying in %.2f s", request.path, e, delay)

    def _wait_fn(self) -> Callable[[float], None]:
        sleep = self._sleep

        def wait(seconds: float) -> None:
            if sleep is None:
                threading.Event().wait(seconds)
            else:
                sleep(seconds)

        return wait

    def _stream(self, request: _Request, sink: _Sink, offset: int, cap: int) -> None:
        # The proto requires max_length > 0; an empty file's cap of 0 is still enforced below.
        call = request.open_stream(offset, max(cap, 1))
        check = _ChunkCheck(request.path, offset, cap)
        watchdog = _Watchdog(call, self._stop, self._idle_timeout)
        try:
            for chunk in call:
                watchdog.alive()
                if self._stop():
                    raise DownloadError(f"{request.path}: download stopped")
                try:
                    eof = check.accept(chunk)
                except DownloadError:
                    sink.discard()  # what came before may be as wrong as this chunk
                    raise
                sink.append(chunk.data)
                if eof:
                    return
        except grpc.RpcError as e:
            code, details = rpc_status(e)
            if watchdog.reason == "stopped":
                raise DownloadError(f"{request.path}: download stopped") from e
            if watchdog.reason == "idle":
                raise _Interrupted(f"no data for {self._idle_timeout:g} s") from e
            if code in _RESUMABLE_CODES:
                raise _Interrupted(code.name) from e
            if code == grpc.StatusCode.OUT_OF_RANGE:
                raise _OffsetBeyondEnd(details) from e
            if code == grpc.StatusCode.NOT_FOUND:
                raise DownloadHTTPError(f"{request.path}: not found on the gateway", 404) from e
            if code == grpc.StatusCode.PERMISSION_DENIED:
                raise DownloadHTTPError(f"{request.path}: permission denied: {details}", 403) from e
            raise DownloadError(f"{request.path}: {code.name}: {details}") from e
        finally:
            watchdog.close()
            call.cancel()  # no-op on a finished call; stops the gateway sending after a refusal
        raise _Interrupted("stream ended without its last chunk")
