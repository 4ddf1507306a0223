"""How the agent reaches the gateway: mTLS channels from its stored identity, and reconnect backoff.

Every call after enrollment presents the device certificate and trusts only the CA bundle the
gateway handed out at enrollment (never the system trust store). Reconnects use exponential
backoff with full jitter (AWS architecture blog, "Exponential Backoff And Jitter"), so a fleet that
lost its gateway does not come back in lock-step.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc import aio


@dataclass(frozen=True)
class DeviceCredentials:
    """What the agent presents (key and certificate chain) and trusts (the fleet CA bundle), PEM."""

    key_pem: bytes = field(repr=False)
    certificate_chain_pem: bytes
    ca_pem: bytes


DEFAULT_KEEPALIVE_S = 300.0
"""Seconds between keepalive pings on a gateway connection. Pings find a gateway that vanished
without closing the connection (a partition, a NAT that dropped its mapping): calls on it would
otherwise hang until their deadlines, and a watch stream, which has none, for good. gRPC servers
refuse pings more frequent than every 5 minutes on a connection without data by default (GOAWAY
"too_many_pings"), so the default stays at that bound; our gateway allows every 10 s."""
MIN_KEEPALIVE_S = 10.0
"""The gateway's ``grpc.http2.min_ping_interval_without_data_ms``: more often, it closes the connection."""
_KEEPALIVE_TIMEOUT_S = 20.0


def channel_options(keepalive_s: float = DEFAULT_KEEPALIVE_S) -> tuple[tuple[str, int], ...]:
    """gRPC options of every gateway channel: a ping every ``keepalive_s``, answered within half that (≤ 20 s)."""
    timeout_ms = int(min(_KEEPALIVE_TIMEOUT_S, keepalive_s / 2) * 1000)
    return (
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # gRPC ≥ 1.6x also times every ping out after this (60 s by default), whichever comes first:
        # without it a stalled connection was given up only after a minute (measured, gRPC 1.85).
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),
        # gRPC's default stops pinging after two pings without data: an idle watch stream on a dead
        # connection would then never be noticed.
        ("grpc.http2.max_pings_without_data", 0),
        # Our own Backoff decides when to retry; gRPC's connection backoff is capped so it never
        # keeps a reconnect waiting longer than ours would.
        ("grpc.max_reconnect_backoff_ms", 10_000),
    )


CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = channel_options()


def channel_credentials(credentials: DeviceCredentials) -> grpc.ChannelCredentials:
    """mTLS credentials: the device key and certificate chain, trusting only the enrolled CA bundle."""
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca_pem,
        private_key=credentials.key_pem,
        certificate_chain=credentials.certificate_chain_pem,
    )


def secure_channel(
    target: str, credentials: DeviceCredentials, *, keepalive_s: float = DEFAULT_KEEPALIVE_S
) -> grpc.Channel:
    """A blocking channel (python-tuf's ngclient is synchronous) to the gateway's fleet port."""
    return grpc.secure_channel(target, channel_credentials(credentials), options=channel_options(keepalive_s))


def aio_secure_channel(
    target: str, credentials: DeviceCredentials, *, keepalive_s: float = DEFAULT_KEEPALIVE_S
) -> aio.Channel:
    """An asyncio channel to the gateway's fleet port, for the watch, heartbeat and report loops."""
    return aio.secure_channel(target, channel_credentials(credentials), options=channel_options(keepalive_s))


@dataclass(frozen=True)
class BackoffPolicy:
    """Bounds of the reconnect backoff; the gateway may set them in its enrollment hints."""

    initial: float = 1.0
    """First delay's upper bound, in seconds."""
    maximum: float = 60.0
    """Largest delay, in seconds."""
    multiplier: float = 2.0
    """Growth of the bound per failed attempt."""

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum:
            raise ValueError(f"backoff needs 0 < initial <= maximum, not {self.initial} and {self.maximum}")
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be at least 1, not {self.multiplier}")


class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniformly in [0, min(maximum, initial·2ⁿ)].

    ``rand`` (uniform in [0, 1)) and the two sleeps are injectable so tests run in virtual time.
    """

    def __init__(
        self,
        policy: BackoffPolicy | None = None,
        *,
        rand: Callable[[], float] = random.random,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self._rand = rand
        self._sleep = sleep
        self._async_sleep = async_sleep
        self.attempts = 0
        """Failed attempts since the last :meth:`reset`."""

    def ceiling(self) -> float:
        """Upper bound of the next delay."""
        grown = self.policy.initial * self.policy.multiplier ** min(self.attempts, 64)
        return min(self.policy.maximum, grown)

    def next_delay(self) -> float:
        """The next delay in seconds, counting one more failed attempt."""
        delay = self._rand() * self.ceiling()
        self.attempts += 1
        return delay

    def reset(self) -> None:
        """Start again from the initial bound (after a connection worked)."""
        self.attempts = 0

    def wait(self) -> float:
        """Sleep the next delay (blocking); returns it."""
        delay = self.next_delay()
        self._sleep(delay)
        return delay

    async def wait_async(self) -> float:
        """Sleep the next delay without blocking the event loop; returns it."""
        delay = self.next_delay()
        await self._async_sleep(delay)
        return delay


def rpc_status(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    """Status code and details of a failed call.

    gRPC raises objects that are both an ``RpcError`` and a ``Call`` (sync) or an ``AioRpcError``;
    the type stubs cannot express the former, hence the duck typing.
    """
    code = getattr(error, "code", None)
    details = getattr(error, "details", None)
    status = code() if callable(code) else None
    text = details() if callable(details) else None
    return (
        status if isinstance(status, grpc.StatusCode) else grpc.StatusCode.UNKNOWN,
        text if isinstance(text, str) else str(error),
    )
