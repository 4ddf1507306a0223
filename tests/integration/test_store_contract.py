"""One contract for every artifact store: the local folder and S3 against a real ``moto_server``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio import Minio
from minio.error import S3Error, ServerError

from edgefleet_core.errors import (
    StoreAuthError,
    StoreError,
    StoreLimitExceeded,
    StoreNotFound,
    StoreUnavailable,
)
from edgefleet_core.store.base import ArtifactStore, blob_key, get_blob, put_blob
from edgefleet_core.store.local import LocalStore
from edgefleet_core.store.s3 import RetryPolicy, S3Store, minio_client
from edgefleet_core.store.url import open_store
from tests.support.s3_server import S3Server, running_moto_server, s3_server

pytestmark = pytest.mark.integration

__all__ = ["s3_server"]  # the session fixture, used by name below

MiB = 1024 * 1024


class _Sleeps:
    """A virtual clock for the retry policy: records waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def _client(server: S3Server, *, access_key: str | None = None, secret_key: str | None = None) -> Minio:
    return minio_client(
        server.endpoint,
        access_key=access_key or server.access_key,
        secret_key=secret_key or server.secret_key,
        secure=False,
        region=server.region,
    )


def _fresh_bucket(server: S3Server) -> str:
    bucket = f"test-{uuid.uuid4().hex[:20]}"
    _client(server).make_bucket(bucket)
    return bucket


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    server: S3Server = request.getfixturevalue("s3_server")
    return S3Store(_client(server), _fresh_bucket(server), retry=RetryPolicy(attempts=2, sleep=_Sleeps()))


# -- the contract -------------------------------------------------------------------------------


def test_put_get_round_trip(store: ArtifactStore) -> None:
    store.put("models/a.onnx", b"hello")
    assert store.get("models/a.onnx", max_bytes=5) == b"hello"


def test_empty_object(store: ArtifactStore) -> None:
    store.put("empty", b"")
    assert store.get("empty", max_bytes=0) == b""
    assert store.get_range("empty", 0, 10) == b""
    stat = store.stat("empty")
    assert stat is not None
    assert stat.size == 0


def test_overwrite_replaces_whole_object(store: ArtifactStore) -> None:
    store.put("k", b"a much longer first version")
    store.put("k", b"short")
    assert store.get("k", max_bytes=100) == b"short"
    assert store.list() == ["k"]


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 4, b"0123"),
        (3, 4, b"3456"),
        (7, 10, b"789"),
        (9, 1, b"9"),
        (10, 5, b""),
        (50, 5, b""),
        (4, 0, b""),
    ],
    ids=["start", "middle", "end-short", "last-byte", "at-end", "past-end", "zero-length"],
)
def test_get_range(store: ArtifactStore, offset: int, length: int, expected: bytes) -> None:
    store.put("digits", b"0123456789")
    assert store.get_range("digits", offset, length) == expected


def test_get_range_rejects_negative(store: ArtifactStore) -> None:
    store.put("digits", b"0123456789")
    with pytest.raises(StoreError, match="negative"):
        store.get_range("digits", -1, 2)
    with pytest.raises(StoreError, match="negative"):
        store.get_range("digits", 0, -2)


def test_create_only_when_absent(store: ArtifactStore) -> None:
    assert store.create("claims/a.json", b"first") is True
    assert store.create("claims/a.json", b"second") is False
    assert store.get("claims/a.json", max_bytes=100) == b"first"
    store.put("claims/b.json", b"put")
    assert store.create("claims/b.json", b"create") is False
    assert store.list("claims/") == ["claims/a.json", "claims/b.json"]


def test_racing_creators_one_wins(store: ArtifactStore) -> None:
    """The store's compare-and-swap: of 8 threads creating one key at once, exactly one succeeds."""
    barrier = threading.Barrier(8)

    def create(i: int) -> bool:
        barrier.wait()
        return store.create("race/key.json", f"writer {i}".encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(create, range(8)))
    assert results.count(True) == 1
    assert store.get("race/key.json", max_bytes=100) == f"writer {results.index(True)}".encode()


def test_stat(store: ArtifactStore) -> None:
    assert store.stat("a/b") is None
    store.put("a/b", b"x" * 1234)
    stat = store.stat("a/b")
    assert stat is not None
    assert (stat.key, stat.size) == ("a/b", 1234)


def test_list_prefixes_sorted(store: ArtifactStore) -> None:
    for key in ["metadata/2.root.json", "blobs/sha256/bb", "metadata/1.root.json", "blobs/sha256/aa", "top"]:
        store.put(key, key.encode())
    assert store.list() == [
        "blobs/sha256/aa",
        "blobs/sha256/bb",
        "metadata/1.root.json",
        "metadata/2.root.json",
        "top",
    ]
    assert store.list("blobs/") == ["blobs/sha256/aa", "blobs/sha256/bb"]
    assert store.list("metadata/1") == ["metadata/1.root.json"]
    assert store.list("nothing/") == []


def test_list_of_empty_store(store: ArtifactStore) -> None:
    assert store.list() == []


def test_delete(store: ArtifactStore) -> None:
    store.put("a/one", b"1")
    store.put("a/two", b"2")
    store.delete("a/one")
    assert store.stat("a/one") is None
    assert store.list() == ["a/two"]
    store.delete("a/one")  # absent: fine
    store.delete("never/was")


def test_missing_object(store: ArtifactStore) -> None:
    with pytest.raises(StoreNotFound, match="nope"):
        store.get("nope", max_bytes=10)
    with pytest.raises(StoreNotFound, match="nope"):
        store.get_range("nope", 0, 10)
    with pytest.raises(StoreNotFound, match="nope"):
        store.get_range("nope", 0, 0)


def test_size_cap(store: ArtifactStore) -> None:
    store.put("big", os.urandom(6 * MiB))
    with pytest.raises(StoreLimitExceeded, match="over the cap of 1024"):
        store.get("big", max_bytes=1024)
    store.put("exact", b"x" * 100)
    assert len(store.get("exact", max_bytes=100)) == 100
    with pytest.raises(StoreLimitExceeded):
        store.get("exact", max_bytes=99)


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "", "a/../b", "./a", "a/", "sp ace", "x" * 1025])
def test_invalid_keys_rejected(store: ArtifactStore, key: str) -> None:
    with pytest.raises(StoreError, match="invalid object key"):
        store.put(key, b"data")
    with pytest.raises(StoreError, match="invalid object key"):
        store.get(key, max_bytes=10)
    with pytest.raises(StoreError, match="invalid object key"):
        store.stat(key)
    with pytest.raises(StoreError, match="invalid object key"):
        store.delete(key)
    assert store.list() == []


def test_blobs_are_content_addressed(store: ArtifactStore) -> None:
    data = b"weights" * 1000
    digest = put_blob(store, data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert put_blob(store, data) == digest  # idempotent
    assert store.list() == [blob_key(digest)]
    assert get_blob(store, digest, max_bytes=len(data)) == data
    with pytest.raises(StoreLimitExceeded):
        get_blob(store, digest, max_bytes=len(data) - 1)


def test_corrupt_blob_detected(store: ArtifactStore) -> None:
    digest = put_blob(store, b"the real bytes")
    store.put(blob_key(digest), b"the evil bytes")  # same length, other content
    with pytest.raises(StoreError, match="corrupt"):
        get_blob(store, digest, max_bytes=100)


def test_five_mib_round_trip(store: ArtifactStore) -> None:
    data = os.urandom(5 * MiB + 17)
    store.put("bundles/big.bin", data)
    assert store.get("bundles/big.bin", max_bytes=len(data)) == data
    assert store.get_range("bundles/big.bin", 5 * MiB, 100) == data[5 * MiB :]
    stat = store.stat("bundles/big.bin")
    assert stat is not None
    assert stat.size == len(data)


# -- local folder specifics ---------------------------------------------------------------------


def test_local_cap_checked_before_reading(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with open(tmp_path / "huge", "wb") as handle:
        handle.truncate(64 * 1024**3)  # sparse: reading it whole would take minutes and 64 GiB
    with pytest.raises(StoreLimitExceeded, match="over the cap"):
        store.get("huge", max_bytes=MiB)


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a/b", b"1")
    store.put("a/b", b"2")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["b"]


def test_local_list_skips_stray_temp_files(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1")
    (tmp_path / "a.~tmp-0123").write_bytes(b"half written")
    assert store.list() == ["a"]


def test_local_refuses_symlink_out_of_root(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    store = LocalStore(root)
    with pytest.raises(StoreError, match="outside the store root"):
        store.get("link/secret", max_bytes=100)
    with pytest.raises(StoreError, match="outside the store root"):
        store.put("link/planted", b"x")
    assert not (outside / "planted").exists()
    assert store.list() == []


def test_local_object_and_folder_conflict(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.put("a", b"1")
    with pytest.raises(StoreError, match="is an object, not a folder"):
        store.put("a/b", b"2")


def test_open_store_file_url(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}/store")
    store.put("x", b"1")
    assert (tmp_path / "store" / "x").read_bytes() == b"1"


# -- S3 specifics -------------------------------------------------------------------------------


def test_open_store_s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = _fresh_bucket(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.delenv("AWS_REGION", raising=False)  # minio then asks the server for the region
    store = open_store(f"s3://{bucket}/fleet/prod")
    store.put("metadata/1.root.json", b"{}")
    assert store.list() == ["metadata/1.root.json"]
    names = [o.object_name for o in _client(s3_server).list_objects(bucket, recursive=True)]
    assert names == ["fleet/prod/metadata/1.root.json"]


def test_s3_prefixes_isolate_stores(s3_server: S3Server) -> None:
    bucket = _fresh_bucket(s3_server)
    one = S3Store(_client(s3_server), bucket, "one")
    two = S3Store(_client(s3_server), bucket, "/two/")
    one.put("k", b"1")
    two.put("k", b"2")
    assert (one.get("k", max_bytes=1), two.get("k", max_bytes=1)) == (b"1", b"2")
    assert one.list() == ["k"]


def test_s3_missing_bucket(s3_server: S3Server) -> None:
    store = S3Store(_client(s3_server), "no-such-bucket-here")
    for call in (lambda: store.get("k", max_bytes=1), lambda: store.put("k", b"1"), store.list):
        with pytest.raises(StoreNotFound, match="bucket 'no-such-bucket-here' does not exist"):
            call()


class _LyingStat(Minio):
    """A real client whose HEAD answer claims the object is tiny, and which counts body bytes read."""

    bytes_read = 0

    def stat_object(self, *args: Any, **kwargs: Any) -> Any:
        return dataclasses.replace(super().stat_object(*args, **kwargs), size=1)

    def get_object(self, *args: Any, **kwargs: Any) -> Any:
        response = super().get_object(*args, **kwargs)
        original = response.read
        owner = self

        def counting_read(amt: int | None = None, **kw: Any) -> bytes:
            chunk: bytes = original(amt, **kw)
            owner.bytes_read += len(chunk)
            return chunk

        response.read = counting_read  # type: ignore[method-assign,assignment]
        return response


def test_s3_cap_holds_when_stat_lies(s3_server: S3Server) -> None:
    """The streamed read stops at the cap even when the size the server reported was wrong."""
    bucket = _fresh_bucket(s3_server)
    S3Store(_client(s3_server), bucket).put("big", os.urandom(8 * MiB))
    client = _LyingStat(
        s3_server.endpoint,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        secure=False,
        region=s3_server.region,
    )
    store = S3Store(client, bucket)
    with pytest.raises(StoreLimitExceeded, match="grew past the cap of 1000"):
        store.get("big", max_bytes=1000)
    assert client.bytes_read == 1001


def test_s3_wrong_credentials() -> None:
    """A moto server that authenticates (against its empty IAM) refuses our keys with a real 403.

    The first call is the bucket check, a HEAD: no body, so the code is minio's AccessDenied.
    """
    sleeps = _Sleeps()
    with running_moto_server(check_auth=True) as server:
        client = _client(server, access_key="AKIAWRONG", secret_key="wrong")
        store = S3Store(client, "any-bucket", retry=RetryPolicy(sleep=sleeps))
        with pytest.raises(StoreAuthError, match="refused our credentials for s3://any-bucket: AccessDenied"):
            store.get("k", max_bytes=10)
        store._bucket_checked = True  # past the HEAD: a GET's XML error names the real cause
        with pytest.raises(StoreAuthError, match="InvalidAccessKeyId"):
            store.get_range("k", 0, 10)
    assert sleeps.waits == []  # refused credentials are final


def _s3_error(code: str, status: int) -> S3Error:
    response = urllib3.HTTPResponse(body=b"", status=status)
    return S3Error(response, code, f"{code} from the fake", "/b/k", "req", "host")


@pytest.mark.parametrize("code", ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"])
def test_s3_auth_codes_map_to_auth_error(s3_server: S3Server, code: str) -> None:
    """moto does not check signatures, so the other refusals are raised at our seam, the client."""
    store = S3Store(_client(s3_server), _fresh_bucket(s3_server), retry=RetryPolicy(sleep=_Sleeps()))

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise _s3_error(code, 403)

    store.client.stat_object = refuse  # type: ignore[method-assign]
    with pytest.raises(StoreAuthError, match=code):
        store.get("k", max_bytes=10)


def _flaky(fail_times: int, error: Callable[[], Exception], real: Callable[..., Any]) -> Callable[..., Any]:
    calls = {"n": 0}

    def call(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= fail_times:
            raise error()
        return real(*args, **kwargs)

    return call


@pytest.mark.parametrize(
    "error",
    [
        lambda: _s3_error("InternalError", 500),
        lambda: _s3_error("SlowDown", 503),
        lambda: ServerError("server failed with HTTP status code 502", 502),
        lambda: urllib3.exceptions.ProtocolError("connection reset"),
    ],
    ids=["InternalError-500", "SlowDown-503", "bare-502", "reset"],
)
def test_s3_transient_failures_are_retried(s3_server: S3Server, error: Callable[[], Exception]) -> None:
    sleeps = _Sleeps()
    policy = RetryPolicy(attempts=4, base_delay_s=0.1, max_delay_s=0.15, sleep=sleeps, jitter=lambda _lo, hi: hi)
    store = S3Store(_client(s3_server), _fresh_bucket(s3_server), retry=policy)
    store.put("k", b"payload")
    store.client.get_object = _flaky(2, error, store.client.get_object)  # type: ignore[method-assign]
    assert store.get("k", max_bytes=100) == b"payload"
    assert sleeps.waits == [0.1, 0.15]  # doubling, capped


def test_s3_persistent_5xx_gives_up(s3_server: S3Server) -> None:
    sleeps = _Sleeps()
    store = S3Store(_client(s3_server), _fresh_bucket(s3_server), retry=RetryPolicy(attempts=3, sleep=sleeps))
    store.client.put_object = _flaky(99, lambda: _s3_error("InternalError", 500), store.client.put_object)  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable, match="failed 3 times; last: InternalError"):
        store.put("k", b"1")
    assert len(sleeps.waits) == 2
    assert all(0.0 <= w <= 0.2 for w in sleeps.waits)  # full jitter under the ceiling


def test_s3_not_found_is_not_retried(s3_server: S3Server) -> None:
    sleeps = _Sleeps()
    store = S3Store(_client(s3_server), _fresh_bucket(s3_server), retry=RetryPolicy(sleep=sleeps))
    with pytest.raises(StoreNotFound):
        store.get_range("absent", 0, 5)
    assert sleeps.waits == []


@pytest.fixture
def doomed_server() -> Iterator[S3Server]:
    """A second, short-lived server this test may stop."""
    with running_moto_server() as server:
        yield server


def test_s3_server_gone_is_unavailable(doomed_server: S3Server) -> None:
    sleeps = _Sleeps()
    store = S3Store(_client(doomed_server), _fresh_bucket(doomed_server), retry=RetryPolicy(attempts=3, sleep=sleeps))
    store.put("k", b"before")
    assert store.get("k", max_bytes=10) == b"before"
    doomed_server.process.terminate()
    doomed_server.process.wait(timeout=10)
    with pytest.raises(StoreUnavailable, match="failed 3 times"):
        store.get("k", max_bytes=10)
    assert len(sleeps.waits) == 2


def test_local_store_reports_unreadable_objects_as_store_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet_core.errors import StoreError, StoreNotFound
    from edgefleet_core.store import local
    from edgefleet_core.store.local import LocalStore

    store = LocalStore(tmp_path / "store")
    store.put("a/b", b"data")

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    # CI runs as root, which reads anything: the refusal is injected at the module's `open`.
    monkeypatch.setattr(local, "open", refuse, raising=False)
    readers: list[Callable[[], bytes]] = [
        lambda: store.get("a/b", max_bytes=100),
        lambda: store.get_range("a/b", 0, 1),
    ]
    for read in readers:
        with pytest.raises(StoreError, match="cannot read object 'a/b'") as caught:
            read()
        assert not isinstance(caught.value, StoreNotFound)
