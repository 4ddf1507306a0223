"""Real gateway and agent processes for integration, end-to-end and fault tests.

Every process is started through the real CLI (``edgefleet gateway serve``, ``edgefleet agent run``)
with its output in a log file in the test's folder, so a failing test can show what each one said.
Readiness is the line each command prints once it serves; nothing waits a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from typer.testing import CliRunner

from edgefleet_core.cli.main import build_app

T = TypeVar("T")
EDGEFLEET = [sys.executable, "-m", "edgefleet_core.cli"]
READY_S = 60.0
_GATEWAY_READY = re.compile(r"gateway listening fleet=(\S+):(\d+) enroll=(\S+):(\d+)")
_AGENT_READY = re.compile(r"agent ready device=(\S+) inference=(\S+)")


_CLI_LOCK = threading.Lock()
"""CliRunner swaps sys.stdout/stderr for the whole process: one in-process command at a time."""


def cli(*args: str) -> str:
    """Run an ``edgefleet`` command in this process (fast); its output, or a failed assertion with it."""
    with _CLI_LOCK:
        result = CliRunner().invoke(build_app(), list(args))
    output = result.stdout + result.stderr
    assert result.exit_code == 0, f"edgefleet {' '.join(args)} → {result.exit_code}\n{output}"
    return result.stdout


def wait_for(what: str, check: Callable[[], T | None], *, timeout: float = 60.0, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something other than ``None``/``False``; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value is not None and value is not False:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@dataclass
class Process:
    """A running ``edgefleet`` command and its log."""

    name: str
    args: list[str]
    log: Path
    popen: subprocess.Popen[bytes]
    match: re.Match[str] | None = None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=30)
            raise AssertionError(f"{self.name} did not stop within {timeout} s of SIGTERM\n{self.output()}") from None


def start(
    name: str,
    args: list[str],
    folder: Path,
    ready: re.Pattern[str],
    *,
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> Process:
    """Start ``edgefleet ARGS`` (or the whole command ``argv``, e.g. under a wrapper) and wait for its ready line."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{name}.log"
    # Appending keeps earlier lives' output when a process is restarted under the same name; only a
    # ready line written after `offset` (by this life) counts.
    offset = log.stat().st_size if log.exists() else 0
    with log.open("ab") as out:
        popen = subprocess.Popen(
            argv or [*EDGEFLEET, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
    process = Process(name, args, log, popen)
    deadline = time.monotonic() + READY_S
    while True:
        with log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        found = ready.search(text)
        if found is not None:
            process.match = found
            return process
        if popen.poll() is not None:
            raise AssertionError(f"{name} exited with {popen.returncode} before it was ready\n{text}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"{name} not ready within {READY_S} s\n{text}")
        time.sleep(0.05)


@dataclass
class FleetSite:
    """One test's control plane on disk: store (TUF repository + fleet state), signing keys, PKI."""

    folder: Path
    processes: list[Process] = field(default_factory=list)

    @property
    def store_url(self) -> str:
        return f"file://{self.folder / 'store'}"

    @property
    def keys(self) -> Path:
        return self.folder / "keys"

    @property
    def pki(self) -> Path:
        return self.folder / "pki"

    @property
    def trusted_root(self) -> Path:
        return self.keys / "root.json"

    def init(self) -> FleetSite:
        cli("keys", "init", str(self.keys))
        cli("gateway", "pki", "init", str(self.pki), "--host", "localhost", "--host", "127.0.0.1")
        return self

    def publish(self, model: Path, *, name: str, version: str, device_class: str, namespace: str = "demo",
                extra: tuple[str, ...] = ()) -> None:  # fmt: skip
        cli("publish", str(model), "--store", self.store_url, "--keys", str(self.keys), "--model", name,
            "--version", version, "--device-class", device_class, "--namespace", namespace, *extra)  # fmt: skip

    def token(self, device_class: str, *, namespace: str = "demo", ttl: str = "1h") -> str:
        return cli("gateway", "token", "create", "--store", self.store_url, "--namespace", namespace,
                   "--device-class", device_class, "--ttl", ttl).strip()  # fmt: skip

    def assign(self, *, model: str, version: str, namespace: str = "demo", devices: tuple[str, ...] = (),
               device_class: str | None = None, action: str = "install") -> int:  # fmt: skip
        target = [a for d in devices for a in ("--device", d)]
        if device_class is not None:
            target = ["--device-class", device_class]
        out = cli("gateway", "assign", "--store", self.store_url, "--namespace", namespace, "--model", model,
                  "--version", version, "--action", action, *target)  # fmt: skip
        return int(out.strip().split()[-1])

    def start_gateway(self, *, name: str = "gateway", port: int = 0, enroll_port: int = 0,
                      extra: tuple[str, ...] = ()) -> Process:  # fmt: skip
        process = start(
            name,
            ["gateway", "serve", "--store", self.store_url, "--pki", str(self.pki),
             "--listen", f"127.0.0.1:{port}", "--enroll-listen", f"127.0.0.1:{enroll_port}",
             "--poll-interval", "0.05", "--status-interval", "0.2", "--heartbeat-interval", "1", *extra],
            self.folder / "logs",
            _GATEWAY_READY,
        )  # fmt: skip
        self.processes.append(process)
        return process

    def start_agent(self, name: str, *, gateway: str, enroll_gateway: str, token: str | None = None,
                    extra: tuple[str, ...] = ()) -> Process:  # fmt: skip
        args = ["agent", "run", "--state", str(self.agent_state(name)), "--gateway", gateway,
                "--enroll-gateway", enroll_gateway, "--gateway-ca", str(self.pki / "ca.pem"),
                "--tuf-root", str(self.trusted_root), "--name", name,
                "--inference-listen", "127.0.0.1:0", *extra]  # fmt: skip
        if token is not None:
            args += ["--token", token]
        process = start(name, args, self.folder / "logs", _AGENT_READY)
        self.processes.append(process)
        return process

    def agent_state(self, name: str) -> Path:
        return self.folder / "agents" / name

    def stop_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(AssertionError, OSError):
                if process.alive():
                    process.terminate(timeout=15)
            with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                process.kill()

    def logs(self) -> str:
        return "\n".join(f"===== {p.name} =====\n{p.output()[-4000:]}" for p in self.processes)


def gateway_address(process: Process) -> tuple[str, str]:
    """(fleet address, enrollment address) from a gateway's ready line."""
    assert process.match is not None
    host, port, enroll_host, enroll_port = process.match.groups()
    return f"{host}:{port}", f"{enroll_host}:{enroll_port}"


def inference_address(process: Process) -> str:
    """The agent's local inference API address from its ready line."""
    assert process.match is not None
    return process.match.group(2)


@contextlib.contextmanager
def fleet_site(folder: Path) -> Iterator[FleetSite]:
    """A :class:`FleetSite` whose processes are all stopped (and logs shown on failure) at the end."""
    site = FleetSite(folder).init()
    try:
        yield site
    except BaseException:
        sys.stderr.write(site.logs())
        raise
    finally:
        site.stop_all()
