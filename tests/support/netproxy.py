"""A TCP proxy on loopback for fault tests: rate limits, cuts, stalls, refusals and byte counts between two peers.

It forwards bytes untouched (TLS passes through end to end), so what it can do is what a network can
do: be slow, stall, or drop connections. It runs its own event loop in a thread, so a test can use it
beside subprocesses and synchronous clients.

The faults, as a peer sees them:

- :meth:`TcpProxy.cut`: every open connection is reset at once (new ones still work);
- :meth:`TcpProxy.stall`: connections stay open but nothing crosses, open or new ones alike: a hang,
  never a reset, so only keepalives and deadlines can tell;
- :meth:`TcpProxy.drop`: new connections are closed as soon as they are accepted (with :meth:`cut`, a
  full outage that fails fast);
- :meth:`TcpProxy.resume`: back to forwarding; ``abandon=True`` leaves the connections stalled until
  then hung for good (a NAT or firewall that lost their state), so only new connections work.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field


@dataclass
class ProxyStats:
    """Bytes forwarded in each direction and connections accepted, since start."""

    upstream_bytes: int = 0
    downstream_bytes: int = 0
    connections: int = 0
    dropped: int = 0
    """Connections closed at accept while dropping."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class TcpProxy:
    """Listens on 127.0.0.1:``port`` (0 picks one) and forwards to ``target_port``.

    ``rate_bytes_per_s`` caps each direction of each connection (``None``: unlimited); ``cut()``
    closes every open connection; while ``stalled`` no bytes move (connections stay open).
    """

    def __init__(self, target_port: int, *, rate_bytes_per_s: float | None = None, port: int = 0) -> None:
        self.target_port = target_port
        self.rate_bytes_per_s = rate_bytes_per_s
        self.stats = ProxyStats()
        self.stalled = False
        self.dropping = False
        """While set, new connections are closed as soon as they are accepted."""
        self._abandoned: set[asyncio.StreamWriter] = set()
        """Writers of connections left hung for good by ``resume(abandon=True)``."""
        self.corrupt_downstream_after: int | None = None
        """When set, flip one byte of the first downstream chunk past this many bytes, once."""
        self._requested_port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    def start(self) -> TcpProxy:
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    async def _start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self._requested_port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.stats.lock:
            self.stats.connections += 1
        if self.dropping:
            with self.stats.lock:
                self.stats.dropped += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, upstream=True),
            self._pipe(up_reader, writer, upstream=False),
            return_exceptions=True,
        )
        self._writers.difference_update((writer, up_writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        started = time.monotonic()
        sent = 0
        try:
            while True:
                data = await reader.read(64 * 1024)
                if not data:
                    break
                while self.stalled or writer in self._abandoned:
                    await asyncio.sleep(0.01)
                if self.rate_bytes_per_s is not None:
                    sent += len(data)
                    ahead = sent / self.rate_bytes_per_s - (time.monotonic() - started)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                data = self._maybe_corrupt(data, upstream=upstream)
                writer.write(data)
                await writer.drain()
                with self.stats.lock:
                    if upstream:
                        self.stats.upstream_bytes += len(data)
                    else:
                        self.stats.downstream_bytes += len(data)
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()

    def _maybe_corrupt(self, data: bytes, *, upstream: bool) -> bytes:
        after = self.corrupt_downstream_after
        if upstream or after is None or self.stats.downstream_bytes + len(data) <= after:
            return data
        self.corrupt_downstream_after = None
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0xFF
        return bytes(flipped)

    def cut(self) -> None:
        """Close every open connection (both sides see a reset/EOF); new ones are still accepted."""

        async def close_all() -> None:
            for writer in list(self._writers):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.transport.abort()

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(timeout=10)

    def stall(self) -> None:
        """Hold every byte from now on, on open and new connections alike (peers see a hang, not a reset)."""
        self.stalled = True

    def drop(self) -> None:
        """Close new connections as soon as they are accepted (open ones are untouched: see :meth:`cut`)."""
        self.dropping = True

    def resume(self, *, abandon: bool = False) -> None:
        """Forward again. ``abandon``: the connections open now stay hung for good; only new ones work."""

        async def mark() -> None:
            self._abandoned.update(self._writers)

        if abandon:
            asyncio.run_coroutine_threadsafe(mark(), self._loop).result(timeout=10)
        self.dropping = False
        self.stalled = False

    def retarget(self, target_port: int) -> None:
        """Send new connections to another port (a restarted server)."""
        self.target_port = target_port

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.transport.abort()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@contextlib.contextmanager
def tcp_proxy(target_port: int, **options: float | int | None) -> Iterator[TcpProxy]:
    """A started :class:`TcpProxy`, stopped on exit."""
    proxy = TcpProxy(target_port, **options)  # type: ignore[arg-type]
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()
