"""The demo's child processes: one ``edgefleet gateway serve`` and the ``edgefleet agent run`` devices.

Each child runs the real CLI (``python -m edgefleet_core.cli``) with its output in a log file of
the run's folder; it is ready when it prints its ready line. :class:`Children` stops them all:
SIGTERM, a grace period, then SIGKILL, and the same for anything a child started itself, so a
stopped demo leaves no process behind.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import psutil

from edgefleet_operator.demo.errors import ChildFailed, DemoTimeout

EDGEFLEET: Final = (sys.executable, "-m", "edgefleet_core.cli")
GATEWAY_READY: Final = re.compile(r"gateway listening fleet=(\S+):(\d+) enroll=(\S+):(\d+)")
AGENT_READY: Final = re.compile(r"agent ready device=(\S+) inference=(\S+)")
READY_S: Final = 90.0
GRACE_S: Final = 10.0
"""How long a child gets to stop after SIGTERM before it is killed."""


@dataclass
class Child:
    """A running ``edgefleet`` command, its log, and what its ready line said."""

    name: str
    log: Path
    popen: subprocess.Popen[bytes]
    ready: re.Pattern[str]
    match: re.Match[str] | None = None

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def poll_ready(self) -> bool:
        """Whether the ready line is in the log; :class:`ChildFailed` when the child exited first."""
        if self.match is not None:
            return True
        found = self.ready.search(self.output(tail=1 << 20))
        if found is not None:
            self.match = found
            return True
        if not self.alive():
            raise ChildFailed(f"{self.name} exited with {self.popen.returncode}: {self.output(1500)}")
        return False


@dataclass
class Children:
    """Every child of one demo run; :meth:`stop_all` ends them (idempotent, safe from any thread)."""

    logs: Path
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    program: tuple[str, ...] = EDGEFLEET
    """What every child runs, before its arguments (the real CLI; tests give a stand-in)."""
    started: list[Child] = field(default_factory=list)

    def start(
        self, name: str, args: Sequence[str], ready: re.Pattern[str], *, env: dict[str, str] | None = None
    ) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(  # noqa: S603 - our own CLI, arguments built here
                [*self.program, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        child = Child(name, log, popen, ready)
        self.started.append(child)
        return child

    def wait_ready(
        self, children: Sequence[Child], *, timeout: float = READY_S, tick: Callable[[], None] | None = None
    ) -> None:
        """Poll until every child printed its ready line; ``tick`` runs between polls (progress, signals)."""
        deadline = time.monotonic() + timeout
        while not all(c.poll_ready() for c in children):
            if time.monotonic() > deadline:
                waiting = [c.name for c in children if c.match is None]
                raise DemoTimeout(f"not ready within {timeout:.0f} s: {', '.join(waiting)}")
            if tick is not None:
                tick()
            time.sleep(0.05)

    def check_alive(self) -> None:
        """:class:`ChildFailed` naming the first child that exited while it should run."""
        for child in self.started:
            if not child.alive():
                raise ChildFailed(f"{child.name} exited with {child.popen.returncode}: {child.output(1500)}")

    def stop_all(self, grace: float = GRACE_S) -> None:
        """SIGTERM every child (and what it started), wait up to ``grace``, SIGKILL what is left."""
        processes: list[psutil.Process] = []
        for child in self.started:
            with contextlib.suppress(psutil.Error):
                parent = psutil.Process(child.popen.pid)
                processes.extend([parent, *parent.children(recursive=True)])
        for child in self.started:
            if child.alive():
                with contextlib.suppress(ProcessLookupError):
                    child.popen.send_signal(signal.SIGTERM)
        _, left = psutil.wait_procs(processes, timeout=grace)
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(left, timeout=5)
        for child in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=5)  # reap, so no zombie outlives the demo


def gateway_addresses(child: Child) -> tuple[str, str]:
    """(fleet address, enrollment address) from the gateway's ready line."""
    assert child.match is not None
    host, port, enroll_host, enroll_port = child.match.groups()
    return f"{host}:{port}", f"{enroll_host}:{enroll_port}"


def inference_address(child: Child) -> str:
    assert child.match is not None
    return child.match.group(2)
