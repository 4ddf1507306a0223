"""GrpcTufFetcher against a FleetGateway double over real mTLS: caps, chunk checks, resume, corruption."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from tuf.api.exceptions import DownloadError, DownloadHTTPError, DownloadLengthMismatchError, LengthOrHashMismatchError

from edgefleet_agent.connection import secure_channel
from edgefleet_agent.fetcher import DOWNLOADS_DIR, PARTIAL_MAX_AGE_S, GrpcTufFetcher, clean_partials
from edgefleet_core.errors import VerificationError
from edgefleet_core.signing import KeySet, TufClient, TufRepository
from edgefleet_core.store.local import LocalStore
from tests.unit.agent.fake_gateway import FakeGateway, FleetPki, RunningGateway, start_gateway

TARGET = "cpu-small/default/digits/1.0.0/model.onnx"
TARGET_BYTES = bytes(range(256)) * 23  # 5,888 bytes: six chunks of 1,000
DIGEST = hashlib.sha256(TARGET_BYTES).hexdigest()
TARGET_FILE = f"targets/cpu-small/default/digits/1.0.0/{DIGEST}.model.onnx"
URL = f"edgefleet-tuf:{TARGET_FILE}"


@pytest.fixture(scope="module")
def pki() -> FleetPki:
    return FleetPki()


@pytest_asyncio.fixture
async def running(pki: FleetPki) -> AsyncIterator[RunningGateway]:
    gateway = await start_gateway(FakeGateway(pki, {TARGET_FILE: TARGET_BYTES}))
    yield gateway
    await gateway.server.stop(None)


@pytest.fixture
def make_fetcher(running: RunningGateway, pki: FleetPki, tmp_path: Path) -> Callable[..., GrpcTufFetcher]:
    channel = secure_channel(running.fleet, pki.device_credentials())

    def make(**kwargs: object) -> GrpcTufFetcher:
        return GrpcTufFetcher(channel, tmp_path / "state", sleep=lambda _: None, **kwargs)  # type: ignore[arg-type]

    return make


def _offsets(running: RunningGateway, path: str = TARGET_FILE) -> list[int]:
    return [call.offset for call in running.gateway.fetches if call.path == path]


@pytest.mark.asyncio
async def test_a_target_arrives_whole_and_the_cap_is_sent_as_max_length(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    fetcher = make_fetcher()
    data = await asyncio.to_thread(fetcher.download_bytes, URL, len(TARGET_BYTES))
    assert data == TARGET_BYTES
    assert [(c.offset, c.max_length) for c in running.gateway.fetches] == [(0, len(TARGET_BYTES))]
    assert list(fetcher.downloads.iterdir()) == []  # the partial file is gone once used


@pytest.mark.asyncio
async def test_a_dropped_stream_resumes_from_the_offset_it_reached(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.drop_after[TARGET_FILE] = 2500
    data = await asyncio.to_thread(make_fetcher().download_bytes, URL, len(TARGET_BYTES))
    assert data == TARGET_BYTES
    assert _offsets(running) == [0, 3000]


@pytest.mark.asyncio
async def test_a_stream_without_its_last_chunk_is_resumed(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.no_eof.add(TARGET_FILE)
    assert await asyncio.to_thread(make_fetcher().download_bytes, URL, len(TARGET_BYTES)) == TARGET_BYTES
    assert _offsets(running) == [0, 1000]


@pytest.mark.asyncio
async def test_a_partial_download_survives_the_fetcher_and_a_new_one_resumes_it(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher], pki: FleetPki
) -> None:
    await running.server.stop(None)  # nothing listening: every attempt is UNAVAILABLE
    gateway = FakeGateway(pki, {TARGET_FILE: TARGET_BYTES})
    gateway.faults.drop_after[TARGET_FILE] = 2000
    restarted = await start_gateway(gateway)
    try:
        channel = secure_channel(restarted.fleet, pki.device_credentials())
        first = GrpcTufFetcher(channel, make_fetcher().downloads.parent, sleep=lambda _: None, max_attempts=1)
        with pytest.raises(DownloadError, match="interrupted"):
            await asyncio.to_thread(first.download_bytes, URL, len(TARGET_BYTES))
        assert [p.stat().st_size for p in first.downloads.iterdir()] == [2000]
        # A new process (a new fetcher) picks the partial file up.
        second = GrpcTufFetcher(channel, first.downloads.parent, sleep=lambda _: None)
        assert await asyncio.to_thread(second.download_bytes, URL, len(TARGET_BYTES)) == TARGET_BYTES
        assert _offsets(restarted) == [0, 2000]
    finally:
        await restarted.server.stop(None)


@pytest.mark.asyncio
async def test_a_corrupted_chunk_is_refetched_from_the_start_and_never_returned(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.corrupt_once.add(TARGET_FILE)
    fetcher = make_fetcher()
    assert await asyncio.to_thread(fetcher.download_bytes, URL, len(TARGET_BYTES)) == TARGET_BYTES
    assert _offsets(running) == [0, 0]
    assert list(fetcher.downloads.iterdir()) == []


@pytest.mark.asyncio
async def test_a_target_that_stays_corrupt_is_refused_and_not_kept(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.corrupt_always.add(TARGET_FILE)
    fetcher = make_fetcher()
    with pytest.raises(LengthOrHashMismatchError, match="does not match its sha256"):
        await asyncio.to_thread(fetcher.download_bytes, URL, len(TARGET_BYTES))
    assert _offsets(running) == [0, 0]
    assert list(fetcher.downloads.iterdir()) == []


@pytest.mark.asyncio
async def test_not_found_is_a_404(make_fetcher: Callable[..., GrpcTufFetcher]) -> None:
    with pytest.raises(DownloadHTTPError) as caught:
        await asyncio.to_thread(make_fetcher().download_bytes, "edgefleet-tuf:metadata/7.root.json", 1000)
    assert caught.value.status_code == 404


@pytest.mark.asyncio
async def test_endless_data_stops_at_the_cap(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.endless.add("metadata/timestamp.json")
    with pytest.raises(DownloadLengthMismatchError):
        await asyncio.to_thread(make_fetcher().download_bytes, "edgefleet-tuf:metadata/timestamp.json", 4500)
    assert [c.max_length for c in running.gateway.fetches] == [4500]


@pytest.mark.asyncio
async def test_a_file_over_the_cap_is_refused(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    with pytest.raises(DownloadError, match="RESOURCE_EXHAUSTED"):
        await asyncio.to_thread(make_fetcher().download_bytes, URL, 100)


@pytest.mark.asyncio
async def test_metadata_names_become_role_and_version(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.files["metadata/3.root.json"] = b"{root}"
    running.gateway.files["metadata/timestamp.json"] = b"{timestamp}"
    fetcher = make_fetcher()
    assert await asyncio.to_thread(fetcher.download_bytes, "edgefleet-tuf:metadata/3.root.json", 100) == b"{root}"
    assert (
        await asyncio.to_thread(fetcher.download_bytes, "edgefleet-tuf:metadata/timestamp.json", 100) == b"{timestamp}"
    )


@pytest.mark.asyncio
async def test_bad_urls_and_missing_caps_are_download_errors(make_fetcher: Callable[..., GrpcTufFetcher]) -> None:
    fetcher = make_fetcher()
    with pytest.raises(DownloadError, match="not a TUF repository"):
        await asyncio.to_thread(fetcher.download_bytes, "https://example.com/x", 10)
    with pytest.raises(DownloadError, match="length cap"):
        fetcher.fetch(URL)


@pytest.mark.asyncio
async def test_stop_ends_a_fetch(make_fetcher: Callable[..., GrpcTufFetcher]) -> None:
    with pytest.raises(DownloadError, match="stopped"):
        await asyncio.to_thread(make_fetcher(stop=lambda: True).download_bytes, URL, len(TARGET_BYTES))


@pytest.mark.asyncio
async def test_ngclient_verifies_a_real_repository_through_the_fetcher(pki: FleetPki, tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    repo = TufRepository(store, KeySet.generate())
    repo.initialize()
    repo.publish({TARGET: TARGET_BYTES})
    files = {
        str(p.relative_to(tmp_path / "store" / "tuf")): p.read_bytes()
        for p in (tmp_path / "store" / "tuf").rglob("*")
        if p.is_file()
    }
    gateway = FakeGateway(pki, files, chunk_bytes=700)
    gateway.faults.drop_after[TARGET_FILE] = 1500
    running = await start_gateway(gateway)
    try:
        channel = secure_channel(running.fleet, pki.device_credentials())
        fetcher = GrpcTufFetcher(channel, tmp_path / "state", sleep=lambda _: None)
        client = TufClient(fetcher, repo.trusted_root(), tmp_path / "state" / "tuf" / "metadata")
        assert await asyncio.to_thread(client.download, TARGET, max_length=1 << 20) == TARGET_BYTES
        assert _offsets(running) == [0, 2100]
        # Tampered bytes at rest are refused as a verification failure, never handed over.
        gateway.faults.corrupt_always.add(TARGET_FILE)
        again = TufClient(
            GrpcTufFetcher(channel, tmp_path / "state", sleep=lambda _: None),
            repo.trusted_root(),
            tmp_path / "state" / "tuf" / "metadata",
        )
        with pytest.raises(VerificationError, match="LengthOrHashMismatchError"):
            await asyncio.to_thread(again.download, TARGET, max_length=1 << 20)
    finally:
        await running.server.stop(None)


def test_the_fetcher_refuses_nonsense_settings(tmp_path: Path) -> None:
    with grpc.insecure_channel("127.0.0.1:1") as channel, pytest.raises(ValueError, match="max_attempts"):
        GrpcTufFetcher(channel, tmp_path, max_attempts=0)


@pytest.mark.asyncio
async def test_empty_chunks_that_are_not_the_end_are_refused(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.empty_chunks.add(TARGET_FILE)
    with pytest.raises(DownloadError, match="empty chunk"):
        await asyncio.to_thread(make_fetcher().download_bytes, URL, len(TARGET_BYTES))


@pytest.mark.asyncio
async def test_a_stalled_stream_is_cancelled_and_resumed(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.stall_after[TARGET_FILE] = 2000
    fetcher = make_fetcher(idle_timeout=1.0)
    data = await asyncio.wait_for(asyncio.to_thread(fetcher.download_bytes, URL, len(TARGET_BYTES)), 20)
    assert data == TARGET_BYTES
    # On a loaded machine the idle timer may also fire before the first chunk: then the same offset
    # is asked for again. What matters: it resumed from 2000, never restarting after progress.
    offsets = _offsets(running)
    assert offsets[-1] == 2000
    assert set(offsets) == {0, 2000}


@pytest.mark.asyncio
async def test_a_stop_cancels_a_stalled_call_promptly(
    running: RunningGateway, make_fetcher: Callable[..., GrpcTufFetcher]
) -> None:
    running.gateway.faults.stall_after[TARGET_FILE] = 1000
    stop = threading.Event()
    fetcher = make_fetcher(stop=stop.is_set)  # the idle timeout (30 s) is far away
    fetch = asyncio.create_task(asyncio.to_thread(fetcher.download_bytes, URL, len(TARGET_BYTES)))
    deadline = asyncio.get_running_loop().time() + 10
    while not _offsets(running) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    stop.set()
    started = asyncio.get_running_loop().time()
    with pytest.raises(DownloadError, match="stopped"):
        await asyncio.wait_for(fetch, 5)
    assert asyncio.get_running_loop().time() - started < 2


def test_clean_partials_removes_old_or_all(tmp_path: Path) -> None:
    downloads = tmp_path / DOWNLOADS_DIR
    downloads.mkdir()
    old, new, other = downloads / "old.part", downloads / "new.part", downloads / "keep.txt"
    for path in (old, new, other):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - PARTIAL_MAX_AGE_S - 10,) * 2)
    assert clean_partials(tmp_path, older_than=PARTIAL_MAX_AGE_S) == ["old.part"]
    assert clean_partials(tmp_path) == ["new.part"]
    assert other.exists()
    assert clean_partials(tmp_path / "missing") == []
