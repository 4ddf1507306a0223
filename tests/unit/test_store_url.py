"""Store URL parsing: no network, environment passed explicitly."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgefleet_core.errors import StoreError
from edgefleet_core.store.local import LocalStore
from edgefleet_core.store.s3 import S3Store
from edgefleet_core.store.url import S3Location, open_store, parse_endpoint, parse_file_url, parse_s3_url

_CLEAN = {"HOME": "/nowhere"}


def test_file_url() -> None:
    assert parse_file_url("file:///var/lib/edgefleet/store") == Path("/var/lib/edgefleet/store")
    assert parse_file_url("file://localhost/srv/a%20b") == Path("/srv/a b")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("file://relative/path", "not host 'relative'"),
        ("file:", "must be absolute"),
        ("file:///", "file-system root"),
        ("file:///a?x=1", "no query"),
    ],
)
def test_bad_file_urls(url: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        parse_file_url(url)


def test_s3_url_from_arguments() -> None:
    where = parse_s3_url(
        "s3://fleet-artifacts/prod/models/",
        endpoint="http://127.0.0.1:9000",
        access_key="ak",
        secret_key="sk",
        region="eu-west-1",
        environ=_CLEAN,
    )
    assert where == S3Location(
        bucket="fleet-artifacts",
        prefix="prod/models",
        endpoint="127.0.0.1:9000",
        secure=False,
        access_key="ak",
        secret_key="sk",
        region="eu-west-1",
    )


def test_s3_url_from_aws_environment() -> None:
    env = {
        "AWS_ENDPOINT_URL": "https://minio.example:9000",
        "AWS_ACCESS_KEY_ID": "aws-ak",
        "AWS_SECRET_ACCESS_KEY": "aws-sk",
        "AWS_REGION": "us-west-2",
        "MINIO_ENDPOINT": "http://ignored:1",
        "MINIO_ACCESS_KEY": "ignored",
        "MINIO_SECRET_KEY": "ignored",
    }
    where = parse_s3_url("s3://bucket", environ=env)
    assert (where.endpoint, where.secure, where.access_key, where.secret_key, where.region, where.prefix) == (
        "minio.example:9000",
        True,
        "aws-ak",
        "aws-sk",
        "us-west-2",
        "",
    )


def test_s3_url_from_minio_environment() -> None:
    env = {"MINIO_ENDPOINT": "http://minio:9000", "MINIO_ACCESS_KEY": "m-ak", "MINIO_SECRET_KEY": "m-sk"}
    where = parse_s3_url("s3://bucket", environ=env)
    assert (where.endpoint, where.secure, where.access_key, where.secret_key, where.region) == (
        "minio:9000",
        False,
        "m-ak",
        "m-sk",
        None,
    )


def test_arguments_win_over_environment() -> None:
    env = {"AWS_ENDPOINT_URL": "http://env:1", "AWS_ACCESS_KEY_ID": "env-ak", "AWS_SECRET_ACCESS_KEY": "env-sk"}
    where = parse_s3_url("s3://bucket", endpoint="arg:2", access_key="arg-ak", secret_key="arg-sk", environ=env)
    assert (where.endpoint, where.secure, where.access_key, where.secret_key) == ("arg:2", True, "arg-ak", "arg-sk")


def test_default_endpoint_is_aws_over_https() -> None:
    where = parse_s3_url("s3://bucket", environ=_CLEAN)
    assert (where.endpoint, where.secure, where.access_key) == ("s3.amazonaws.com", True, None)


@pytest.mark.parametrize(
    ("endpoint", "secure", "expected"),
    [
        ("http://127.0.0.1:9000", None, ("127.0.0.1:9000", False)),
        ("https://s3.example", None, ("s3.example", True)),
        ("https://s3.example/", True, ("s3.example", True)),
        ("minio:9000", None, ("minio:9000", True)),
        ("minio:9000", False, ("minio:9000", False)),
    ],
)
def test_endpoint_decides_secure(endpoint: str, secure: bool | None, expected: tuple[str, bool]) -> None:
    assert parse_endpoint(endpoint, secure) == expected


@pytest.mark.parametrize(
    ("endpoint", "secure", "problem"),
    [
        ("http://127.0.0.1:9000", True, "is http, but secure=True"),
        ("ftp://host", None, "scheme must be http or https"),
        ("http://host/path", None, "only scheme, host and port"),
        ("http://user@host", None, "only scheme, host and port"),
        ("host/path", None, "expected host"),
        ("", None, "expected host"),
    ],
)
def test_bad_endpoints(endpoint: str, secure: bool | None, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        parse_endpoint(endpoint, secure)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("s3://", "names no bucket"),
        ("s3:///prefix", "names no bucket"),
        ("s3://Upper-Case", "not a valid bucket name"),
        ("s3://ab", "not a valid bucket name"),
        ("s3://user:pw@bucket", "not a valid bucket name"),
        ("s3://bucket:9000", "not a valid bucket name"),
        ("s3://bucket/../up", "bad key prefix"),
        ("s3://bucket/a//b", "bad key prefix"),
        ("s3://bucket?x=1", "no query"),
    ],
)
def test_bad_s3_urls(url: str, problem: str) -> None:
    with pytest.raises(StoreError, match=problem):
        parse_s3_url(url, environ=_CLEAN)


def test_access_key_without_secret() -> None:
    with pytest.raises(StoreError, match="needs its secret key"):
        parse_s3_url("s3://bucket", environ={"AWS_ACCESS_KEY_ID": "ak"})


@pytest.mark.parametrize("url", ["http://host/bucket", "gs://bucket", "/plain/path", "", "minio://bucket", "S3Bucket"])
def test_unsupported_schemes(url: str) -> None:
    with pytest.raises(StoreError, match="unsupported store URL"):
        open_store(url)


def test_open_store_builds_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("AWS_ENDPOINT_URL", "MINIO_ENDPOINT", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    local = open_store("file:///tmp/edgefleet-store")
    assert isinstance(local, LocalStore)
    assert local.root == Path("/tmp/edgefleet-store")
    s3 = open_store("s3://fleet/prod", endpoint="http://127.0.0.1:1", access_key="ak", secret_key="sk")
    assert isinstance(s3, S3Store)
    assert (s3.bucket, s3.prefix) == ("fleet", "prod/")
    assert s3.client._base_url.is_https is False  # minio keeps the scheme only here
