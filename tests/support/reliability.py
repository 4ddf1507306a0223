"""Figures of the reliability campaign (issue 10): fault scenarios, fuzz targets, the authorization matrix.

Every fault test runs a number of trials and records, per scenario, how many trials failed, what
was lost and how long recovery took; fuzz tests record how many inputs they ran. In CI the quick
counts run (``make test``); ``make reliability`` sets ``EDGEFLEET_RELIABILITY=full`` for the full
counts and ``EDGEFLEET_RELIABILITY_OUT`` to the JSON file the figures go to
(``bench/results/reliability.json``), from which ``RELIABILITY.md``'s tables are written.

A test asserts its own verdict (no failures, nothing lost) whether or not anything is recorded: the
record is the evidence, not the check.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefleet_core.atomic import write_file_atomic

FULL = os.environ.get("EDGEFLEET_RELIABILITY", "") == "full"
OUT_ENV = "EDGEFLEET_RELIABILITY_OUT"
FUZZ_ENV = "EDGEFLEET_FUZZ_EXAMPLES"


def trials(quick: int, full: int) -> int:
    """How many trials a scenario runs: ``quick`` in the test suite, ``full`` in ``make reliability``."""
    override = os.environ.get("EDGEFLEET_TRIALS")
    if override:
        return max(1, int(override))
    return full if FULL else quick


FULL_FUZZ_FACTOR = 10
"""``make reliability`` runs each fuzz target this many times its quick budget."""


def fuzz_examples(quick: int) -> int:
    """Hypothesis examples per fuzz target: ``EDGEFLEET_FUZZ_EXAMPLES`` when set (runs on demand), else
    ``quick`` (ten times that in ``make reliability``)."""
    value = os.environ.get(FUZZ_ENV)
    if value:
        return max(1, int(value))
    return quick * FULL_FUZZ_FACTOR if FULL else quick


@dataclass
class Trial:
    """One trial's outcome; a trial that raises counts as failed."""

    failed: bool = False
    lost: int = 0
    """Items lost in this trial (reports, versions, bytes of state: whatever the scenario guards)."""
    recovery_s: float | None = None
    note: str = ""

    def recovered(self, seconds: float) -> None:
        self.recovery_s = seconds

    def lose(self, count: int, what: str = "") -> None:
        self.lost += count
        if what:
            self.note = what


@dataclass
class Scenario:
    """The running record of one fault scenario."""

    name: str
    kind: str
    guards: str
    """What "lost" counts for this scenario (e.g. "acknowledged health reports")."""
    results: list[Trial] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    @contextmanager
    def trial(self) -> Iterator[Trial]:
        """A trial; an exception inside marks it failed and is re-raised after it is recorded."""
        current = Trial()
        try:
            yield current
        except BaseException:
            current.failed = True
            self.results.append(current)
            _write(self)
            raise
        self.results.append(current)
        _write(self)

    def summary(self) -> dict[str, Any]:
        recoveries = [t.recovery_s for t in self.results if t.recovery_s is not None]
        return {
            "kind": self.kind,
            "guards": self.guards,
            "trials": len(self.results),
            "failures": sum(t.failed for t in self.results),
            "lost": sum(t.lost for t in self.results),
            "recovery_s": _spread(recoveries),
            "notes": sorted({t.note for t in self.results if t.note}),
            "wall_s": round(time.monotonic() - self.started, 1),
            "mode": "full" if FULL else "quick",
        }


def _spread(values: Iterable[float]) -> dict[str, float] | None:
    data = sorted(values)
    if not data:
        return None
    return {
        "median": round(statistics.median(data), 3),
        "p95": round(data[min(len(data) - 1, int(0.95 * len(data)))], 3),
        "max": round(data[-1], 3),
    }


def scenario(name: str, *, kind: str = "fault", guards: str) -> Scenario:
    """Start recording a scenario (each call starts its record afresh)."""
    return Scenario(name=name, kind=kind, guards=guards)


def record_fuzz(target: str, *, executions: int, crashes_fixed: Iterable[str] = ()) -> None:
    """A fuzz target's figures: inputs run this time, and the crashes it found that were fixed."""
    _merge("fuzz", target, {"executions": executions, "crashes_fixed": list(crashes_fixed), "mode": _fuzz_mode()})


def record_matrix(name: str, cells: dict[str, dict[str, str]]) -> None:
    """An authorization matrix: ``{method: {caller: outcome}}``, each outcome what the server answered."""
    _merge("matrix", name, {"cells": cells})


def record_load(name: str, figures: dict[str, Any]) -> None:
    """A load run's figures (duration, requests, errors, memory)."""
    _merge("load", name, figures)


def _fuzz_mode() -> str:
    if os.environ.get(FUZZ_ENV):
        return f"{FUZZ_ENV}={os.environ[FUZZ_ENV]}"
    return f"full ({FULL_FUZZ_FACTOR}x quick)" if FULL else "quick"


def _write(record: Scenario) -> None:
    _merge("scenarios", record.name, record.summary())


def _merge(section: str, key: str, value: dict[str, Any]) -> None:
    out = os.environ.get(OUT_ENV)
    if not out:
        return
    path = Path(out)
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    data.setdefault("machine", _machine())
    data.setdefault(section, {})[key] = value
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_file_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
