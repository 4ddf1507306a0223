"""What a demo run observed: the data the live table, the closing summary and the HTML report show.

The orchestrator (``session``) fills it; ``live`` and ``report`` only read it, so each can be
tested on a record built by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class Candidate:
    """One optimization candidate of a class's build (from the pipeline's report)."""

    name: str
    size_bytes: int
    accuracy: float | None
    """The held-out metric (digits: accuracy, 0..1); ``None`` when not evaluated."""
    latency_ms: float | None
    """p50 on this machine's CPU; ``None`` when not measured here (e.g. another execution provider)."""
    accepted: bool
    chosen: bool


@dataclass(frozen=True)
class ClassSummary:
    """One DeviceClass's variant and how its devices fared."""

    device_class: str
    version: str
    source_bytes: int
    variant_bytes: int
    baseline_accuracy: float | None
    accuracy: float | None
    partition_cut: str | None
    """The cut the planner chose (tensor names), ``None`` when the variant runs whole."""
    p50_ms: float | None
    """Over every inference the demo sent to this class's devices."""
    p95_ms: float | None
    devices_total: int
    devices_healthy: int
    candidates: tuple[Candidate, ...] = ()

    @property
    def compression(self) -> float | None:
        return self.source_bytes / self.variant_bytes if self.variant_bytes else None


@dataclass(frozen=True)
class DeviceRow:
    """One device agent as the live table shows it."""

    name: str
    device_class: str
    version: str | None
    """The version it serves (``None``: nothing installed yet)."""
    state: str
    """enrolling, waiting, installing, serving, rolled back, refused, stopped, …"""
    requests: int = 0
    errors: int = 0
    correct: int = 0
    """Inferences whose argmax matched the digits test label."""
    latencies_ms: tuple[float, ...] = ()

    def percentile(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass(frozen=True)
class TimelineEvent:
    """Something that happened, for the rollout timeline plot and the log."""

    at_s: float
    """Seconds since the demo started."""
    kind: str
    """built, published, wave, installed, serving, rolled-back, refused, fault, …"""
    device_class: str | None = None
    device: str | None = None
    version: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class DemoRecord:
    started_at: datetime
    fault: str | None
    """``None``, ``bad-model`` or ``tampered-artifact``."""
    classes: tuple[ClassSummary, ...] = ()
    devices: tuple[DeviceRow, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()
    ok: bool = False
    """Whether the system behaved as it should (the exit code is 0 exactly then)."""
    verdict: str = ""
    """One sentence: what happened, e.g. "version 2 failed its health gate and was rolled back"."""
    notes: tuple[str, ...] = field(default_factory=tuple)
