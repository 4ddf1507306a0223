"""Store URLs: ``file:///abs/path`` for a local folder, ``s3://bucket[/prefix]`` for S3 / MinIO.

S3 connection details come from the arguments first, then the standard environment variables
(``AWS_*`` before ``MINIO_*``), read once here and nowhere else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgefleet_core.errors import StoreError
from edgefleet_core.store.base import ArtifactStore, validate_key
from edgefleet_core.store.local import LocalStore
from edgefleet_core.store.s3 import S3Store, minio_client

ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL", "MINIO_ENDPOINT")
ACCESS_KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "MINIO_ACCESS_KEY")
SECRET_KEY_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "MINIO_SECRET_KEY")
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")
DEFAULT_S3_ENDPOINT = "s3.amazonaws.com"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


@dataclass(frozen=True)
class S3Location:
    """Where an ``s3://`` URL points and how to connect there, parsed and resolved once."""

    bucket: str
    prefix: str
    """Key prefix inside the bucket, without slashes at either end ('' for the whole bucket)."""
    endpoint: str
    """``host[:port]`` as the minio client takes it."""
    secure: bool
    """HTTPS (true) or plain HTTP."""
    access_key: str | None
    secret_key: str | None
    region: str | None


def _first(env: Mapping[str, str], names: tuple[str, ...]) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def parse_endpoint(endpoint: str, secure: bool | None) -> tuple[str, bool]:
    """``(host[:port], secure)`` from ``http(s)://host[:port]`` or a bare ``host[:port]``.

    A scheme decides ``secure`` unless it contradicts an explicit ``secure``, which is an error; a
    bare host is HTTPS unless ``secure`` says otherwise.
    """
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise StoreError(f"S3 endpoint {endpoint!r}: scheme must be http or https")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or not parts.hostname:
            raise StoreError(f"S3 endpoint {endpoint!r}: give only scheme, host and port")
        from_scheme = parts.scheme == "https"
        if secure is not None and secure != from_scheme:
            raise StoreError(f"S3 endpoint {endpoint!r} is {parts.scheme}, but secure={secure} was asked for")
        return parts.netloc, from_scheme
    if not endpoint or "/" in endpoint:
        raise StoreError(f"S3 endpoint {endpoint!r}: expected host[:port] or http(s)://host[:port]")
    return endpoint, True if secure is None else secure


def parse_s3_url(
    url: str,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    secure: bool | None = None,
    region: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> S3Location:
    """Resolve an ``s3://bucket[/prefix]`` URL; arguments win over the environment."""
    env = os.environ if environ is None else environ
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise StoreError(f"not an s3:// URL: {url!r}")
    if parts.query or parts.fragment:
        raise StoreError(f"store URL {url!r}: s3://bucket[/prefix] takes no query or fragment")
    bucket = parts.netloc
    if not bucket:
        raise StoreError(f"store URL {url!r} names no bucket: expected s3://bucket[/prefix]")
    if not _BUCKET.fullmatch(bucket):
        raise StoreError(f"store URL {url!r}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            validate_key(prefix)
        except StoreError as exc:
            raise StoreError(f"store URL {url!r}: bad key prefix {prefix!r}: {exc}") from exc
    resolved_endpoint = endpoint or _first(env, ENDPOINT_VARIABLES) or DEFAULT_S3_ENDPOINT
    host, is_secure = parse_endpoint(resolved_endpoint, secure)
    key = access_key or _first(env, ACCESS_KEY_VARIABLES)
    secret = secret_key or _first(env, SECRET_KEY_VARIABLES)
    if (key is None) != (secret is None):
        raise StoreError(
            f"store URL {url!r}: an access key needs its secret key and the other way round "
            f"(arguments or {'/'.join(ACCESS_KEY_VARIABLES)} and {'/'.join(SECRET_KEY_VARIABLES)})"
        )
    return S3Location(
        bucket=bucket,
        prefix=prefix,
        endpoint=host,
        secure=is_secure,
        access_key=key,
        secret_key=secret,
        region=region or _first(env, REGION_VARIABLES),
    )


def parse_file_url(url: str) -> Path:
    """The folder of a ``file:///abs/path`` URL."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise StoreError(f"not a file:// URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise StoreError(
            f"store URL {url!r}: file URLs name a local path (file:///abs/path), not host {parts.netloc!r}"
        )
    if parts.query or parts.fragment:
        raise StoreError(f"store URL {url!r}: file URLs take no query or fragment")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise StoreError(f"store URL {url!r}: the path must be absolute (file:///abs/path)")
    if path == "/":
        raise StoreError(f"store URL {url!r}: refusing the file-system root as a store")
    return Path(path)


def open_store(
    url: str,
    *,
    endpoint: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    secure: bool | None = None,
    region: str | None = None,
) -> ArtifactStore:
    """The store a URL names: ``file:///abs/path`` or ``s3://bucket[/prefix]``.

    For S3, ``endpoint`` may be ``host:port`` or ``http(s)://host:port`` (the scheme decides
    ``secure``); missing values come from ``AWS_ENDPOINT_URL``/``MINIO_ENDPOINT``,
    ``AWS_ACCESS_KEY_ID``/``MINIO_ACCESS_KEY``, ``AWS_SECRET_ACCESS_KEY``/``MINIO_SECRET_KEY`` and
    ``AWS_REGION``. Nothing is contacted until the store is first used.
    """
    scheme = urlsplit(url).scheme
    if scheme == "file":
        return LocalStore(parse_file_url(url))
    if scheme == "s3":
        where = parse_s3_url(
            url, endpoint=endpoint, access_key=access_key, secret_key=secret_key, secure=secure, region=region
        )
        client = minio_client(
            where.endpoint,
            access_key=where.access_key,
            secret_key=where.secret_key,
            secure=where.secure,
            region=where.region,
        )
        return S3Store(client, where.bucket, where.prefix)
    raise StoreError(f"unsupported store URL {url!r}: expected file:///abs/path or s3://bucket[/prefix]")
