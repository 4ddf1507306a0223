"""Failpoints: named places in the code where a fault can be injected from outside, for fault tests.

Modelled on TiKV's fail-rs and etcd's gofail. A failpoint is a call, ``failpoint("agent.update.switch")``,
at a place where a real fault could strike (after the download, before the rename, ...). It does
nothing unless the process was started with ``EDGEFLEET_FAILPOINTS`` naming it, so a fault test can
SIGKILL a real process at exactly the phase it wants instead of at a random moment and hoping.

Syntax (a subset of fail-rs): ``name=actions;name2=actions``, where ``actions`` is one or more
``[count*]action[(argument)]`` joined by ``->``; each term acts ``count`` times (forever if no
count) and then hands over to the next. Actions:

- ``off``: nothing (use ``3*off->kill`` to let three hits pass, then kill);
- ``kill``: SIGKILL this process, the same as a power cut as far as the process is concerned;
- ``sleep(ms)``: block this thread for ``ms`` milliseconds (a stall, or a window for an outside kill);
- ``error(message)``: raise :class:`FailpointError` (an ``OSError``, EIO) where the code expects I/O errors;
- ``exit(code)``: leave at once with ``os._exit(code)``.

An unset variable costs one dictionary look-up per call. Configured failpoints are logged at the
first hit so that a production process never runs with one silently.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass

from edgefleet_core.errors import EdgeFleetError

__all__ = ["ENV", "FailpointError", "FailpointSyntaxError", "configured", "failpoint", "parse_failpoints", "reset"]

logger = logging.getLogger(__name__)

ENV = "EDGEFLEET_FAILPOINTS"
_TERM = re.compile(r"^(?:(?P<count>\d+)\*)?(?P<action>off|kill|sleep|error|exit)(?:\((?P<arg>[^()]*)\))?$")
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


class FailpointError(OSError):
    """The error an ``error(...)`` failpoint raises: an I/O error, where real ones are handled."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(errno.EIO, f"failpoint {name}: {message or 'injected I/O error'}")


class FailpointSyntaxError(EdgeFleetError):
    """``EDGEFLEET_FAILPOINTS`` cannot be parsed."""


@dataclass
class _Term:
    action: str
    argument: str
    remaining: int | None  # None: forever


@dataclass
class _Failpoint:
    terms: list[_Term]


def parse_failpoints(text: str) -> dict[str, list[tuple[str, str, int | None]]]:
    """``{name: [(action, argument, count), ...]}`` from the variable's text; raises on bad syntax."""
    parsed: dict[str, list[tuple[str, str, int | None]]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        name, sep, spec = entry.partition("=")
        name = name.strip()
        if not sep or not _NAME.match(name):
            raise FailpointSyntaxError(f"{ENV}: {entry!r} is not name=actions")
        terms: list[tuple[str, str, int | None]] = []
        for raw in spec.split("->"):
            match = _TERM.match(raw.strip())
            if match is None:
                raise FailpointSyntaxError(
                    f"{ENV}: {raw.strip()!r} in {name} is not [count*]off|kill|sleep(ms)|error(msg)|exit(code)"
                )
            action, argument = match["action"], match["arg"] or ""
            if action == "sleep" and not argument.isdigit():
                raise FailpointSyntaxError(f"{ENV}: sleep in {name} needs milliseconds, e.g. sleep(500)")
            if action == "exit" and not argument.isdigit():
                raise FailpointSyntaxError(f"{ENV}: exit in {name} needs a status, e.g. exit(3)")
            terms.append((action, argument, int(match["count"]) if match["count"] else None))
        parsed[name] = terms
    return parsed


class _Registry:
    """The parsed configuration, read from the environment at the first hit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.points: dict[str, _Failpoint] | None = None
        self.announced = False

    def load(self) -> dict[str, _Failpoint]:
        with self.lock:
            if self.points is None:
                text = os.environ.get(ENV, "")
                self.points = {
                    name: _Failpoint([_Term(a, arg, count) for a, arg, count in terms])
                    for name, terms in parse_failpoints(text).items()
                }
            return self.points

    def next_action(self, name: str) -> tuple[str, str] | None:
        points = self.load()
        if not points:
            return None
        with self.lock:
            if not self.announced:
                self.announced = True
                logger.warning("failpoints configured by %s: %s", ENV, ", ".join(sorted(points)))
            point = points.get(name)
            if point is None:
                return None
            while point.terms:
                term = point.terms[0]
                if term.remaining is None:
                    return term.action, term.argument
                if term.remaining > 0:
                    term.remaining -= 1
                    return term.action, term.argument
                point.terms.pop(0)
            return None


_registry = _Registry()


def configured() -> list[str]:
    """Names of the configured failpoints; raises :class:`FailpointSyntaxError` at once on bad syntax.

    Commands call this when they start, so a typo in the variable fails the command up front with
    its own message instead of deep inside the first code path that hits a failpoint.
    """
    return sorted(_registry.load())


def reset() -> None:
    """Forget the parsed configuration (tests change the variable between cases)."""
    with _registry.lock:
        _registry.points = None
        _registry.announced = False


def failpoint(name: str) -> None:
    """Act as configured for ``name`` (normally: do nothing)."""
    if _registry.points is not None and not _registry.points:
        return
    step = _registry.next_action(name)
    if step is None:
        return
    action, argument = step
    if action == "off":
        return
    logger.warning("failpoint %s: %s%s", name, action, f"({argument})" if argument else "")
    if action == "kill":
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # SIGKILL is delivered asynchronously; never run past the failpoint
    elif action == "sleep":
        time.sleep(int(argument) / 1000)
    elif action == "error":
        raise FailpointError(name, argument)
    elif action == "exit":
        os._exit(int(argument))
