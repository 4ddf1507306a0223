"""Device-wide figures for the health report: CPU, memory, disk of the state folder, energy.

CPU use is measured over the whole window (psutil's counter since the previous sample), not
at the instant of the report. Energy comes from Intel RAPL (``/sys/class/powercap``) where the
counters are readable — since 2020 kernels make them root-only by default, so often they are not,
and then the report carries no energy figure at all (absent is not zero).
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

POWERCAP = Path("/sys/class/powercap")


@dataclass(frozen=True)
class DeviceStats:
    """One window's device-wide figures (fleet.proto ``HealthReport``)."""

    cpu_percent: float
    """Mean utilisation of all cores over the window, 0–100."""
    memory_used_bytes: int
    memory_total_bytes: int
    disk_used_bytes: int
    """Of the filesystem holding the state folder (and so the model slots)."""
    disk_total_bytes: int
    energy_joules: float | None
    """Energy used over the window; ``None`` where the device does not expose it."""


@dataclass(frozen=True)
class _RaplZone:
    energy: Path
    """``energy_uj``: a counter in microjoules that wraps at ``max_range``."""
    max_range: int


class EnergyMeter:
    """Sums the package-level RAPL zones (``intel-rapl:N``; sub-zones are parts of those)."""

    def __init__(self, powercap: Path = POWERCAP) -> None:
        self._zones = self._readable_zones(powercap)
        self._last = self._read()

    @staticmethod
    def _readable_zones(powercap: Path) -> list[_RaplZone]:
        zones: list[_RaplZone] = []
        try:
            candidates = sorted(powercap.glob("intel-rapl:*"))
        except OSError:
            return zones
        for zone in candidates:
            if zone.name.count(":") != 1:  # intel-rapl:0:1 is a sub-zone of intel-rapl:0
                continue
            try:
                int((zone / "energy_uj").read_text())
                max_range = int((zone / "max_energy_range_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append(_RaplZone(zone / "energy_uj", max_range))
        return zones

    @property
    def available(self) -> bool:
        return bool(self._zones)

    def _read(self) -> list[int] | None:
        if not self._zones:
            return None
        try:
            return [int(zone.energy.read_text()) for zone in self._zones]
        except (OSError, ValueError):
            return None

    def joules_since_last(self) -> float | None:
        """Energy since the previous call (or construction); ``None`` when not measurable."""
        now = self._read()
        last, self._last = self._last, now
        if now is None or last is None:
            return None
        total_uj = 0
        for zone, before, after in zip(self._zones, last, now, strict=True):
            delta = after - before
            if delta < 0:  # the counter wrapped
                delta += zone.max_range + 1
            total_uj += delta
        return total_uj / 1e6


class SystemSampler:
    """Samples :class:`DeviceStats` once per health window."""

    def __init__(self, state_dir: Path, *, powercap: Path = POWERCAP) -> None:
        self._state_dir = state_dir
        self._energy = EnergyMeter(powercap)
        self._cpu = _cpu_times()  # starts the window: the first sample covers from here

    def cpu_percent(self) -> float:
        """Mean use of all cores since the previous call, 0–100.

        From our own copy of the CPU time counters, not ``psutil.cpu_percent``'s process-wide one,
        so another caller of psutil cannot shorten the window.
        """
        now = _cpu_times()
        (busy_before, total_before), self._cpu = self._cpu, now
        elapsed = now[1] - total_before
        if elapsed <= 0:
            return 0.0
        return min(100.0, max(0.0, 100.0 * (now[0] - busy_before) / elapsed))

    def sample(self) -> DeviceStats:
        """Figures for the window since the previous sample (or construction)."""
        cpu = self.cpu_percent()
        memory = psutil.virtual_memory()
        used = max(0, int(memory.total) - int(memory.available))
        try:
            disk = shutil.disk_usage(self._state_dir)
            disk_used, disk_total = disk.used, disk.total
        except OSError as e:
            logger.warning("cannot measure the disk holding %s: %s", self._state_dir, e)
            disk_used = disk_total = 0
        return DeviceStats(
            cpu_percent=cpu,
            memory_used_bytes=min(used, int(memory.total)),
            memory_total_bytes=int(memory.total),
            disk_used_bytes=disk_used,
            disk_total_bytes=disk_total,
            energy_joules=self._energy.joules_since_last(),
        )


def _cpu_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores since boot; idle and I/O wait are not busy."""
    times = psutil.cpu_times()
    # Linux counts guest time inside user and nice already (psutil's own cpu_percent does the same).
    total = float(sum(times)) - float(getattr(times, "guest", 0.0)) - float(getattr(times, "guest_nice", 0.0))
    idle = float(times.idle) + float(getattr(times, "iowait", 0.0))
    return total - idle, total
