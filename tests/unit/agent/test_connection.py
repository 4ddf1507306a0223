"""Reconnect backoff (full jitter) and mTLS channels built from a stored identity."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import pytest_asyncio

from edgefleet_agent.connection import Backoff, BackoffPolicy, aio_secure_channel, rpc_status, secure_channel
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc
from tests.unit.agent.fake_gateway import FakeGateway, FleetPki, RunningGateway, start_gateway


def test_full_jitter_grows_to_the_maximum_and_resets() -> None:
    slept: list[float] = []
    backoff = Backoff(BackoffPolicy(initial=1.0, maximum=10.0), rand=lambda: 0.5, sleep=slept.append)
    delays = [backoff.wait() for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert slept == delays
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_every_delay_is_between_zero_and_its_ceiling() -> None:
    backoff = Backoff(BackoffPolicy(initial=0.1, maximum=3.0))
    for _ in range(100):
        ceiling = backoff.ceiling()
        assert 0.0 <= backoff.next_delay() <= ceiling <= 3.0


@pytest.mark.asyncio
async def test_the_async_wait_uses_the_injected_sleep() -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    backoff = Backoff(rand=lambda: 1.0, async_sleep=sleep)
    assert [await backoff.wait_async() for _ in range(3)] == [1.0, 2.0, 4.0]
    assert slept == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(("initial", "maximum", "multiplier"), [(0, 1, 2), (2, 1, 2), (1, 2, 0.5)])
def test_nonsense_policies_are_refused(initial: float, maximum: float, multiplier: float) -> None:
    with pytest.raises(ValueError, match="backoff"):
        BackoffPolicy(initial, maximum, multiplier)


@pytest.fixture(scope="module")
def pki() -> FleetPki:
    return FleetPki()


@pytest_asyncio.fixture
async def running(pki: FleetPki) -> AsyncIterator[RunningGateway]:
    gateway = await start_gateway(FakeGateway(pki))
    yield gateway
    await gateway.server.stop(None)


@pytest.mark.asyncio
async def test_an_enrolled_device_reaches_the_mtls_port(running: RunningGateway, pki: FleetPki) -> None:
    async with aio_secure_channel(running.fleet, pki.device_credentials()) as channel:
        await fleet_pb2_grpc.FleetGatewayStub(channel).ReportHealth(fleet_pb2.HealthReport(), timeout=10)
    with secure_channel(running.fleet, pki.device_credentials()) as sync_channel:
        # A blocking call would stall the server's event loop: run it in a thread.
        await asyncio.to_thread(
            fleet_pb2_grpc.FleetGatewayStub(sync_channel).ReportHealth, fleet_pb2.HealthReport(), timeout=10
        )
    assert len(running.gateway.health) == 2


@pytest.mark.asyncio
async def test_a_certificate_from_another_ca_never_completes_the_handshake(
    running: RunningGateway, pki: FleetPki
) -> None:
    stranger = FleetPki("another CA").device_credentials()
    # Trusting our CA for the server, but presenting a certificate the gateway does not trust.
    forged = type(stranger)(
        key_pem=stranger.key_pem, certificate_chain_pem=stranger.certificate_chain_pem, ca_pem=pki.ca_pem
    )
    async with aio_secure_channel(running.fleet, forged) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fleet_pb2_grpc.FleetGatewayStub(channel).ReportHealth(fleet_pb2.HealthReport(), timeout=10)
    code, details = rpc_status(caught.value)
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details
    assert running.gateway.health == []


@pytest.mark.asyncio
async def test_a_gateway_certificate_from_another_ca_is_not_trusted(running: RunningGateway, pki: FleetPki) -> None:
    device = pki.device_credentials()
    wrong_trust = type(device)(
        key_pem=device.key_pem, certificate_chain_pem=device.certificate_chain_pem, ca_pem=FleetPki().ca_pem
    )
    async with aio_secure_channel(running.fleet, wrong_trust) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(
                fleet_pb2_grpc.FleetGatewayStub(channel).ReportHealth(fleet_pb2.HealthReport(), timeout=10), 15
            )


def test_rpc_status_of_something_that_is_not_a_call() -> None:
    assert rpc_status(grpc.RpcError("plain")) == (grpc.StatusCode.UNKNOWN, "plain")
