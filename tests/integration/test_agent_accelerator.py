"""The agent's runtime with ``--accel-server``: tails on a real ``edgefleet accel-server`` subprocess,
answered locally while it is SIGKILLed, and back on it once it restarts."""

from __future__ import annotations

import contextlib
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet_agent.accelerator import AcceleratorServer
from edgefleet_agent.metrics import AgentMetrics
from edgefleet_agent.runtime import LoadedModel, ModelRuntime
from edgefleet_core.cli.main import build_app
from edgefleet_core.partition.cuts import SplitModel, enumerate_cuts, run_split, split_model
from tests.support.tiny_models import tiny_cnn, tiny_inputs

pytestmark = pytest.mark.integration
WAIT = 30.0


@pytest.fixture(autouse=True)
def no_supervisor_left() -> Iterator[None]:
    """Every tail a test loads is closed: a supervisor left running would retry (and log) in later tests."""
    yield
    deadline = time.monotonic() + WAIT
    while left := [t.name for t in threading.enumerate() if t.name.startswith("supervise-")]:
        assert time.monotonic() < deadline, f"supervisors still running: {left}"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def accel_server(models: Path, port: int, log: Path | None = None) -> Iterator[subprocess.Popen[str]]:
    """``edgefleet accel-server serve`` on ``port``, ready when yielded; SIGKILLed (if still alive) after."""
    command = [sys.executable, "-m", "edgefleet_core.cli", "-v", "accel-server", "serve", "--models", str(models)]
    errors = log.open("ab") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(
        [*command, "--listen", f"127.0.0.1:{port}"], stdout=subprocess.PIPE, stderr=errors, text=True
    )
    if log is not None:
        errors.close()  # type: ignore[union-attr]  # the child has its own copy
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], WAIT)
        assert ready, "the accel-server printed no ready line"
        assert process.stdout.readline().startswith("accel-server listening ")
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        if process.stdout is not None:
            process.stdout.close()


def cnn_split() -> SplitModel:
    model = tiny_cnn()
    return split_model(model, enumerate_cuts(model)[1])


def load(runtime: ModelRuntime, split: SplitModel) -> LoadedModel:
    files = {"head.onnx": split.head.SerializeToString(), "tail.onnx": split.tail.SerializeToString()}
    loaded = runtime.load("vision", "cnn", "1.0.0", files, slot="a")
    runtime.activate(loaded)
    return loaded


def predict_exact(runtime: ModelRuntime, split: SplitModel, seed: int) -> None:
    """One request through the runtime: the same bits as head and tail run here."""
    feed = {"input": tiny_inputs(count=2, seed=seed)}
    [(name, logits)] = runtime.predict("cnn", feed, namespace="vision").outputs
    assert name == "logits"
    np.testing.assert_array_equal(logits, run_split(split, feed)["logits"])


def state(runtime: ModelRuntime) -> str:
    [status] = runtime.status("vision", "cnn")
    return status.state


def wait_state(runtime: ModelRuntime, wanted: str) -> None:
    deadline = time.monotonic() + WAIT
    while state(runtime) != wanted:
        assert time.monotonic() < deadline, f"the model never became {wanted}"
        time.sleep(0.05)


@dataclass(frozen=True)
class Site:
    """A shared models folder, a free port for the accel-server and the file its log goes to."""

    models: Path
    port: int
    log: Path

    def accelerator(self, timeout: float) -> AcceleratorServer:
        return AcceleratorServer(f"127.0.0.1:{self.port}", self.models, timeout=timeout, retry_seconds=0.2)

    def server(self) -> contextlib.AbstractContextManager[subprocess.Popen[str]]:
        return accel_server(self.models, self.port, self.log)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    models = tmp_path / "models"
    models.mkdir()
    return Site(models, free_port(), tmp_path / "accel-server.log")


def fallbacks(runtime: ModelRuntime) -> float:
    found = runtime.metrics.registry.get_sample_value(
        "edgefleet_agent_fallbacks_total", {"model": "cnn", "stage": "tail", "provider": "CPUExecutionProvider"}
    )
    return 0.0 if found is None else found


def test_the_tail_runs_on_the_server_then_locally_while_it_is_killed_then_on_it_again(site: Site) -> None:
    models = site.models
    split = cnn_split()
    runtime = ModelRuntime(accelerator=site.accelerator(timeout=5.0))
    with site.server() as server:
        loaded = load(runtime, split)
        assert state(runtime) == "ready"
        assert [p.suffix for p in models.iterdir()] == [".onnx"]  # the tail, placed for the server
        for seed in range(5):
            predict_exact(runtime, split, seed)
        assert fallbacks(runtime) == 0
        server.send_signal(signal.SIGKILL)
        server.wait()
        wait_state(runtime, "degraded")  # noticed with no request in flight: the stream broke
        # Requests keep being answered, by the local session, with the same outputs.
        for seed in range(5, 10):
            predict_exact(runtime, split, seed)
        assert state(runtime) == "degraded"
        assert fallbacks(runtime) == 1
        [window] = runtime.drain_windows()
        assert (window.inference_count, window.error_count) == (10, 0)
        assert window.accelerator_fallback_count >= 5
    with site.server():
        wait_state(runtime, "ready")  # re-attached in the background, with no request needed
        for seed in range(10, 15):
            predict_exact(runtime, split, seed)
        [window] = runtime.drain_windows()
        assert (window.error_count, window.accelerator_fallback_count) == (0, 0)
        loaded.close()


def test_a_hung_server_is_left_after_the_timeout_and_its_stage_reused_when_it_resumes(site: Site) -> None:
    log = site.log
    split = cnn_split()
    runtime = ModelRuntime(accelerator=site.accelerator(timeout=2.5))
    with site.server() as server:
        loaded = load(runtime, split)
        wait_state(runtime, "ready")
        predict_exact(runtime, split, 0)
        server.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            predict_exact(runtime, split, 1)  # waits out the timeout, then runs locally
            assert 2.4 < time.monotonic() - started < WAIT
            assert state(runtime) == "degraded"
            predict_exact(runtime, split, 2)  # detached: at once
        finally:
            server.send_signal(signal.SIGCONT)
        wait_state(runtime, "ready")
        predict_exact(runtime, split, 3)
        loaded.close()
        deadline = time.monotonic() + WAIT
        while "unloaded" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    # One session on the server through the hang: the re-attach got the same stage back.
    assert log.read_text().count("loaded model") == 1, log.read_text()


def test_a_server_that_is_not_there_at_load_leaves_the_tail_local_until_it_comes(tmp_path: Path) -> None:
    split = cnn_split()
    port = free_port()
    accelerator = AcceleratorServer(f"127.0.0.1:{port}", tmp_path, timeout=1.0, retry_seconds=0.2)
    runtime = ModelRuntime(accelerator=accelerator)
    started = time.monotonic()
    loaded = load(runtime, split)
    assert time.monotonic() - started < 15.0
    assert state(runtime) == "degraded"
    assert fallbacks(runtime) == 1
    predict_exact(runtime, split, 0)
    [window] = runtime.drain_windows()
    assert (window.inference_count, window.error_count, window.accelerator_fallback_count) == (1, 0, 1)
    with accel_server(tmp_path, port):
        wait_state(runtime, "ready")
        predict_exact(runtime, split, 1)
        assert fallbacks(runtime) == 1  # coming back is not a fallback
        loaded.close()


def test_a_restarted_agent_gets_back_the_sessions_it_left_on_the_server(site: Site) -> None:
    log = site.log
    split = cnn_split()
    accelerator = site.accelerator(timeout=5.0)
    with site.server():
        # The first agent "dies" holding its tail (never closed); the second is the same device.
        first = ModelRuntime(accelerator=accelerator, device_key="device-1")
        abandoned = load(first, split)
        again = ModelRuntime(accelerator=accelerator, device_key="device-1")
        loaded = load(again, split)
        assert state(again) == "ready"
        predict_exact(again, split, 0)
        other = ModelRuntime(accelerator=accelerator, device_key="device-2")
        load(other, split).close()
        loaded.close()
        abandoned.close()  # its supervisor would go on trying (and logging) in later tests
    # One session per device, not one per start.
    assert log.read_text().count("loaded model") == 2, log.read_text()


def test_single_model_bundles_never_touch_the_server(tmp_path: Path) -> None:
    runtime = ModelRuntime(accelerator=AcceleratorServer(f"127.0.0.1:{free_port()}", tmp_path, timeout=1.0))
    loaded = runtime.load("vision", "cnn", "1.0.0", {"model.onnx": tiny_cnn().SerializeToString()}, slot="a")
    assert not loaded.degraded
    assert list(tmp_path.iterdir()) == []
    loaded.close()


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--accel-server", "127.0.0.1:1"], "--accel-models"),
        (["--accel-models", "."], "--accel-server"),
        (["--accel-server", "127.0.0.1:1", "--accel-models", "no/such/folder"], "--accel-models"),
        (["--accel-server", "127.0.0.1:1", "--accel-models", "/proc"], "cannot write to /proc"),
        (["--accel-server", "localhost", "--accel-models", "."], "not HOST:PORT"),
        (["--accel-server", "host:notaport", "--accel-models", "."], "port must be a number"),
        (["--accel-server", "[::1:50051", "--accel-models", "."], "IPv6"),
        (["--accel-server", "unix:", "--accel-models", "."], "names nothing"),
        (["--accel-server", "", "--accel-models", "."], "not HOST:PORT"),
    ],
)
def test_the_agent_refuses_half_an_accelerator(tmp_path: Path, options: list[str], named: str) -> None:
    result = CliRunner().invoke(build_app(), [*agent_run(tmp_path), *options])
    assert result.exit_code == 2
    assert named in result.output


def agent_run(folder: Path) -> list[str]:
    """``agent run`` with every required option (nothing is listening on them)."""
    return [
        "agent", "run", "--state", str(folder / "state"), "--gateway", "127.0.0.1:1", "--enroll-gateway",
        "127.0.0.1:1", "--gateway-ca", str(folder / "ca.pem"), "--tuf-root", str(folder / "root.json"),
        "--name", "dev", "--token", "t",
    ]  # fmt: skip


def test_the_agent_command_hands_the_accelerator_to_the_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from edgefleet_agent import daemon

    built: list[ModelRuntime] = []

    class Captured:
        """Stands in for the daemon: builds the real components from the settings the command parsed."""

        metrics_address = None

        def __init__(self, settings: daemon.AgentSettings) -> None:
            identity: Any = SimpleNamespace(device_class="edge", namespace="vision", device_id="dev-1")
            tuf: Any = lambda: None  # noqa: E731 - never called: nothing is installed
            components = daemon.default_components(settings, identity, tuf, AgentMetrics())
            assert isinstance(components.runtime, ModelRuntime)
            built.append(components.runtime)

        async def run(self, ready: object, *, handle_signals: bool) -> None:
            return None

    monkeypatch.setattr(daemon, "Agent", Captured)
    models = tmp_path / "models"
    models.mkdir()
    accelerator = ["--accel-server", "unix:/run/accel.sock", "--accel-models", str(models), "--accel-timeout", "2.5"]
    result = CliRunner().invoke(build_app(), [*agent_run(tmp_path), *accelerator])
    assert result.exit_code == 0, result.output
    [runtime] = built
    assert runtime.accelerator == AcceleratorServer("unix:/run/accel.sock", models, timeout=2.5)
    assert runtime.device_key == "dev-1"  # stage ids survive a restart of the agent
    assert list(models.iterdir()) == []  # the write probe leaves nothing behind
