"""The S3 / MinIO artifact store, through the ``minio`` client.

Failures are sorted by what retrying can do: a missing object or bucket and refused credentials
are final; 5xx answers and connection failures are retried here, with capped exponential backoff
and full jitter, a bounded number of times, then reported as :class:`StoreUnavailable`. The retry
loop is ours on purpose: the client's own urllib3 retries would nest under it, so clients built by
:func:`minio_client` switch them off.
"""

from __future__ import annotations

import io
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError

from edgefleet_core.errors import (
    StoreAuthError,
    StoreError,
    StoreLimitExceeded,
    StoreNotFound,
    StoreUnavailable,
)
from edgefleet_core.store.base import ObjectStat, validate_key

log = logging.getLogger(__name__)

T = TypeVar("T")

_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "AccountProblem",
    }
)
_RETRY_CODES = frozenset(
    # ConditionalRequestConflict: S3 answers 409 to racing conditional writes; the retry then sees who won.
    {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "ConditionalRequestConflict"}
)
_READ_CHUNK = 256 * 1024


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before calling the store unavailable."""

    attempts: int = 5
    """Calls in all (the first one included); at least 1."""
    base_delay_s: float = 0.1
    """Backoff ceiling before the first retry; it doubles after each failed attempt."""
    max_delay_s: float = 2.0
    """Cap on the backoff ceiling."""
    sleep: Callable[[float], None] = field(default=time.sleep, compare=False)
    """How to wait (injectable so tests run in virtual time)."""
    jitter: Callable[[float, float], float] = field(default=random.uniform, compare=False)
    """Draws the actual delay in ``[0, ceiling]`` ("full jitter"); injectable for tests."""

    def delay(self, failed_attempts: int) -> float:
        """The wait after ``failed_attempts`` failures (1 → first retry)."""
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (failed_attempts - 1))
        return self.jitter(0.0, ceiling)


def minio_client(
    endpoint: str,
    *,
    access_key: str | None,
    secret_key: str | None,
    secure: bool,
    region: str | None = None,
    connect_timeout_s: float = 5.0,
    read_timeout_s: float = 60.0,
) -> Minio:
    """A ``Minio`` client for :class:`S3Store`: bounded timeouts and no retries of its own.

    The client's default waits five minutes per connection attempt and retries five times inside
    every call, which would multiply with :class:`RetryPolicy`.
    """
    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=10,
        retries=False,
    )
    return Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=secure,
        region=region,
        http_client=http,
    )


def _describe(exc: S3Error | ServerError | InvalidResponseError | Exception) -> tuple[str | None, int, str]:
    """``(S3 error code or None, HTTP status or 0, words)`` of a minio failure."""
    if isinstance(exc, S3Error):
        status = exc.response.status if exc.response is not None else 0
        return exc.code, status, f"{exc.code}: {exc.message} (HTTP {status})"
    if isinstance(exc, ServerError):
        return None, exc.status_code, f"HTTP {exc.status_code}"
    if isinstance(exc, InvalidResponseError):
        status = int(exc._code)  # minio keeps the status only here
        return None, status, f"HTTP {status}, not an S3 answer"
    raise TypeError(f"not a minio failure: {type(exc).__name__}") from exc


class _Retryable(Exception):
    """Internal: one attempt failed in a way another attempt may fix."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class S3Store:
    """An :class:`~edgefleet_core.store.base.ArtifactStore` over one bucket (and optional key prefix)."""

    def __init__(self, client: Minio, bucket: str, prefix: str = "", *, retry: RetryPolicy | None = None) -> None:
        prefix = prefix.strip("/")
        if prefix:
            validate_key(prefix)
            prefix += "/"
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.retry = retry or RetryPolicy()
        self._bucket_checked = False

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, prefix={self.prefix!r})"

    # -- error handling ----------------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        return f"s3://{self.bucket}/{self.prefix}{key}" if key is not None else f"s3://{self.bucket}"

    def _classify(self, exc: Exception, key: str | None) -> StoreError | _Retryable:
        """The domain error for a client failure, or :class:`_Retryable` when trying again can help."""
        if isinstance(exc, urllib3.exceptions.HTTPError):  # refused, reset, timed out, cut short
            return _Retryable(f"{type(exc).__name__}: {exc}")
        code, status, detail = _describe(exc)
        where = self._where(key)
        if code == "NoSuchBucket":
            return StoreNotFound(f"bucket {self.bucket!r} does not exist")
        if code == "NoSuchKey":
            return StoreNotFound(f"no object at {where}")
        if code in _AUTH_CODES or (code is None and status == 403):
            return StoreAuthError(f"the store refused our credentials for {where}: {detail}")
        if status >= 500 or code in _RETRY_CODES:
            return _Retryable(detail)
        return StoreError(f"{where}: {detail}")

    def _call(self, what: str, key: str | None, attempt: Callable[[], T]) -> T:
        """Run ``attempt`` with the retry policy, mapping client failures to store errors."""
        failures = 0
        while True:
            try:
                return attempt()
            except (S3Error, ServerError, InvalidResponseError, urllib3.exceptions.HTTPError) as exc:
                outcome = self._classify(exc, key)
                if isinstance(outcome, StoreError):
                    raise outcome from exc
                failures += 1
                if failures >= self.retry.attempts:
                    raise StoreUnavailable(
                        f"{what} {self._where(key)} failed {failures} times; last: {outcome.reason}"
                    ) from exc
                delay = self.retry.delay(failures)
                log.warning(
                    "%s %s failed (%s); retry %d of %d in %.2f s",
                    what,
                    self._where(key),
                    outcome.reason,
                    failures,
                    self.retry.attempts - 1,
                    delay,
                )
                self.retry.sleep(delay)

    def _ensure_bucket(self) -> None:
        if self._bucket_checked:
            return
        if not self._call("check bucket", None, lambda: self.client.bucket_exists(self.bucket)):
            raise StoreNotFound(f"bucket {self.bucket!r} does not exist")
        self._bucket_checked = True

    def _name(self, key: str) -> str:
        return self.prefix + validate_key(key)

    # -- protocol ----------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        name = self._name(key)
        self._ensure_bucket()
        # A fresh stream per attempt: a retried upload starts from the first byte.
        self._call("put", key, lambda: self.client.put_object(self.bucket, name, io.BytesIO(data), len(data)))

    def create(self, key: str, data: bytes) -> bool:
        name = self._name(key)
        self._ensure_bucket()

        def attempt() -> bool:
            # minio's put_object treats extra headers as user metadata; the conditional header has
            # to go through the plain PutObject call. S3 (since 2024), MinIO and moto honour it.
            try:
                self.client._put_object(self.bucket, name, data, headers={"If-None-Match": "*"})
            except S3Error as exc:
                if exc.code == "PreconditionFailed":
                    return False
                raise
            return True

        return self._call("create", key, attempt)

    def get(self, key: str, *, max_bytes: int) -> bytes:
        name = self._name(key)
        self._ensure_bucket()
        size = self._stat_size(key, name)
        if size is None:
            raise StoreNotFound(f"no object at {self._where(key)}")
        if size > max_bytes:
            raise StoreLimitExceeded(f"object {self._where(key)} is {size} bytes, over the cap of {max_bytes}")
        if size == 0:
            # A ranged GET of an empty object is "416 range not satisfiable"; ask without a range.
            return self._call("get", key, lambda: self._read(name, 0, 0, max_bytes + 1))
        # The stat can be stale and Content-Length can lie: ask for at most one byte past the cap
        # and stop reading there, whatever the server says it will send.
        data = self._call("get", key, lambda: self._read(name, 0, max_bytes + 1, max_bytes + 1))
        if len(data) > max_bytes:
            raise StoreLimitExceeded(f"object {self._where(key)} grew past the cap of {max_bytes} bytes while read")
        return data

    def _read(self, name: str, offset: int, length: int, limit: int) -> bytes:
        """At most ``limit`` bytes of the body of a (ranged, unless ``length`` is 0) GET."""
        response = self.client.get_object(self.bucket, name, offset=offset, length=length)
        try:
            chunks: list[bytes] = []
            received = 0
            while received < limit:
                chunk = response.read(min(_READ_CHUNK, limit - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
            return b"".join(chunks)
        finally:
            # Closing without draining drops the connection instead of reading the rest into it.
            response.close()
            response.release_conn()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise StoreError(f"invalid range: offset {offset} and length {length} must not be negative")
        name = self._name(key)
        self._ensure_bucket()
        if length == 0:
            # minio reads length 0 as "to the end"; answer without a body, but still say if absent.
            if self._stat_size(key, name) is None:
                raise StoreNotFound(f"no object at {self._where(key)}")
            return b""

        def attempt() -> bytes:
            try:
                return self._read(name, offset, length, length)
            except S3Error as exc:
                if exc.code == "InvalidRange":  # at or past the end (or an empty object)
                    return b""
                raise

        return self._call("get range", key, attempt)

    def _stat_size(self, key: str, name: str) -> int | None:
        def attempt() -> int | None:
            try:
                info = self.client.stat_object(self.bucket, name)
            except S3Error as exc:
                # HEAD has no body, so minio names a 404 by the request: NoSuchKey. A missing
                # bucket was ruled out by _ensure_bucket.
                if exc.code in ("NoSuchKey", "NoSuchObject", "NotFound"):
                    return None
                raise
            return info.size if info.size is not None else 0

        return self._call("stat", key, attempt)

    def stat(self, key: str) -> ObjectStat | None:
        name = self._name(key)
        self._ensure_bucket()
        size = self._stat_size(key, name)
        return None if size is None else ObjectStat(key=key, size=size)

    def list(self, prefix: str = "") -> list[str]:
        self._ensure_bucket()

        def attempt() -> list[str]:
            found = self.client.list_objects(self.bucket, prefix=self.prefix + prefix, recursive=True)
            keys: list[str] = []
            for obj in found:
                name = obj.object_name
                if name is None or obj.is_dir or not name.startswith(self.prefix):
                    continue
                key = name[len(self.prefix) :]
                try:
                    validate_key(key)  # what another tool left under our prefix is not ours to list
                except StoreError:
                    continue
                keys.append(key)
            return keys

        return sorted(self._call("list", prefix, attempt))

    def delete(self, key: str) -> None:
        name = self._name(key)
        self._ensure_bucket()
        # S3 DELETE of an absent key succeeds already.
        self._call("delete", key, lambda: self.client.remove_object(self.bucket, name))
