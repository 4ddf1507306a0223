"""The tail of a partitioned model on an ``edgefleet accel-server``, with a local session standing by.

An edge node whose accelerator is driven by another process (a container holding the GPU runtime,
a vendor daemon) runs ``edgefleet accel-server serve`` there, and the agent is started with
``--accel-server HOST:PORT --accel-models DIR``. For every installed bundle with a partition plan
the agent then sends the tail to that server (:class:`~edgefleet_agent.remote_stage.RemoteStage`)
and keeps the head in-process.

The accelerator process can die or restart while the agent serves. :class:`FailoverStage` keeps a
local session of the tail loaded, so a request that finds the server gone is answered locally,
at once and with the same outputs, and the model counts as degraded (``accelerator_fallback_count``
in health reports) until the server is back: every :attr:`AcceleratorServer.retry_seconds` a
background attempt re-attaches, so no request waits on a connection timeout.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from edgefleet_agent.pipeline import LocalStage

if TYPE_CHECKING:
    # Imported when used: the remote stage pulls in gRPC and the inference server, which imports the
    # runtime, which imports this module.
    from edgefleet_agent.remote_stage import AcceleratorUnavailable, RemoteStage

__all__ = ["DEFAULT_RETRY_SECONDS", "AcceleratorServer", "FailoverStage"]

log = logging.getLogger(__name__)

DEFAULT_RETRY_SECONDS: Final = 30.0
"""How often a detached tail tries the accelerator server again."""
DEFAULT_CONNECT_TIMEOUT: Final = 10.0
"""Seconds an attach (connect and LoadStage) and each remote run may take before the server counts as gone."""


@dataclass(frozen=True)
class AcceleratorServer:
    """Where the agent sends partitioned models' tails."""

    target: str
    """HOST:PORT or unix:PATH of ``edgefleet accel-server serve`` (plaintext: loopback or a local socket)."""
    models_dir: Path
    """The content-addressed folder the server reads stage models from (its ``--models``), shared with it."""
    timeout: float = DEFAULT_CONNECT_TIMEOUT
    retry_seconds: float = DEFAULT_RETRY_SECONDS


class FailoverStage:
    """A tail stage run by the accelerator server while it answers, else by ``local``.

    Takes the tail's model bytes and a loaded local session of the same model. Construction tries
    the server once; failing that, the stage starts detached (local) and retries in the background.
    ``on_detach(provider)`` is called each time a server that was attached is lost. The pipeline
    calls :meth:`run` from one worker thread; the attach thread only swaps the remote stage in.
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
        self._lock = threading.Lock()
        self._remote: RemoteStage | None = None
        self._attaching = False
        self._closed = False
        self._last_attempt = time.monotonic()
        self.last_problem: str | None = None
        """Why the stage is detached (the server's error), ``None`` while attached."""
        remote = self._connect()  # not attached: the runtime counts that as a fallback of the load
        with self._lock:
            self._remote = remote

    # --- attaching -------------------------------------------------------------------------------

    def _connect(self) -> RemoteStage | None:
        from edgefleet_agent.remote_stage import RemoteStage, RemoteStageError  # noqa: PLC0415 - see the imports

        try:
            remote = RemoteStage(
                self.server.target,
                self._model,
                models_dir=self.server.models_dir,
                providers=self._providers,
                timeout=self.server.timeout,
            )
        except (RemoteStageError, OSError) as exc:
            self.last_problem = str(exc)
            log.warning("%s: runs locally on %s: %s", self.label, self.local.execution_provider, exc)
            return None
        self.last_problem = None
        log.info("%s: runs on accelerator server %s (%s)", self.label, self.server.target, remote.execution_provider)
        return remote

    def _attach_in_background(self) -> None:
        remote = self._connect()
        with self._lock:
            self._attaching = False
            self._last_attempt = time.monotonic()
            if remote is not None and not self._closed and self._remote is None:
                self._remote, remote = remote, None
        if remote is not None:  # closed meanwhile: nobody will use it
            remote.close()

    def _maybe_retry(self) -> None:
        with self._lock:
            due = time.monotonic() - self._last_attempt >= self.server.retry_seconds
            if self._closed or self._remote is not None or self._attaching or not due:
                return
            self._attaching = True
        threading.Thread(target=self._attach_in_background, name=f"attach-{self.label}", daemon=True).start()

    def _detach(self, remote: RemoteStage, problem: AcceleratorUnavailable) -> None:
        with self._lock:
            if self._remote is not remote:
                return
            self._remote = None
            self._last_attempt = time.monotonic()
        self.last_problem = str(problem)
        log.warning("%s: accelerator server lost (%s); the tail runs locally until it is back", self.label, problem)
        self._on_detach(self.local.execution_provider)
        # Closing waits up to the unload timeout for a server that is gone: not on a request's time.
        threading.Thread(target=remote.close, name=f"detach-{self.label}", daemon=True).start()

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
        """The tail's outputs, from the server if it answers, else from the local session."""
        from edgefleet_agent.remote_stage import AcceleratorUnavailable  # noqa: PLC0415 - see the imports

        with self._lock:
            remote = self._remote
        if remote is None:
            self._maybe_retry()
            return self.local.run(inputs)
        try:
            return remote.run(inputs)
        except AcceleratorUnavailable as exc:
            self._detach(remote, exc)
        return self.local.run(inputs)

    def close(self) -> None:
        """Unload the stage from the server (best effort) and drop the local session. Idempotent."""
        with self._lock:
            self._closed = True
            remote, self._remote = self._remote, None
        if remote is not None:
            remote.close()
        self.local.close()
