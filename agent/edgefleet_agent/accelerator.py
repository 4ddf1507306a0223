"""The tail of a partitioned model on an ``edgefleet accel-server``, with a local session standing by.

An edge node whose accelerator is driven by another process (a container holding the GPU runtime,
a vendor daemon) runs ``edgefleet accel-server serve`` there, and the agent is started with
``--accel-server HOST:PORT --accel-models DIR``. For every installed bundle with a partition plan
the agent then sends the tail to that server (:class:`~edgefleet_agent.remote_stage.RemoteStage`)
and keeps the head in-process.

The accelerator process can die, hang or restart while the agent serves. :class:`FailoverStage`
keeps a local session of the tail loaded: a request the server does not answer (within
:attr:`AcceleratorServer.timeout`) or fails is answered by the local session, and the model counts
as degraded (``accelerator_fallback_count`` in health reports) until the server is back. A
supervisor thread per stage notices a stream that broke while no request ran, and re-attaches
:attr:`AcceleratorServer.retry_seconds` after a loss (spaced out up to :data:`MAX_BACKOFF` times
that while attaches keep failing), so no request waits on a connection attempt.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from edgefleet_agent.errors import InferenceFailed
from edgefleet_agent.pipeline import LocalStage

if TYPE_CHECKING:
    # Imported when used: the remote stage pulls in gRPC and the inference server, which imports the
    # runtime, which imports this module.
    from edgefleet_agent.remote_stage import RemoteStage

__all__ = [
    "DEFAULT_RETRY_SECONDS",
    "DEFAULT_TIMEOUT",
    "AcceleratorServer",
    "FailoverStage",
    "parse_target",
    "stage_id_for",
]

log = logging.getLogger(__name__)

DEFAULT_RETRY_SECONDS: Final = 30.0
"""How often a detached tail tries the accelerator server again (and an idle one checks its stream)."""
DEFAULT_TIMEOUT: Final = 10.0
"""Seconds an attach (connect and LoadStage) and each remote run may take before the server counts as gone."""
MAX_BACKOFF: Final = 8
"""After failures in a row, re-attach attempts are spaced up to this many times ``retry_seconds`` apart:
a session wedged inside the server (its event loop alive, its accelerator stuck) is handed back at
once by LoadStage, and each re-attach would cost the next request a full timeout."""
_SCHEMES: Final = ("unix:", "unix-abstract:", "ipv4:", "ipv6:", "dns:")


def stage_id_for(key: str, namespace: str, name: str, version: str, model: bytes) -> str:
    """The accel-server stage id of one model version's tail on one device.

    The same on every start of the same agent (``key``: the device id), so an agent restarted or
    killed gets the session it left on the server back instead of loading another beside it; and
    different for every version, so two versions with the same tail never unload each other's.
    """
    digest = hashlib.sha256(model).hexdigest()
    return hashlib.sha256("\0".join((key, namespace, name, version, digest)).encode()).hexdigest()


def parse_target(target: str) -> str:
    """``target`` when it is ``HOST:PORT`` (port 1-65535, IPv6 as ``[ADDRESS]:PORT``), ``unix:PATH``, or
    one of gRPC's ``unix-abstract:``, ``ipv4:``, ``ipv6:``, ``dns:`` names; ``ValueError`` naming the problem."""
    value = target.strip()
    if any(c.isspace() for c in value):
        raise ValueError(f"{target!r} is not HOST:PORT or unix:PATH")
    scheme = next((s for s in _SCHEMES if value.startswith(s)), None)
    if scheme is not None:
        if not value.removeprefix(scheme).lstrip("/"):
            raise ValueError(f"{target!r} names nothing after {scheme!r}")
        return value
    if "://" in value:
        raise ValueError(f"{target!r}: give HOST:PORT or unix:PATH, not a URL")
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{target!r} is not HOST:PORT or unix:PATH")
    if host.startswith("[") != host.endswith("]") or (":" in host and not host.startswith("[")):
        raise ValueError(f"{target!r}: an IPv6 host is written [ADDRESS]:PORT")
    if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError(f"{target!r}: the port must be a number from 1 to 65535")
    return value


@dataclass(frozen=True)
class AcceleratorServer:
    """Where the agent sends partitioned models' tails."""

    target: str
    """HOST:PORT or unix:PATH of ``edgefleet accel-server serve`` (plaintext: loopback or a local socket)."""
    models_dir: Path
    """The content-addressed folder the server reads stage models from (its ``--models``), shared with it."""
    timeout: float = DEFAULT_TIMEOUT
    retry_seconds: float = DEFAULT_RETRY_SECONDS


class FailoverStage:
    """A tail stage run by the accelerator server while it answers, else by ``local``.

    Takes the tail's model bytes and a loaded local session of the same model. Construction tries
    the server once; failing that, the stage starts detached (local). ``on_detach(provider)`` is
    called each time an attached server is lost. Every attach uses the same ``stage_id`` (see
    :func:`stage_id_for`; a random one by default), so a server that kept the stage loaded through a
    hang hands the same session back instead of loading another (and a detach never unloads it: a
    late UnloadStage would take it from the next attach).
    """

    def __init__(
        self,
        server: AcceleratorServer,
        model: bytes,
        local: LocalStage,
        providers: Sequence[str],
        *,
        label: str,
        on_detach: Callable[[str], None] = lambda provider: None,
        stage_id: str | None = None,
    ) -> None:
        self.server = server
        self.label = label
        self.local = local
        self.inputs: tuple[Any, ...] = local.inputs
        self.outputs: tuple[Any, ...] = local.outputs
        self.input_names = local.input_names
        self.output_names = local.output_names
        self._model = model
        self._providers = list(providers)
        self._on_detach = on_detach
        self.stage_id = stage_id or hashlib.sha256(hashlib.sha256(model).digest() + os.urandom(16)).hexdigest()
        """One id for every attach of this stage (see the class docs)."""
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._failures = 0
        """Failed attaches and lost servers since a remote run last succeeded (spaces re-attaches)."""
        self._next_attempt = 0.0
        self._lost_while_loaded = False
        """The server may hold the stage while we are detached (it hung, or finished a load we gave up on)."""
        self.last_problem: str | None = None
        """Why the stage is detached (the server's error), ``None`` while attached."""
        self._remote: RemoteStage | None = self._connect()  # not attached: the runtime counts it at load
        self._supervisor = threading.Thread(target=self._supervise, name=f"supervise-{label}", daemon=True)
        self._supervisor.start()

    # --- attaching -------------------------------------------------------------------------------

    def _connect(self) -> RemoteStage | None:
        from edgefleet_agent.remote_stage import AcceleratorUnavailable, RemoteStage  # noqa: PLC0415 - see the imports

        try:
            remote = RemoteStage(
                self.server.target,
                self._model,
                models_dir=self.server.models_dir,
                providers=self._providers,
                timeout=self.server.timeout,
                stage_id=self.stage_id,
            )
        except Exception as exc:  # noqa: BLE001 - any failure to attach leaves the tail local, and is retried
            self.last_problem = str(exc) or type(exc).__name__
            self._failed()
            if isinstance(exc, AcceleratorUnavailable):
                self._lost_while_loaded = True  # a LoadStage given up on may still finish on the server
            log.warning("%s: runs locally on %s: %s", self.label, self.local.execution_provider, self.last_problem)
            return None
        self.last_problem = None
        log.info("%s: runs on accelerator server %s (%s)", self.label, self.server.target, remote.execution_provider)
        return remote

    def _failed(self) -> None:
        self._failures = min(self._failures + 1, 16)
        spacing = self.server.retry_seconds * min(2 ** (self._failures - 1), MAX_BACKOFF)
        self._next_attempt = time.monotonic() + spacing

    def _supervise(self) -> None:
        """Every ``retry_seconds``: detach a stage whose stream broke while idle; re-attach a detached
        one when its backoff allows."""
        while not self._closed.wait(self.server.retry_seconds):
            try:
                self._check()
            except Exception:  # a supervisor that died would leave the tail local for good
                log.exception("%s: supervising the accelerator server failed; trying again", self.label)

    def _check(self) -> None:
        with self._lock:
            remote = self._remote
        if remote is not None:
            if remote.broken is not None:
                self._detach(remote, str(remote.broken))
            return
        if time.monotonic() < self._next_attempt:
            return
        attached = self._connect()
        if attached is None:
            return
        with self._lock:
            if not self._closed.is_set():
                self._remote, attached = attached, None
                self._lost_while_loaded = False
        if attached is not None:  # closed while connecting: nobody will use it
            attached.close()

    def _detach(self, remote: RemoteStage, problem: str) -> None:
        with self._lock:
            if self._remote is not remote:
                return  # another request detached it already
            self._remote = None
            self._lost_while_loaded = True
            self._failed()
        self.last_problem = problem
        log.warning("%s: accelerator server lost (%s); the tail runs locally until it is back", self.label, problem)
        self._on_detach(self.local.execution_provider)
        # Closing waits for the server's channel: not on a request's time.
        threading.Thread(target=lambda: remote.close(unload=False), name=f"detach-{self.label}", daemon=True).start()

    # --- the Stage protocol ----------------------------------------------------------------------

    @property
    def attached(self) -> bool:
        """Whether requests go to the accelerator server now."""
        with self._lock:
            return self._remote is not None

    @property
    def execution_provider(self) -> str:
        """The server session's provider while attached, else the local one's."""
        with self._lock:
            remote = self._remote
        return remote.execution_provider if remote is not None else self.local.execution_provider

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tail's outputs: from the server if it answers, else from the local session.

        A request the server fails (its accelerator out of memory, say) is run locally too: when
        that succeeds the server was at fault and is detached; when it fails as well the request
        was, and its local error is raised with the server left attached.
        """
        from edgefleet_agent.remote_stage import AcceleratorUnavailable  # noqa: PLC0415 - see the imports

        with self._lock:
            remote = self._remote
        if remote is None:
            return self.local.run(inputs)
        try:
            outputs = remote.run(inputs)
        except AcceleratorUnavailable as exc:
            self._detach(remote, str(exc))
            return self.local.run(inputs)
        except InferenceFailed as exc:
            outputs = self.local.run(inputs)  # raises the local error when the request is at fault
            self._detach(remote, f"it failed a request the local session ran: {exc}")
            return outputs
        self._failures = 0  # the server answers: a later loss is retried at the normal pace again
        return outputs

    def close(self) -> None:
        """Unload the stage from the server (best effort) and drop the local session. Idempotent."""
        with self._lock:
            self._closed.set()
            remote, self._remote = self._remote, None
            lost = self._lost_while_loaded
        if remote is not None:
            remote.close()
        elif lost:  # a server that hung and came back still holds the stage: ask it to drop it
            from edgefleet_agent.remote_stage import unload_stage  # noqa: PLC0415 - see the imports

            target, stage_id = self.server.target, self.stage_id
            threading.Thread(target=lambda: unload_stage(target, stage_id), name="unload-stage", daemon=True).start()
        self.local.close()
