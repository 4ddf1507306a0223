"""The agent process: enroll once, serve the local inference API, and follow the gateway.

Start-up: load the stored identity (or enroll with the bootstrap token), let the Updater recover
(roll back unfinished trials, verify and load committed slots), start the local inference
server, then run four concurrent loops until SIGTERM/SIGINT:

* **watch** — WatchAssignments, resumed from the last applied revision, reconnecting with
  jittered backoff; each assignment is handed to the worker;
* **worker** — applies assignments one at a time in a thread (ngclient and ONNX Runtime are
  synchronous); a newer revision for a model cancels the one in progress for it;
* **heartbeat** — a HealthReport per window (the interval the gateway asks for), split at a
  version switch so each request counts against the version that served it; windows the gateway
  did not acknowledge are sent again, oldest first;
* **reports** — sends queued install reports until each is acknowledged;
* **renewal** — renews the device certificate at about two thirds of its lifetime (a new key
  each time), persists it, then reconnects the loops above with the new credentials.

Serving never depends on the gateway: inference keeps running the last good version while every
loop above is failing. An assignment counts as applied only once its report is on disk, and the
revision the watch resumes from never passes one still outstanding (pending, running, or waiting
for a download retry), so a restart redoes what was not finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol, TypeVar
from wsgiref.simple_server import WSGIServer

import grpc
from grpc import aio
from pydantic import BaseModel, ConfigDict, ValidationError

from edgefleet_agent.accelerator import AcceleratorServer
from edgefleet_agent.assignments import AssignmentSpec, InstallResult
from edgefleet_agent.connection import (
    DEFAULT_KEEPALIVE_S,
    Backoff,
    BackoffPolicy,
    aio_secure_channel,
    rpc_status,
    secure_channel,
)
from edgefleet_agent.errors import AgentError
from edgefleet_agent.fetcher import PARTIAL_MAX_AGE_S, GrpcTufFetcher, clean_partials
from edgefleet_agent.identity import (
    DeviceIdentity,
    EnrollmentError,
    IdentityError,
    IdentityStore,
    certificate_signing_request,
    enroll,
    measure_hardware,
    new_key,
    renewal_due,
    renewed_identity,
)
from edgefleet_agent.inference_server import start_inference_server
from edgefleet_agent.leftovers import clear_interrupted_writes
from edgefleet_agent.metrics import AgentMetrics, parse_listen
from edgefleet_agent.reports import ReportQueue, assignment_spec, install_report, model_health
from edgefleet_agent.runtime import ModelRuntime, ModelWindowStats
from edgefleet_agent.system import DeviceStats, SystemSampler
from edgefleet_agent.updater import Updater
from edgefleet_core import __version__
from edgefleet_core.atomic import write_file_atomic
from edgefleet_core.optimize.runtime import available_providers
from edgefleet_core.signing.client import TufClient
from edgefleet_proto.v1 import fleet_pb2, fleet_pb2_grpc

logger = logging.getLogger(__name__)

AGENT_FILE = "agent.json"
TRUSTED_ROOT = Path("tuf") / "trusted-root.json"
TUF_METADATA = Path("tuf") / "metadata"
CALL_TIMEOUT_S = 10.0
RENEW_TIMEOUT_S = 30.0
MIN_RENEWAL_INTERVAL_S = 60.0
"""Least time between two successful renewals (a gateway issuing very short certificates cannot spin us)."""
MAX_RENEWAL_SLEEP_S = 3600.0
"""Longest sleep before the renewal time is computed again (clock changes)."""
STOP_GRACE_S = 10.0
MAX_ROOT_BYTES = 1024 * 1024
MAX_UNSENT_HEALTH = 1000
"""Health windows kept while the gateway cannot be reached (with the default 30 s interval, 8 hours)."""
RETRYABLE_REASONS = frozenset({"DownloadFailed", "OutOfSpace", "MetadataExpired"})
"""Install failures that can pass without a new revision (the transport, a full disk that is freed,
expired TUF metadata that is renewed): the same revision is tried again after a backoff."""
_REFUSED = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})

_T = TypeVar("_T")


class AgentConfigError(AgentError):
    """The agent cannot start with the settings it was given (not enrolled and no token, bad files)."""


def _internal_error(spec: AssignmentSpec, exc: BaseException) -> InstallResult:
    """The report for an apply that raised: a bug, reported so the fleet sees it, not a dead agent."""
    return InstallResult(
        revision=spec.revision,
        model_namespace=spec.model_namespace,
        model_name=spec.model_name,
        from_version="",
        to_version=spec.version,
        outcome="failed",
        reason="InternalError",
        message=f"{type(exc).__name__}: {exc}",
        failed_phase="download",
        durations={"total": 0.0},
        active_slot=None,
        finished_at=datetime.now(UTC),
    )


# ------------------------------------------------------------------------------------------------
# Settings and the seams the daemon drives


@dataclass(frozen=True)
class AgentSettings:
    """Everything ``edgefleet agent run`` was told, parsed once."""

    state_dir: Path
    """The agent's state folder (identity, TUF metadata, slots, reports)."""
    gateway: str
    """HOST:PORT of the gateway's fleet port (mTLS)."""
    enroll_gateway: str
    """HOST:PORT of the gateway's enrollment port (server-authenticated TLS)."""
    gateway_ca: Path
    """CA certificate (PEM) that authenticates the gateway during enrollment."""
    tuf_root: Path
    """Trusted TUF root metadata the device was provisioned with (copied into the state once)."""
    name: str
    """Requested device name (a DNS label); a token may pin another."""
    token: str | None = field(default=None, repr=False)
    """Bootstrap token; needed only until enrolled. A secret: never logged."""
    labels: Mapping[str, str] = field(default_factory=dict)
    """Labels for the device record."""
    inference_listen: str = "127.0.0.1:0"
    """HOST:PORT of the local inference API (port 0 picks a free one)."""
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    """ONNX Runtime execution providers to run models with, preferred first."""
    heartbeat_interval: float | None = None
    """Overrides the gateway's heartbeat hint (seconds); for tests and special devices."""
    stop_grace: float = STOP_GRACE_S
    """How long a graceful stop waits for an install in progress and for inference requests."""
    metrics_listen: str | None = None
    """HOST:PORT to serve Prometheus metrics on (``/metrics``; port 0 picks one); ``None``: none."""
    keepalive: float = DEFAULT_KEEPALIVE_S
    """Seconds between keepalive pings on the gateway connections: how soon a connection that went
    silent (a partition, a stalled link) is given up and a new one opened."""
    accelerator: AcceleratorServer | None = None
    """The accel-server partitioned models' tails run on; ``None``: head and tail both in-process."""


class UpdaterPort(Protocol):
    """What the daemon needs of :class:`~edgefleet_agent.updater.Updater`."""

    def recover(self) -> list[InstallResult]: ...
    def apply(self, assignment: AssignmentSpec, cancelled: Callable[[], bool]) -> InstallResult: ...
    def installed(self) -> list[tuple[str, str, str]]: ...


class RuntimePort(Protocol):
    """What the daemon needs of :class:`~edgefleet_agent.runtime.ModelRuntime`."""

    def drain_windows(self) -> list[ModelWindowStats]: ...


class StoppableServer(Protocol):
    async def stop(self, grace: float | None) -> None: ...


@dataclass(frozen=True)
class Components:
    """The device-side machinery the daemon drives: our seam for tests."""

    updater: UpdaterPort
    runtime: RuntimePort
    start_inference: Callable[[], Awaitable[tuple[StoppableServer, int]]]
    """Starts the local inference server; returns it and its bound port."""


ComponentsFactory = Callable[[AgentSettings, DeviceIdentity, Callable[[], TufClient], AgentMetrics], Components]


def default_components(
    settings: AgentSettings, identity: DeviceIdentity, tuf_client: Callable[[], TufClient], metrics: AgentMetrics
) -> Components:
    """The real runtime, Updater and inference server, recording into ``metrics``."""
    runtime = ModelRuntime(
        settings.providers, metrics=metrics, accelerator=settings.accelerator, device_key=identity.device_id
    )
    updater = Updater(settings.state_dir, identity.device_class, runtime, tuf_client)

    async def start() -> tuple[StoppableServer, int]:
        return await start_inference_server(runtime, identity.namespace, settings.inference_listen)

    return Components(updater=updater, runtime=runtime, start_inference=start)


# ------------------------------------------------------------------------------------------------
# Progress that survives restarts


class _AgentFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    last_revision: int = 0


class Progress:
    """Which assignment revisions are done; persists the one the watch may resume after.

    ``outstanding`` holds, per model, the revision accepted but not finished. The resume point is
    the highest finished revision, but never at or past an outstanding one.
    """

    def __init__(self, state_dir: Path) -> None:
        self._path = state_dir / AGENT_FILE
        self.last_revision = self._load()
        self._finished = self.last_revision
        self.outstanding: dict[str, int] = {}
        self.latest: dict[str, int] = {}
        """Per model, the highest revision accepted in this process (duplicates are dropped)."""

    def _load(self) -> int:
        try:
            return _AgentFile.model_validate_json(self._path.read_bytes()).last_revision
        except FileNotFoundError:
            return 0
        except (OSError, ValidationError) as e:
            logger.warning("%s is unreadable (%s); resuming from revision 0", self._path, e)
            return 0

    def accept(self, spec: AssignmentSpec, *, held: bool = False) -> bool:
        """True for a revision not seen before (for its model, and after the resume point).

        A REMOVE of a model this device holds (``held``) is taken whatever its revision: the
        gateway synthesizes removals for models no longer assigned, with no newer revision to give.
        """
        seen = spec.revision <= max(self.last_revision, self.latest.get(spec.model_key, 0))
        if seen and not (spec.action == "remove" and held):
            return False
        self.latest[spec.model_key] = spec.revision
        self.outstanding[spec.model_key] = spec.revision
        return True

    def finish(self, spec: AssignmentSpec) -> None:
        """``spec`` is done (its report queued); persist the new resume point."""
        if self.outstanding.get(spec.model_key) == spec.revision:
            del self.outstanding[spec.model_key]
        self._finished = max(self._finished, spec.revision)
        resume = self._finished
        if self.outstanding:
            resume = min(resume, min(self.outstanding.values()) - 1)
        if resume > self.last_revision:
            self.last_revision = resume
            try:
                write_file_atomic(self._path, json.dumps({"last_revision": resume}).encode() + b"\n")
            except OSError as e:
                # A full disk must not stop the agent; after a restart the gateway resends from the
                # older resume point and those revisions are found already applied.
                logger.warning("cannot persist the resume point %d in %s: %s", resume, self._path, e)


@dataclass
class _Job:
    spec: AssignmentSpec
    cancel: threading.Event = field(default_factory=threading.Event)


# ------------------------------------------------------------------------------------------------
# The agent


class Agent:
    """One device agent. ``await run()`` until :meth:`stop` (or a signal, with ``handle_signals``)."""

    def __init__(
        self,
        settings: AgentSettings,
        *,
        components: ComponentsFactory = default_components,
        backoff_rand: Callable[[], float] | None = None,
        metrics: AgentMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or AgentMetrics()
        self.metrics_address: str | None = None
        """``HOST:PORT`` the metrics are served on while running, when ``settings.metrics_listen`` is set."""
        self._components_factory = components
        self._backoff_rand = backoff_rand
        self._stopping = asyncio.Event()
        self._halt = threading.Event()  # seen by worker threads: stop downloading, stop installing
        self._reports = ReportQueue(settings.state_dir)
        self._progress = Progress(settings.state_dir)
        self._pending: dict[str, AssignmentSpec] = {}
        self._current: _Job | None = None
        self._work = asyncio.Event()
        self._reports_ready = asyncio.Event()
        self._retry_backoff: dict[str, Backoff] = {}
        self.identity: DeviceIdentity | None = None
        self.inference_port: int | None = None
        self._held: set[str] = set()
        """``namespace/name`` of the models with a committed version on disk (as last seen)."""
        self._sync_channel: grpc.Channel | None = None
        self._channel: aio.Channel | None = None
        self._retired: list[grpc.Channel] = []
        """Blocking channels replaced by a renewal, closed once no download may be using them."""
        self._renewed = asyncio.Event()
        self._unsent_health: deque[fleet_pb2.HealthReport] = deque(maxlen=MAX_UNSENT_HEALTH)
        """Health reports not acknowledged yet, oldest first (kept across reconnects, not restarts)."""
        self.renewals = 0
        """Certificate renewals completed in this process."""

    # --- public ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Begin a graceful stop (call from the event loop's thread)."""
        self._halt.set()
        self._stopping.set()
        self._work.set()  # an idle worker wakes up and sees the halt

    @property
    def last_revision(self) -> int:
        return self._progress.last_revision

    async def run(self, on_ready: Callable[[str, str], None] | None = None, *, handle_signals: bool = False) -> None:
        """Run until stopped. ``on_ready(device_id, inference_address)`` once serving and enrolled.

        :class:`AgentConfigError`, :class:`EnrollmentError` (refused) or :class:`IdentityError`
        when the agent cannot start.
        """
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        server: StoppableServer | None = None
        tasks: list[asyncio.Task[None]] = []
        metrics_http: WSGIServer | None = None
        try:
            if self.settings.metrics_listen is not None:
                # Before enrolling: a device that cannot enroll is one to see on a dashboard.
                metrics_http = self._serve_metrics()
            identity = await self._until_stopped(self._obtain_identity())
            if identity is None:
                return
            self.identity = identity
            policy = BackoffPolicy(identity.hints.reconnect_backoff_initial, identity.hints.reconnect_backoff_max)
            trusted_root = self._trusted_root()
            removed = await asyncio.to_thread(clean_partials, self.settings.state_dir, older_than=PARTIAL_MAX_AGE_S)
            if removed:
                logger.info("removed %d stale partial downloads", len(removed))
            interrupted = await asyncio.to_thread(clear_interrupted_writes, self.settings.state_dir)
            if interrupted:
                logger.info("removed temp files of interrupted writes: %s", ", ".join(interrupted))
            self._sync_channel = self._blocking_channel(identity)
            parts = self._components_factory(
                self.settings, identity, self._tuf_factory(trusted_root, policy), self.metrics
            )
            for result in await asyncio.to_thread(parts.updater.recover):
                self._queue_report(result)
            server, self.inference_port = await parts.start_inference()
            host = self.settings.inference_listen.rpartition(":")[0] or "127.0.0.1"
            self._channel = self._aio_channel(identity)

            def connected() -> list[asyncio.Task[None]]:
                # The loops that talk to the gateway: restarted on a new channel after a renewal.
                return [
                    asyncio.create_task(self._watch(self._stub(), parts.updater, policy), name="watch"),
                    asyncio.create_task(self._heartbeat(self._stub(), parts.runtime), name="heartbeat"),
                    asyncio.create_task(self._send_reports(self._stub(), policy), name="reports"),
                ]

            tasks = [
                asyncio.create_task(self._worker(parts.updater, policy), name="worker"),
                asyncio.create_task(self._renewal(policy), name="renewal"),
                *connected(),
            ]
            logger.info("agent %s serving inference on %s:%d", identity.device_id, host, self.inference_port)
            if on_ready is not None:
                on_ready(identity.device_id, f"{host}:{self.inference_port}")
            await self._supervise(tasks, connected)
        finally:
            self._halt.set()
            await self._shutdown(tasks, server)
            if metrics_http is not None:
                metrics_http.shutdown()
                metrics_http.server_close()
                self.metrics_address = None
            if handle_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    async def _supervise(
        self, tasks: list[asyncio.Task[None]], connected: Callable[[], list[asyncio.Task[None]]]
    ) -> None:
        """Wait for a stop; after each renewal restart the gateway loops (``tasks`` is kept current)."""
        stopped = asyncio.create_task(self._stopping.wait())
        try:
            while True:
                renewed = asyncio.create_task(self._renewed.wait())
                done, _ = await asyncio.wait([stopped, renewed, *tasks], return_when=asyncio.FIRST_COMPLETED)
                renewed.cancel()
                for task in done:
                    crash = None if task in (stopped, renewed) or task.cancelled() else task.exception()
                    if crash is not None:
                        raise crash  # a loop died: a bug; surface it rather than run half an agent
                if stopped in done or renewed not in done:
                    return
                self._renewed.clear()
                old = [t for t in tasks if t.get_name() not in ("worker", "renewal")]
                tasks[:] = [t for t in tasks if t not in old]
                tasks += await self._reconnect(old, connected)
        finally:
            stopped.cancel()

    # --- start-up ----------------------------------------------------------------------------------

    def _serve_metrics(self) -> WSGIServer:
        """The metrics over HTTP on ``settings.metrics_listen`` (a daemon thread); sets :attr:`metrics_address`."""
        listen = self.settings.metrics_listen
        assert listen is not None
        try:
            host, port = parse_listen(listen)
            http, _, bound = self.metrics.serve(host, port)
        except ValueError as e:
            raise AgentConfigError(f"metrics_listen: {e}") from None
        except OSError as e:
            raise AgentConfigError(f"cannot serve metrics on {listen}: {e.strerror or e}") from None
        self.metrics_address = f"{host}:{bound}"
        logger.info("serving metrics on http://%s/metrics", self.metrics_address)
        return http

    async def _until_stopped(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """``work``'s result, or ``None`` if a stop came first (``work`` is then cancelled)."""
        task = asyncio.create_task(work)
        stopped = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return None

    async def _obtain_identity(self) -> DeviceIdentity:
        store = IdentityStore(self.settings.state_dir)
        try:
            identity = store.load()
        except IdentityError as e:
            if self.settings.token is None:
                raise
            logger.warning("%s; enrolling again with the token given", e)
            identity = None
        if identity is not None:
            if identity.not_after > datetime.now(UTC):
                return identity
            return await self._after_expiry(identity)
        if self.settings.token is None:
            raise AgentConfigError(f"{self.settings.state_dir} holds no identity yet: give --token or --token-file")
        return await self._enroll(self.settings.token)

    async def _after_expiry(self, expired: DeviceIdentity) -> DeviceIdentity:
        """The stored certificate expired (the device was off past its renewal): enroll again if a
        token was given; else, or if that fails, keep the expired identity and say what to do.

        Either way the agent starts and serves the models on its disk: losing the gateway must
        never stop inference. The gateway refuses an expired certificate, and Renew needs a valid one.
        """
        when = expired.not_after.isoformat()
        if self.settings.token is not None:
            logger.warning("the device certificate expired at %s; enrolling again with the token given", when)
            try:
                return await self._enroll(self.settings.token)
            except EnrollmentError as e:
                problem = f"enrolling again failed ({e})"
        else:
            problem = "no bootstrap token was given"
        logger.error(
            "the device certificate expired at %s and %s: the gateway refuses this device until it is "
            "enrolled again; restart the agent with a new bootstrap token (--token or --token-file). "
            "Serving the models on disk meanwhile.",
            when,
            problem,
        )
        return expired

    async def _enroll(self, token: str) -> DeviceIdentity:
        try:
            gateway_ca = self.settings.gateway_ca.read_bytes()
        except OSError as e:
            raise AgentConfigError(f"cannot read the gateway CA {self.settings.gateway_ca}: {e.strerror}") from e
        hardware = await asyncio.to_thread(measure_hardware, self.settings.state_dir, available_providers())
        backoff = self._backoff(BackoffPolicy())
        while True:
            try:
                return await asyncio.to_thread(
                    enroll,
                    self.settings.state_dir,
                    target=self.settings.enroll_gateway,
                    gateway_ca_pem=gateway_ca,
                    token=token,
                    name=self.settings.name,
                    labels=self.settings.labels,
                    hardware=hardware,
                    agent_version=__version__,
                )
            except EnrollmentError as e:
                if not e.retryable:
                    raise
                delay = await backoff.wait_async()
                logger.warning("%s; retrying (waited %.1f s)", e, delay)

    def _trusted_root(self) -> bytes:
        """The provisioned TUF root: copied into the state on first start, the state's copy after."""
        stored = self.settings.state_dir / TRUSTED_ROOT
        try:
            if stored.is_file():
                return stored.read_bytes()
            if self.settings.tuf_root.stat().st_size > MAX_ROOT_BYTES:
                raise AgentConfigError(f"{self.settings.tuf_root} is over {MAX_ROOT_BYTES} bytes: not a TUF root")
            data = self.settings.tuf_root.read_bytes()
        except OSError as e:
            raise AgentConfigError(f"cannot read the trusted TUF root: {e}") from e
        write_file_atomic(stored, data)
        return data

    def _blocking_channel(self, identity: DeviceIdentity) -> grpc.Channel:
        return secure_channel(self.settings.gateway, identity.credentials, keepalive_s=self.settings.keepalive)

    def _aio_channel(self, identity: DeviceIdentity) -> aio.Channel:
        return aio_secure_channel(self.settings.gateway, identity.credentials, keepalive_s=self.settings.keepalive)

    def _stub(self) -> fleet_pb2_grpc.FleetGatewayAsyncStub:
        assert self._channel is not None
        return fleet_pb2_grpc.FleetGatewayStub(self._channel)

    def _tuf_factory(self, trusted_root: bytes, policy: BackoffPolicy) -> Callable[[], TufClient]:
        def stop_fetching() -> bool:
            job = self._current
            return self._halt.is_set() or (job is not None and job.cancel.is_set())

        def tuf_client() -> TufClient:
            channel = self._sync_channel  # the current one: a renewal replaces it
            assert channel is not None
            fetcher = GrpcTufFetcher(
                channel, self.settings.state_dir, backoff=policy, stop=stop_fetching, sleep=self._halt.wait
            )
            return TufClient(fetcher, trusted_root, self.settings.state_dir / TUF_METADATA)

        return tuf_client

    def _backoff(self, policy: BackoffPolicy) -> Backoff:
        return Backoff(policy) if self._backoff_rand is None else Backoff(policy, rand=self._backoff_rand)

    # --- watch ---------------------------------------------------------------------------------

    async def _watch(
        self, stub: fleet_pb2_grpc.FleetGatewayAsyncStub, updater: UpdaterPort, policy: BackoffPolicy
    ) -> None:
        backoff = self._backoff(policy)
        loop = asyncio.get_running_loop()
        while True:
            installed = await asyncio.to_thread(updater.installed)
            self._held = {f"{ns}/{name}" for ns, name, _ in installed}
            request = fleet_pb2.WatchAssignmentsRequest(
                last_revision=self._progress.last_revision,
                installed=[
                    fleet_pb2.InstalledModel(model_namespace=ns, model_name=n, version=v) for ns, n, v in installed
                ],
            )
            started = loop.time()
            call = stub.WatchAssignments(request)
            try:
                async for message in call:
                    backoff.reset()
                    spec = assignment_spec(message)
                    if spec is not None:
                        self._offer(spec)
                logger.info("the gateway ended the assignment stream; reconnecting")
            except aio.AioRpcError as e:
                self.metrics.gateway_failure("watch")
                code, details = rpc_status(e)
                level = logging.ERROR if code in _REFUSED else logging.INFO
                logger.log(level, "assignment stream: %s: %s; still serving, reconnecting", code.name, details)
            finally:
                call.cancel()
            if loop.time() - started > policy.maximum:
                backoff.reset()  # it ran a good while: treat it as a fresh failure
            await backoff.wait_async()

    def _offer(self, spec: AssignmentSpec) -> None:
        if not self._progress.accept(spec, held=spec.model_key in self._held):
            logger.debug("revision %d for %s already seen", spec.revision, spec.model_key)
            return
        replaced = self._pending.get(spec.model_key)
        if replaced is not None:
            logger.info(
                "[%s] revision %d supersedes %d before it started", spec.model_key, spec.revision, replaced.revision
            )
        self._pending[spec.model_key] = spec
        job = self._current
        if job is not None and job.spec.model_key == spec.model_key and job.spec.revision < spec.revision:
            logger.info("[%s] revision %d supersedes %d in progress", spec.model_key, spec.revision, job.spec.revision)
            job.cancel.set()
        self._work.set()

    # --- worker --------------------------------------------------------------------------------

    async def _worker(self, updater: UpdaterPort, policy: BackoffPolicy) -> None:
        while not self._halt.is_set():
            await self._work.wait()
            self._work.clear()
            while self._pending and not self._halt.is_set():
                key, spec = min(self._pending.items(), key=lambda item: item[1].revision)
                del self._pending[key]
                job = _Job(spec)
                self._current = job
                try:
                    result = await _in_thread(updater.apply, spec, self._cancelled(job))
                except Exception as e:
                    # A bug in the install path must not take the agent (and inference) down with it.
                    logger.error(
                        "[%s] revision %d: the install raised unexpectedly", spec.model_key, spec.revision, exc_info=e
                    )
                    result = _internal_error(spec, e)
                    self.metrics.update(result)  # the Updater records every outcome it returns itself
                finally:
                    self._current = None
                    self._close_retired()
                if self._halt.is_set():
                    return  # stopping: not applied; the gateway resends it after the restart
                self._queue_report(result)
                self._note_held(result)
                if (
                    result.outcome == "failed"
                    and result.reason in RETRYABLE_REASONS
                    and spec.model_key not in self._pending
                ):
                    self._retry_later(spec, policy)  # its partial downloads are kept for the retry
                    continue
                self._retry_backoff.pop(spec.model_key, None)
                self._progress.finish(spec)
                await asyncio.to_thread(clean_partials, self.settings.state_dir)

    def _note_held(self, result: InstallResult) -> None:
        key = f"{result.model_namespace}/{result.model_name}"
        if result.outcome == "succeeded" and result.reason == "Removed":
            self._held.discard(key)
        elif result.active_slot is not None:
            self._held.add(key)

    def _close_retired(self) -> None:
        while self._retired:
            self._retired.pop().close()

    def _cancelled(self, job: _Job) -> Callable[[], bool]:
        return lambda: job.cancel.is_set() or self._halt.is_set()

    def _retry_later(self, spec: AssignmentSpec, policy: BackoffPolicy) -> None:
        backoff = self._retry_backoff.setdefault(spec.model_key, self._backoff(policy))
        delay = backoff.next_delay()
        logger.info("[%s] revision %d will be retried in %.1f s", spec.model_key, spec.revision, delay)

        def retry() -> None:
            if self._progress.latest.get(spec.model_key) == spec.revision and spec.model_key not in self._pending:
                self._pending[spec.model_key] = spec
                self._work.set()

        asyncio.get_running_loop().call_later(delay, retry)

    def _queue_report(self, result: InstallResult) -> None:
        self._reports.put(result)
        self._reports_ready.set()
        seconds = result.durations.get("total", 0.0)
        level = logging.INFO if result.outcome == "succeeded" else logging.WARNING
        logger.log(
            level,
            "[%s/%s] revision %d %s -> %s: %s (%s) in %.2f s%s",
            result.model_namespace,
            result.model_name,
            result.revision,
            result.from_version or "-",
            result.to_version or "-",
            result.outcome,
            result.reason,
            seconds,
            f" at {result.failed_phase}: {result.message}" if result.failed_phase else "",
        )

    # --- heartbeat -----------------------------------------------------------------------------

    async def _heartbeat(self, stub: fleet_pb2_grpc.FleetGatewayAsyncStub, runtime: RuntimePort) -> None:
        assert self.identity is not None
        interval = self.settings.heartbeat_interval or self.identity.hints.heartbeat_interval
        sampler = SystemSampler(self.settings.state_dir)
        window_start = datetime.now(UTC)
        failing = False
        unsent = self._unsent_health
        while True:
            await asyncio.sleep(interval)
            stats = await asyncio.to_thread(sampler.sample)
            windows = runtime.drain_windows()
            now = datetime.now(UTC)
            for report in health_reports(window_start, now, stats_models=windows, stats=stats):
                if len(unsent) == unsent.maxlen:
                    logger.warning("%d health reports unsent; dropping the oldest", len(unsent))
                unsent.append(report)
            window_start = now
            # Oldest first, until one fails: a window the gateway did not acknowledge is sent again
            # (with its own window_start) rather than lost, so the rollout's counts stay whole.
            while unsent:
                try:
                    ack = await stub.ReportHealth(unsent[0], timeout=min(interval, CALL_TIMEOUT_S))
                except aio.AioRpcError as e:
                    self.metrics.gateway_failure("health_report")
                    code, details = rpc_status(e)
                    level = logging.DEBUG if failing else logging.WARNING
                    logger.log(level, "health report: %s: %s; %d kept to send again", code.name, details, len(unsent))
                    failing = True
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        unsent.popleft()  # the gateway will never take this one; do not block the rest
                    break
                unsent.popleft()
                failing = False
                if ack.HasField("next_interval") and self.settings.heartbeat_interval is None:
                    interval = max(1.0, ack.next_interval.ToTimedelta().total_seconds())

    # --- install reports -----------------------------------------------------------------------

    async def _send_reports(self, stub: fleet_pb2_grpc.FleetGatewayAsyncStub, policy: BackoffPolicy) -> None:
        backoff = self._backoff(policy)
        while True:
            self._reports_ready.clear()
            failed = False
            for result in await asyncio.to_thread(self._reports.pending):
                try:
                    await stub.ReportInstall(install_report(result), timeout=CALL_TIMEOUT_S)
                except aio.AioRpcError as e:
                    self.metrics.gateway_failure("install_report")
                    code, details = rpc_status(e)
                    if code == grpc.StatusCode.INVALID_ARGUMENT:
                        # Retrying cannot help; keeping it would block every later report.
                        logger.error("the gateway refused install report %s: %s; dropping it", result.revision, details)
                        self._reports.ack(result)
                        continue
                    logger.info("install report %d not delivered: %s: %s", result.revision, code.name, details)
                    failed = True
                    break
                self._reports.ack(result)
                backoff.reset()
            if failed:
                await backoff.wait_async()
            else:
                await self._reports_ready.wait()

    # --- certificate renewal -------------------------------------------------------------------

    async def _renewal(self, policy: BackoffPolicy) -> None:
        backoff = self._backoff(policy)
        earliest = 0.0  # loop time before which no renewal starts (after a successful one)
        loop = asyncio.get_running_loop()
        while True:
            identity = self.identity
            assert identity is not None
            wait = (renewal_due(identity) - datetime.now(UTC)).total_seconds()
            wait = max(wait, earliest - loop.time())
            if wait > 0:
                await asyncio.sleep(min(wait, MAX_RENEWAL_SLEEP_S))
                continue
            try:
                renewed = await self._renew(identity)
            except (aio.AioRpcError, EnrollmentError, OSError) as e:
                self.metrics.gateway_failure("renewal")
                if isinstance(e, aio.AioRpcError):
                    code, details = rpc_status(e)
                    problem = f"{code.name}: {details}"
                else:
                    problem = str(e)
                expired = identity.not_after <= datetime.now(UTC)
                logger.log(
                    logging.ERROR if expired else logging.WARNING,
                    "certificate renewal failed: %s; the certificate %s %s",
                    problem,
                    "expired at" if expired else "expires at",
                    identity.not_after.isoformat(),
                )
                await backoff.wait_async()
                continue
            backoff.reset()
            earliest = loop.time() + MIN_RENEWAL_INTERVAL_S
            self.identity = renewed
            self.renewals += 1
            logger.info("certificate renewed, valid until %s", renewed.not_after.isoformat())
            self._renewed.set()  # run() reconnects every loop with the new credentials

    async def _renew(self, identity: DeviceIdentity) -> DeviceIdentity:
        """A new key and CSR, Renew over the current mTLS channel, the new pair persisted."""
        key = await asyncio.to_thread(new_key)
        csr = certificate_signing_request(key, identity.name)
        response = await self._stub().Renew(fleet_pb2.RenewRequest(csr_pem=csr.decode()), timeout=RENEW_TIMEOUT_S)
        renewed = renewed_identity(response, key, identity)
        await asyncio.to_thread(IdentityStore(self.settings.state_dir).save_renewed, renewed)
        return renewed

    async def _reconnect(
        self, old: list[asyncio.Task[None]], connected: Callable[[], list[asyncio.Task[None]]]
    ) -> list[asyncio.Task[None]]:
        """Stop the gateway loops ``old``, open channels with the renewed credentials, start them again."""
        identity = self.identity
        assert identity is not None
        for task in old:
            task.cancel()
        await asyncio.gather(*old, return_exceptions=True)
        old_channel = self._channel
        self._channel = self._aio_channel(identity)
        if self._sync_channel is not None:
            # A download in progress keeps the old channel until its job ends (the worker closes it).
            self._retired.append(self._sync_channel)
        self._sync_channel = self._blocking_channel(identity)
        if self._current is None:
            self._close_retired()
        if old_channel is not None:
            await old_channel.close()
        logger.info("reconnecting to the gateway with the renewed certificate")
        return connected()

    # --- shutdown ------------------------------------------------------------------------------

    async def _shutdown(self, tasks: list[asyncio.Task[None]], server: StoppableServer | None) -> None:
        sync_channel, channel = self._sync_channel, self._channel
        worker = next((t for t in tasks if t.get_name() == "worker"), None)
        others = [t for t in tasks if t is not worker]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
        if sync_channel is not None:
            sync_channel.close()  # ends a download in progress at once; the partial file stays
        for retired in self._retired:
            retired.close()
        self._retired.clear()
        if worker is not None:
            try:
                await asyncio.wait_for(worker, self.settings.stop_grace)
            except TimeoutError:
                logger.warning("an install did not stop within %.1f s; leaving it", self.settings.stop_grace)
            except asyncio.CancelledError:
                pass
        if server is not None:
            await server.stop(self.settings.stop_grace)
        if channel is not None:
            await channel.close()
        logger.info("agent stopped")


def health_report(
    window_start: datetime, window_end: datetime, *, stats_models: list[ModelWindowStats], stats: DeviceStats
) -> fleet_pb2.HealthReport:
    """The HealthReport for one window: device figures and one entry per served model."""
    report = fleet_pb2.HealthReport(
        cpu_percent=stats.cpu_percent,
        memory_used_bytes=stats.memory_used_bytes,
        memory_total_bytes=stats.memory_total_bytes,
        disk_used_bytes=stats.disk_used_bytes,
        disk_total_bytes=stats.disk_total_bytes,
        models=[model_health(m) for m in stats_models],
    )
    report.window_start.FromDatetime(window_start)
    report.window.FromTimedelta(max(window_end - window_start, timedelta(milliseconds=1)))
    if stats.energy_joules is not None:
        report.energy_joules = stats.energy_joules
    return report


def health_reports(
    window_start: datetime, window_end: datetime, *, stats_models: list[ModelWindowStats], stats: DeviceStats
) -> list[fleet_pb2.HealthReport]:
    """The HealthReports for one heartbeat: one, or one per version when a model switched versions in it.

    fleet.proto allows one entry per model in a report, and each request must count against the
    version that served it (the rollout compares a version's error rate with its predecessor's). So
    a window with a switch is split in consecutive, non-overlapping sub-windows at the switch: a
    model's entries (oldest version first) fill the last sub-windows, its current version the last one.
    """
    per_model: dict[tuple[str, str], list[ModelWindowStats]] = {}
    for entry in stats_models:
        per_model.setdefault((entry.model_namespace, entry.model_name), []).append(entry)
    count = max((len(entries) for entries in per_model.values()), default=1)
    parts: list[list[ModelWindowStats]] = [[] for _ in range(count)]
    switches: list[list[datetime]] = [[] for _ in range(count)]
    """Per sub-window, when the versions that replaced another one in it started serving."""
    for entries in per_model.values():
        first = count - len(entries)
        for index, entry in enumerate(entries, start=first):
            parts[index].append(entry)
            if index > first and entry.started_at is not None:
                switches[index].append(entry.started_at)
    tick = timedelta(milliseconds=1)
    bounds = [window_start]
    for index in range(1, count):
        split = min(switches[index], default=bounds[-1])
        bounds.append(min(max(split, bounds[-1] + tick), window_end - tick * (count - index)))
    bounds.append(max(window_end, bounds[-1] + tick))
    return [
        health_report(bounds[index], bounds[index + 1], stats_models=parts[index], stats=stats)
        for index in range(count)
    ]


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:
    """Run ``fn`` in a daemon thread: unlike ``asyncio.to_thread`` an install that does not stop
    in time cannot hold the process at exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(set_outcome: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed while we ran
            loop.call_soon_threadsafe(lambda: None if future.done() else set_outcome())

    def target() -> None:
        try:
            value = fn(*args)
        except BaseException as e:  # noqa: BLE001  # handed to the awaiting coroutine, not swallowed
            error = e
            deliver(lambda: future.set_exception(error))
        else:
            deliver(lambda: future.set_result(value))

    threading.Thread(target=target, name="edgefleet-install", daemon=True).start()
    return await future
