"""Failpoints: parsing, counts and sequences, and the real SIGKILL of a child process."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from edgefleet_core import failpoints
from edgefleet_core.failpoints import FailpointError, FailpointSyntaxError, failpoint, parse_failpoints


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(failpoints.ENV, raising=False)
    failpoints.reset()
    yield
    failpoints.reset()


def _configure(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv(failpoints.ENV, text)
    failpoints.reset()


def test_unset_does_nothing() -> None:
    failpoint("agent.update.switch")


def test_parse_terms_counts_and_sequences() -> None:
    assert parse_failpoints("a.b=3*off->kill; c=sleep(20);d=error(disk gone)") == {
        "a.b": [("off", "", 3), ("kill", "", None)],
        "c": [("sleep", "20", None)],
        "d": [("error", "disk gone", None)],
    }


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("nonsense", "not name=actions"),
        ("A=kill", "not name=actions"),
        ("a=explode", "'explode' in a"),
        ("a=sleep(soon)", "sleep in a needs milliseconds"),
        ("a=exit", "exit in a needs a status"),
        ("a=2*kill->", "'' in a"),
    ],
)
def test_bad_syntax_is_refused_naming_the_entry(text: str, names: str) -> None:
    with pytest.raises(FailpointSyntaxError, match=names):
        parse_failpoints(text)


def test_counted_terms_hand_over_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch, "p=2*off->1*error(boom)->off")
    failpoint("p")
    failpoint("p")
    with pytest.raises(FailpointError) as caught:
        failpoint("p")
    assert caught.value.errno == errno.EIO
    assert "failpoint p: boom" in str(caught.value)
    failpoint("p")  # the last term holds forever
    failpoint("other")


def test_a_spent_sequence_goes_quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    _configure(monkeypatch, "p=1*error(x)")
    with pytest.raises(FailpointError):
        failpoint("p")
    failpoint("p")


@pytest.mark.parametrize(("action", "code"), [("kill", -signal.SIGKILL), ("exit(7)", 7)])
def test_kill_and_exit_end_a_real_process_at_the_failpoint(action: str, code: int) -> None:
    script = (
        "from edgefleet_core.failpoints import failpoint\n"
        "print('before', flush=True)\n"
        "failpoint('x.y')\n"
        "print('after', flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        check=False,
        env={failpoints.ENV: f"x.y={action}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == code
    assert done.stdout == "before\n"


def test_a_command_refuses_a_malformed_variable_up_front() -> None:
    env = {**os.environ, failpoints.ENV: "agent.update.switch=explode"}
    done = subprocess.run(
        [sys.executable, "-m", "edgefleet_core.cli", "version"],
        check=False,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "EDGEFLEET_FAILPOINTS: 'explode' in agent.update.switch" in done.stderr
