"""The demo's children: readiness, a child that dies, and stopping everything, grandchildren included."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgefleet_operator.demo.errors import ChildFailed, DemoTimeout
from edgefleet_operator.demo.fleet import AGENT_READY, GATEWAY_READY, Children, gateway_addresses, inference_address

# A child that ignores SIGTERM and starts a grandchild that does too: only SIGKILL ends them.
STUBBORN = """
import signal, subprocess, sys, time
IGNORE_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
signal.signal(signal.SIGTERM, signal.SIG_IGN)
subprocess.Popen([sys.executable, "-c", IGNORE_TERM])
print("agent ready device=demo.a inference=127.0.0.1:5001", flush=True)
time.sleep(600)
"""
POLITE = """
import time
print("gateway listening fleet=127.0.0.1:7443 enroll=127.0.0.1:7444", flush=True)
time.sleep(600)
"""


def _children(tmp_path: Path, script: str) -> Children:
    return Children(tmp_path / "logs", program=(sys.executable, "-c", script))


def test_ready_lines_are_parsed(tmp_path: Path) -> None:
    children = _children(tmp_path, POLITE)
    gateway = children.start("gateway", [], GATEWAY_READY)
    try:
        children.wait_ready([gateway], timeout=30)
        assert gateway_addresses(gateway) == ("127.0.0.1:7443", "127.0.0.1:7444")
    finally:
        children.stop_all(grace=5)
    assert not gateway.alive()


def test_stop_all_kills_what_ignores_sigterm_and_what_it_started(tmp_path: Path) -> None:
    children = _children(tmp_path, STUBBORN)
    agent = children.start("agent", [], AGENT_READY)
    children.wait_ready([agent], timeout=30)
    assert inference_address(agent) == "127.0.0.1:5001"
    tree = [psutil.Process(agent.popen.pid)]

    def grandchildren() -> list[psutil.Process]:
        return tree[0].children(recursive=True)

    deadline = time.monotonic() + 30
    while not grandchildren():
        assert time.monotonic() < deadline, "the child did not start its own child"
        time.sleep(0.02)
    tree += grandchildren()
    assert len(tree) == 2
    children.stop_all(grace=0.5)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    children.stop_all(grace=0.5)  # idempotent


def test_a_child_that_exits_before_it_is_ready_is_reported_with_its_output(tmp_path: Path) -> None:
    children = _children(tmp_path, "import sys; print('edgefleet agent: no token'); sys.exit(2)")
    agent = children.start("edge-cpu-1", [], AGENT_READY)
    with pytest.raises(ChildFailed, match=re.escape("edge-cpu-1 exited with 2: edgefleet agent: no token")):
        children.wait_ready([agent], timeout=30)
    with pytest.raises(ChildFailed, match="edge-cpu-1 exited with 2"):
        children.check_alive()


def test_a_child_that_never_gets_ready_times_out(tmp_path: Path) -> None:
    children = _children(tmp_path, "import time; time.sleep(600)")
    agent = children.start("edge-npu-1", [], AGENT_READY)
    try:
        with pytest.raises(DemoTimeout, match="not ready within 0 s: edge-npu-1"):
            children.wait_ready([agent], timeout=0.3)
    finally:
        children.stop_all(grace=2)
